"""QLoRA's base built layer by layer on the device (mgmlora.models.layerwise, through mgmlora.models.load_model).

The expected values come from transformers' own whole-model builds: for random init `from_config` of the same config
(the same buffers exactly, the same distributions: norms one, weights normal with the config's `initializer_range`);
for a checkpoint `from_pretrained` of the same directory (every tensor exactly, experts fused by transformers).
"""

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mgmlora.models import load_model
from mgmlora.models import loading as loading_module
from mgmlora.models.args import ModelArgs
from mgmlora.models.causal_lm import load_causal_lm
from mgmlora.models.layerwise import CheckpointLayers, init_layer, init_rest
from mgmlora.models.quantization import QuantizationArgs
from mgmlora.models.registry import get_preset


def _args(preset, seed=0, **kw):
    quant = QuantizationArgs(compute_dtype="float32", backend="torch")
    return ModelArgs(preset=preset, dtype="float32", gradient_checkpointing=True, quantization=quant, init_seed=seed,
                     **kw)


def _tied_config():
    return AutoConfig.for_model("qwen3", **{**get_preset("tiny-qwen3").architecture, "tie_word_embeddings": True})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny models saved by transformers (experts one module per expert, as on the Hub), and a `.bin` one."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    models = {"moe": load_model(ModelArgs(preset="tiny-qwen3-moe", dtype="float32")).model,
              "dense": load_model(ModelArgs(preset="tiny-qwen3", dtype="float32")).model,
              "tied": AutoModelForCausalLM.from_config(_tied_config(), dtype=torch.float32)}
    for name, model in models.items():
        model.save_pretrained(root / name)
    (root / "bin").mkdir()  # transformers 5 writes safetensors only; older checkpoints have pytorch_model.bin
    (root / "bin" / "config.json").write_text((root / "dense" / "config.json").read_text())
    torch.save(models["dense"].state_dict(), root / "bin" / "pytorch_model.bin")
    return {name: root / name for name in (*models, "bin")}


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_layerwise_random_init_matches_transformers_own_init_in_distribution(preset):
    got = load_model(_args(preset), quantize=False).model
    config = AutoConfig.for_model(get_preset(preset).model_type, **get_preset(preset).architecture)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    std = config.initializer_range
    buffers = dict(reference.named_buffers())
    for name, buffer in got.named_buffers():  # rotary frequencies: recomputed, not left as memory garbage
        torch.testing.assert_close(buffer, buffers[name], rtol=0, atol=0, msg=name)
    params = dict(reference.named_parameters())
    assert got.state_dict().keys() == reference.state_dict().keys()
    for name, param in got.named_parameters():
        assert param.device.type == "cpu" and param.dtype == torch.float32
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        else:  # normal(0, std): the sample std within 15% (the smallest tensor has 256 values)
            assert abs(param.std().item() - std) < 0.15 * std, name
            assert abs(param.std().item() - params[name].std().item()) < 0.15 * std, name


def test_the_seed_decides_the_weights_and_quantising_does_not_change_them():
    a, b = (load_model(_args("tiny-qwen3-moe"), quantize=False).model for _ in range(2))
    other = load_model(_args("tiny-qwen3-moe", seed=1), quantize=False).model
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.model.layers[1].self_attn.q_proj.weight, other.model.layers[1].self_attn.q_proj.weight)
    quantized = load_model(_args("tiny-qwen3-moe")).model  # what stays in the model dtype equals the twin's
    for name, param in quantized.named_parameters():
        if param.dtype == torch.float32 and param.stride() != (0, 0, 0):
            torch.testing.assert_close(param, a.get_parameter(name), rtol=0, atol=0, msg=name)


def _check_one_layer_at_a_time(model, layer, seen):
    layers = list(model.model.layers)
    i = next(k for k, other in enumerate(layers) if other is layer)
    assert all(p.is_meta for later in layers[i:] for p in later.parameters())  # not built yet
    for done in layers[:i]:  # already 4-bit: no float linear weight, experts only as the empty placeholder
        assert not any(type(m) is nn.Linear for m in done.modules())
        assert all(p.stride() == (0, 0, 0) for p in done.parameters() if p.ndim == 3)
    seen.append(i)


def test_at_most_one_layer_exists_in_the_model_dtype_while_the_4bit_base_is_built(monkeypatch, checkpoints):
    seen = []

    def watching(model, layer, device):
        _check_one_layer_at_a_time(model, layer, seen)
        init_layer(model, layer, device)

    monkeypatch.setattr(loading_module, "init_layer", watching)
    load_model(_args("tiny-qwen3-moe"))
    original = CheckpointLayers.load_layer

    def reading(self, model, layer, device):
        _check_one_layer_at_a_time(model, layer, seen)
        original(self, model, layer, device)

    monkeypatch.setattr(CheckpointLayers, "load_layer", reading)
    load_model(_args(None, model_path=str(checkpoints["moe"])))
    assert seen == [0, 1, 0, 1]  # the test ran on every layer, random init then the checkpoint


def test_a_tied_head_is_tied_and_a_tensor_the_initialiser_skips_is_named():
    arch = {**get_preset("tiny-qwen3").architecture, "tie_word_embeddings": True}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", **arch), dtype=torch.float32)
    for layer in model.model.layers:
        init_layer(model, layer, torch.device("cpu"))
    init_rest(model, model.model.layers, torch.device("cpu"))
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.lm_head.weight.isnan().any()

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", **arch), dtype=torch.float32)
        model.model.layers[0].extra = nn.Module()
        model.model.layers[0].extra.scale = nn.Parameter(torch.empty(4))  # no initialiser knows it
    with pytest.raises(RuntimeError, match=r"without values, first extra\.scale"):
        init_layer(model, model.model.layers[0], torch.device("cpu"))


@pytest.mark.parametrize("name", ["moe", "dense", "tied"])
def test_a_checkpoint_read_layer_by_layer_equals_from_pretrained(checkpoints, name):
    path = checkpoints[name]
    reference = load_causal_lm(ModelArgs(model_path=str(path), dtype="float32"))
    with torch.device("meta"):
        model = load_causal_lm(ModelArgs(model_path=str(path), dtype="float32"), weights=False)
    source = CheckpointLayers.plan(model, path)
    for layer in model.model.layers:
        source.load_layer(model, layer, torch.device("cpu"))
    source.load_rest(model, model.model.layers, torch.device("cpu"))
    got, expected = model.state_dict(), reference.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:  # fused experts included: transformers fuses the per-expert modules of the file
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    for (key, buffer), (_, ref) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        torch.testing.assert_close(buffer, ref, rtol=0, atol=0, msg=key)  # rotary frequencies, never in a file
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (name == "tied")


def test_the_4bit_base_from_a_checkpoint_is_the_checkpoint_quantised(checkpoints):
    from mgmlora.models.nf4 import dequantize, quantize

    path = str(checkpoints["moe"])
    quantized = load_model(_args(None, model_path=path))
    assert quantized.model.generation_config.to_dict() == \
        load_causal_lm(ModelArgs(model_path=path, dtype="float32")).generation_config.to_dict()
    reference = load_model(_args(None, model_path=path), quantize=False)  # from_pretrained, whole
    for module in reference.model.model.layers.modules():
        for param_name, param in module.named_parameters(recurse=False):
            if isinstance(module, nn.Linear) and param_name == "weight" or param.ndim == 3:
                param.data = dequantize(quantize(param.data, True, torch.float32, "torch"), "torch")
    ids = torch.tensor([[5, 17, 33, 48, 9, 70, 11, 2]])
    with torch.no_grad():
        torch.testing.assert_close(quantized.model(input_ids=ids).logits, reference.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_a_checkpoint_the_plan_does_not_cover_is_loaded_whole_and_the_log_says_why(checkpoints, caplog, tmp_path):
    from safetensors.torch import load_file, save_file

    with torch.device("meta"):
        model = load_causal_lm(ModelArgs(model_path=str(checkpoints["dense"]), dtype="float32"), weights=False)
    assert CheckpointLayers.plan(model, checkpoints["bin"]) == f"{checkpoints['bin']} has no safetensors checkpoint"
    renamed = tmp_path / "renamed"  # another layout: one tensor under another name
    renamed.mkdir()
    (renamed / "config.json").write_text((checkpoints["dense"] / "config.json").read_text())
    tensors = load_file(checkpoints["dense"] / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.w"] = tensors.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(tensors, renamed / "model.safetensors")
    assert CheckpointLayers.plan(model, renamed) == \
        "model.layers.0.self_attn.q_proj.weight is not in the checkpoint under that name"
    with caplog.at_level("WARNING"):
        loaded = load_model(_args(None, model_path=str(checkpoints["bin"])))
    assert "has no safetensors checkpoint, so it is read whole into host memory" in caplog.text
    assert type(loaded.model.model.layers[0].self_attn.q_proj).__name__ == "Nf4Linear"

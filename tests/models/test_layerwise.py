"""QLoRA's random init layer by layer on the device (mgmlora.models.layerwise, through mgmlora.models.load_model).

The expected values come from transformers' own whole-model build of the same config (`from_config`): the same
buffers exactly, and the same distributions (norms one, weights normal with the config's `initializer_range`).
"""

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mgmlora.models import load_model
from mgmlora.models import loading as loading_module
from mgmlora.models.args import ModelArgs
from mgmlora.models.layerwise import init_layer, init_rest
from mgmlora.models.quantization import QuantizationArgs
from mgmlora.models.registry import get_preset


def _args(preset, seed=0):
    quant = QuantizationArgs(compute_dtype="float32", backend="torch")
    return ModelArgs(preset=preset, dtype="float32", gradient_checkpointing=True, quantization=quant, init_seed=seed)


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


def test_at_most_one_layer_exists_in_the_model_dtype_while_the_4bit_base_is_built(monkeypatch):
    seen = []

    def watching(model, layer, device):
        layers = list(model.model.layers)
        i = next(k for k, other in enumerate(layers) if other is layer)
        assert all(p.is_meta for later in layers[i:] for p in later.parameters())  # not built yet
        for done in layers[:i]:  # already 4-bit: no float linear weight, experts only as the empty placeholder
            assert not any(type(m) is nn.Linear for m in done.modules())
            assert all(p.stride() == (0, 0, 0) for p in done.parameters() if p.ndim == 3)
        seen.append(i)
        init_layer(model, layer, device)

    monkeypatch.setattr(loading_module, "init_layer", watching)
    load_model(_args("tiny-qwen3-moe"))
    assert seen == [0, 1]  # the test ran on every layer


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
    with pytest.raises(RuntimeError, match=r"uninitialised, first extra\.scale"):
        init_layer(model, model.model.layers[0], torch.device("cpu"))

import importlib.util

import pytest
import torch

from mgmlora.models.args import ModelArgs
from mgmlora.models.causal_lm import check_vocab, load_causal_lm, load_tokenizer
from tests.conftest import TOKENIZER, tiny_model


def test_loads_weights_from_a_local_safetensors_directory(tmp_path):
    model = tiny_model(seed=1)
    model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    loaded = load_causal_lm(ModelArgs(model_path=str(tmp_path), dtype="float32"))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert loaded.config.use_cache is False


def test_loads_bin_weights_safely(tmp_path):
    model = tiny_model(seed=2)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_causal_lm(ModelArgs(model_path=str(tmp_path), dtype="float32"))
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_random_init_is_seeded_and_in_the_requested_dtype():
    a = load_causal_lm(ModelArgs(preset="tiny-qwen3", dtype="bfloat16", init_seed=5))
    b = load_causal_lm(ModelArgs(preset="tiny-qwen3", dtype="bfloat16", init_seed=5))
    assert a.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert a.is_gradient_checkpointing


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "is not a directory"),
    (lambda d: d.mkdir(), "config.json is missing"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), "no \\*.safetensors or \\*.bin"),
])
def test_bad_model_path_fails_with_a_clear_message(tmp_path, setup, message):
    path = tmp_path / "model"
    setup(path)
    with pytest.raises(FileNotFoundError, match=message):
        load_causal_lm(ModelArgs(model_path=str(path)))


def test_model_args_need_a_source_and_flash_attn_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="set `preset`"):
        ModelArgs()
    # The check runs on every machine: flash-attn is made absent here whether or not it is installed.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ValueError, match="needs the flash-attn package"):
        ModelArgs(preset="tiny-qwen3", attn_implementation="flash_attention_2")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed (the `flash` "
                    "extra; CUDA source build)")
def test_flash_attention_2_is_accepted_when_flash_attn_is_installed():
    assert ModelArgs(preset="tiny-qwen3", attn_implementation="flash_attention_2").attn_implementation == \
        "flash_attention_2"


def test_tokenizer_and_vocab_checks(tmp_path):
    tok = load_tokenizer(ModelArgs(preset="tiny-qwen3", tokenizer_path=str(TOKENIZER)))
    assert tok.chat_template and tok.pad_token_id is not None
    check_vocab(tiny_model(), tok, "model")
    with pytest.raises(ValueError, match="tokenizer_path"):
        load_tokenizer(ModelArgs(preset="qwen3-8b"))
    small = load_causal_lm(ModelArgs(preset="tiny-qwen3", dtype="float32"))
    small.resize_token_embeddings(100)
    with pytest.raises(ValueError, match="512 tokens but the model's embedding table has 100 rows"):
        check_vocab(small, tok, "model")


def test_vocab_check_reads_the_full_shape_of_a_zero3_partitioned_embedding():
    tokenizer = load_tokenizer(ModelArgs(preset="tiny-qwen3", tokenizer_path=str(TOKENIZER)))
    assert len(tokenizer) == 512
    model = tiny_model()
    weight = model.get_input_embeddings().weight
    weight.data = torch.empty(0)  # what a ZeRO-3 partition placeholder looks like: 0 local rows
    weight.ds_shape = torch.Size([512, 64])
    check_vocab(model, tokenizer, "model")  # 512 rows in full: accepted, although the local shape has 0 rows
    weight.ds_shape = torch.Size([511, 64])  # the full shape, not the local one, decides
    with pytest.raises(ValueError, match="512 tokens but the model's embedding table has 511 rows"):
        check_vocab(model, tokenizer, "model")


def test_real_presets_build_on_the_meta_device():
    from transformers import AutoModelForCausalLM

    from mgmlora.models.causal_lm import build_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config(ModelArgs(preset="qwen3-30b-a3b")))
    total = sum(p.numel() for p in model.parameters())
    assert 30.0e9 < total < 31.0e9  # Qwen3-30B-A3B: 30.5B parameters

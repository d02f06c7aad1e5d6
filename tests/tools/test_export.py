"""Export and merge (mgmlora.tools.export, bin/export.py): merged logits equal adapter-on-base logits."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel

from mgmlora.batch import IMAGE_TOKEN_INDEX
from mgmlora.commands import export as export_cli
from mgmlora.data.datamodule import ChatDataModule
from mgmlora.data.llava_datamodule import LlavaDataModule
from mgmlora.models import load_model
from mgmlora.models.args import ModelArgs
from mgmlora.models.mgm_checkpoint import load_mgm
from mgmlora.models.quantization import QuantizationArgs
from mgmlora.tools.export import build_trained_model, model_args_for, read_run_adapter
from mgmlora.training.callbacks import AdapterExport
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.lora import LoraArgs
from mgmlora.training.module import LoraLitModule
from mgmlora.training.optim import OptimArgs
from tests.conftest import ASSETS, TRAIN

TOL = dict(rtol=1e-4, atol=1e-4)  # fp32 merge: W + s*B@A folded once vs applied per forward


def _train(tmp_path, preset, quantization=None):
    """Two optimizer steps with a large learning rate (so the adapter is far from a no-op), checkpoint + export."""
    torch.manual_seed(0)
    mgm = preset == "tiny-mgm"
    model = ModelArgs(preset=preset, tokenizer_path=str(ASSETS / ("gemma_tokenizer" if mgm else "tokenizer")),
                      dtype="float32", gradient_checkpointing=quantization is not None, quantization=quantization)
    lora = LoraArgs(preset="chameleons" if preset.endswith("moe") else "balanced", lora_dropout=0.0,
                    target_experts=preset.endswith("moe"))
    module = LoraLitModule(model, lora, OptimArgs(lr=5e-2, warmup_ratio=0.0))
    if mgm:
        data = LlavaDataModule(str(ASSETS / "llava" / "llava_demo.json"), str(ASSETS / "llava"), batch_size=2)
    else:
        data = ChatDataModule(str(TRAIN), batch_size=2)
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, "run"),
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        plugins=[AdapterCheckpointIO()], limit_val_batches=0,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}",
                                                   every_n_train_steps=2), AdapterExport()])
    trainer.fit(module, data)
    return tmp_path / "ckpt" / "step=2.ckpt", tmp_path / "run" / "version_0" / "adapter"


def _text_inputs():
    ids = torch.tensor([[5, 17, 33, 48, 9, 70, 11], [3, 44, 21, 8, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (torch.arange(7) < torch.tensor([[7], [4]])).long()}


@pytest.mark.integration
@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_merged_text_model_reloads_with_transformers_and_matches_the_adapter(tmp_path, preset):
    from transformers import AutoModelForCausalLM

    ckpt, adapter_dir = _train(tmp_path, preset)
    run = read_run_adapter(ckpt)
    args = model_args_for(run, dtype="float32")
    adapted = build_trained_model(run, args).model
    inputs = _text_inputs()
    with torch.no_grad():
        expected = adapted.eval()(**inputs).logits
        base_only = load_model(args).model.eval()(**inputs).logits
    assert not torch.allclose(expected, base_only, **TOL)  # the adapter changes the model, so equality means something

    out = export_cli.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "merged"), "--merge",
                           "--dtype", "float32"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not any("lora_" in k for k in index["weight_map"])
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, **TOL)
    assert (out / "tokenizer.json").is_file()

    # the run's final adapter directory and the exported adapter load with plain PEFT and agree
    exported = export_cli.main(["--checkpoint", str(adapter_dir), "--output", str(tmp_path / "adapter_out")])
    reloaded = PeftModel.from_pretrained(load_model(args).model, exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, **TOL)


@pytest.mark.integration
def test_a_qlora_adapter_merges_into_the_full_precision_base_and_generates_on_the_4bit_one(tmp_path):
    from transformers import AutoModelForCausalLM

    quant = QuantizationArgs(compute_dtype="float32", backend="torch")
    ckpt, _ = _train(tmp_path, "tiny-qwen3-moe", quant)  # expert LoRA trained on 4-bit experts
    run = read_run_adapter(ckpt)
    args = model_args_for(run, dtype="float32")
    assert args.quantization == quant  # the run's settings rebuild the 4-bit base it trained on
    inputs = _text_inputs()
    on_4bit = build_trained_model(run, args).model  # what bin/generate.py runs
    on_full = build_trained_model(run, args, quantize=False).model
    with torch.no_grad():
        expected = on_full.eval()(**inputs).logits
        approx = on_4bit.eval()(**inputs).logits
        base_only = load_model(args, quantize=False).model.eval()(**inputs).logits
    assert not torch.allclose(expected, base_only, **TOL)  # the adapter changes the model
    assert not torch.allclose(approx, expected, **TOL)  # 4 bits differ from the full-precision base ...
    assert (approx - expected).abs().mean() < 0.5 * (expected - base_only).abs().mean() + 0.1  # ... by a little

    out = export_cli.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "merged"), "--merge",
                           "--dtype", "float32"])
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not any(".nf4_" in k or "absmax" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, **TOL)

    exported = export_cli.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "adapter_out")])
    reloaded = PeftModel.from_pretrained(load_model(args, quantize=False).model, exported).eval()
    with torch.no_grad():  # the adapter directory is plain PEFT: it loads on the full-precision base
        torch.testing.assert_close(reloaded(**inputs).logits, expected, **TOL)


def test_merged_mgm_reloads_in_the_original_layout_with_projector_and_matches_the_adapter(tmp_path):
    ckpt, adapter_dir = _train(tmp_path, "tiny-mgm")
    run = read_run_adapter(adapter_dir)  # the final export: adapter + non_lora_trainables, settings from config.yaml
    assert run.trainables and any(k.startswith("mm_projector.") for k in run.trainables)
    args = model_args_for(run, dtype="float32")
    loaded = build_trained_model(run, args)
    adapted, info = loaded.model, loaded.info
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.tensor([[2, 5, IMAGE_TOKEN_INDEX, 7, 8, 9]]),
              "attention_mask": torch.ones(1, 6, dtype=torch.long),
              "images": torch.randn(1, 3, info.image_size, info.image_size, generator=g),
              "images_aux": torch.randn(1, 3, info.image_size_aux, info.image_size_aux, generator=g)}
    with torch.no_grad():
        expected = adapted.eval()(**inputs).logits
    out = export_cli.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "merged"), "--merge",
                           "--dtype", "float32"])
    assert (out / "model.safetensors.index.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "mm_vision_tower" in config  # MGM's own config keys
    merged = load_mgm(out, torch.float32).eval()  # raises on any missing or unexpected key
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, **TOL)
    for name, tensor in run.trainables.items():  # the trained projector/mining weights are in the merged model
        torch.testing.assert_close(dict(merged.named_parameters())[name], tensor)


def test_export_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        read_run_adapter(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_run_adapter(tmp_path)
    from mgmlora.tools.export import RunAdapter

    with pytest.raises(ValueError, match="--model_path"):
        model_args_for(RunAdapter(tmp_path, None, {}, {}, {}))



def test_a_checkpoints_saved_settings_never_switch_on_remote_code(tmp_path):
    """The run's saved `trust_remote_code: true` is refused unless the user passes it; false stays false."""
    from mgmlora.tools.export import RunAdapter

    def run(trust):
        return RunAdapter(tmp_path, None, {}, {}, hparams={"model": {"model_path": str(tmp_path),
                                                                     "trust_remote_code": trust}})

    with pytest.raises(ValueError, match="--trust_remote_code"):
        model_args_for(run(True))
    assert model_args_for(run(True), trust_remote_code=True).trust_remote_code is True
    assert model_args_for(run(False)).trust_remote_code is False

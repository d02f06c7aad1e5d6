"""GPU checks (skipped without CUDA): bf16 training with fused AdamW, peak-memory logging, adapter export."""

import lightning as L
import pytest
import torch

from mgmlora.data.chameleons_datamodule import ChameleonsDataModule
from mgmlora.models.args import ModelArgs
from mgmlora.training.callbacks import AdapterExport, ThroughputMonitor
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.lora import LoraArgs
from mgmlora.training.module import LoraLitModule
from tests.conftest import ASSETS, TOKENIZER

pytestmark = pytest.mark.gpu


class _Devices(L.Callback):
    """Records where the LoRA weights live while training (Lightning moves the module back to CPU at teardown)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.devices = {p.device.type for n, p in pl_module.model.named_parameters() if "lora_" in n}


def test_bf16_fit_on_cuda_logs_memory_and_exports_the_adapter(tmp_path):
    model = ModelArgs(preset="tiny-qwen3-moe", tokenizer_path=str(TOKENIZER), dtype="bfloat16")
    module = LoraLitModule(model, LoraArgs(preset="chameleons", target_experts=True))
    data = ChameleonsDataModule(str(ASSETS / "chameleons_demo.json"), batch_size=4, max_length=512)
    data.connect(module.tokenizer, module.info)
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="gpu")
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=4, accumulate_grad_batches=2,
                        gradient_clip_val=1.0,
                        logger=logger, log_every_n_steps=1, enable_progress_bar=False, use_distributed_sampler=False,
                        callbacks=[ThroughputMonitor(), AdapterExport(), devices := _Devices()],
                        plugins=[AdapterCheckpointIO()])
    trainer.fit(module, data)
    assert devices.devices == {"cuda"}
    lora = [p for n, p in module.model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # adapters train in fp32 under bf16 autocast
    assert trainer.logged_metrics["perf/peak_mem_alloc_gib"] > 0
    assert torch.isfinite(trainer.logged_metrics["train/loss"])
    assert (tmp_path / "gpu" / "version_0" / "adapter" / "adapter_model.safetensors").is_file()


def _ds_summary(out, stage, accum=128):
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = dict(os.environ, MGM_TEST_ACCEL="gpu", MGM_TEST_ACCUM=str(accum), MGM_TEST_BASE=str(out.parent / "base"))
    out.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "ds_fit_resume.py"), str(out), str(stage),
                           "tiny-qwen3-moe"], capture_output=True, text=True, env=env, timeout=900, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_deepspeed_accumulate_128_matches_plain_and_saves_reloadable_adapters(tmp_path):
    """ZeRO-2 and ZeRO-3 on CUDA (bf16, 128 accumulated micro-batches, expert LoRA) against plain Lightning.

    Same logged window losses within bf16 tolerance, the same learning-rate schedule counted in optimizer steps,
    adapter-only checkpoints, and adapters that plain PEFT reloads bit for bit.
    """
    pytest.importorskip("deepspeed")
    runs = {stage: _ds_summary(tmp_path / f"stage{stage}", stage) for stage in (0, 2, 3)}
    for stage in (2, 3):
        assert runs[stage]["losses"] == pytest.approx(runs[0]["losses"], rel=2e-2), stage
        assert runs[stage]["lrs"] == pytest.approx(runs[0]["lrs"]), stage
        assert runs[stage]["lora_b_absmax_at_start"] == 0.0
        assert min(runs[stage]["adapter_numels"]) > 0 and runs[stage]["reload_max_abs_diff"] == 0.0
        assert runs[stage]["reloaded_lora_b_absmax"] > 0
    assert all(".lora_A." in k or ".lora_B." in k for k in runs[2]["model_state_keys"])
    assert runs[3]["z3_leaf_modules"] == ["Qwen3MoeSparseMoeBlock"]
    print({stage: {k: runs[stage][k] for k in ("losses", "lrs", "checkpoint_bytes")} for stage in runs})

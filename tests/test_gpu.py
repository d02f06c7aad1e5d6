"""GPU checks (skipped without CUDA): bf16 training with fused AdamW, peak-memory logging, adapter export."""

import lightning as L
import pytest
import torch

from mgmlora.callbacks import AdapterExport, ThroughputMonitor
from mgmlora.checkpoint import AdapterCheckpointIO
from mgmlora.data.persona import ChameleonsDataModule
from mgmlora.lora import LoraArgs
from mgmlora.models.causal_lm import ModelArgs
from mgmlora.module import LoraLitModule
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

"""One optimizer step of SGD(lr=1) over 4 accumulated micro-batches; prints the weight change as JSON.

    python tests/scripts/ds_accumulation.py {plain,lightning_ds,mgm_ds} STAGE

Runs on CPU: the DeepSpeed strategies are subclassed to skip their CUDA-only environment check and use gloo.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from mgmlora.training.strategies import MgmDeepSpeedStrategy  # noqa: E402

X = torch.tensor([[1.0], [2.0], [-1.0], [3.0]])
Y = torch.tensor([[0.5], [-1.0], [2.0], [1.0]])


def _cpu(cls):
    class Cpu(cls):
        def setup_environment(self):
            DDPStrategy.setup_environment(self)  # skip DeepSpeed's "CUDA only" check

        def _get_process_group_backend(self):
            return "gloo"

    return Cpu


class OneWeight(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.constant_(self.w.weight, 0.25)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.w(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def main():
    kind, stage = sys.argv[1], int(sys.argv[2])
    module = OneWeight()
    before = module.w.weight.item()
    kwargs = {}
    if kind != "plain":
        cls = _cpu(MgmDeepSpeedStrategy if kind == "mgm_ds" else DeepSpeedStrategy)
        kwargs["strategy"] = cls(stage=stage, parallel_devices=[torch.device("cpu", 0)])
    else:
        kwargs["accelerator"] = "cpu"
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **kwargs)
    trainer.fit(module, DataLoader(list(zip(X, Y)), batch_size=1))
    weight = module.w.weight
    if hasattr(weight, "ds_tensor"):  # ZeRO-3 partitions the parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            after = weight.item()
    else:
        after = weight.item()
    print(json.dumps({"delta": after - before, "before": before}))


if __name__ == "__main__":
    main()

"""Adapter-only checkpoints: a directory per checkpoint, in PEFT's format plus what resume needs.

    step=000010.ckpt/
        adapter_config.json              PEFT LoraConfig (loadable with peft.PeftModel.from_pretrained)
        adapter_model.safetensors        the adapter (and modules_to_save), never the frozen base
        non_lora_trainables.safetensors  other trained weights (MGM projector + mining), when there are any
        trainer_state.pt                 optimizer, scheduler, loop and callback state (tensors and plain containers)

The LightningModule puts the adapter under `checkpoint["peft"]` (absent without LoRA) and the other trained weights
under `checkpoint["trainables"]`, and empties `state_dict`; this CheckpointIO writes the pieces. Writes go to a
temporary sibling directory that is renamed into place, so a crash mid-save never leaves a half-written checkpoint
behind, and a previous checkpoint of the same name survives until the new one is complete. Loading uses
`torch.load(weights_only=True)`: no pickled code is executed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from peft import LoraConfig
from safetensors.torch import load_file, save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.pt"
TRAINABLES = "non_lora_trainables.safetensors"
RUN_SETTINGS = "mgmlora_run.json"  # beside an exported adapter: the run's hyperparameters (model, lora, ...)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Writes named tensors to one safetensors file (contiguous CPU copies, PEFT's "pt" format metadata)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def write_adapter(directory: Path, config: LoraConfig | dict, tensors: dict[str, torch.Tensor]) -> None:
    """Writes a PEFT adapter directory (the same files `PeftModel.save_pretrained` writes)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = config.to_dict() if isinstance(config, LoraConfig) else config
    config = LoraConfig(**{**config, "inference_mode": True})
    config.save_pretrained(str(directory))
    write_tensors(directory / ADAPTER_WEIGHTS, tensors)


def read_adapter(directory: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Reads a PEFT adapter directory written by `write_adapter` or `PeftModel.save_pretrained`."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not an mgmlora checkpoint: {name} is missing.")
    return LoraConfig.from_pretrained(str(directory)), load_file(directory / ADAPTER_WEIGHTS)


class AdapterCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO that stores adapter-only checkpoints as directories (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        """Atomically writes `checkpoint` to the directory `path`."""
        checkpoint = dict(checkpoint)
        peft, trainables = checkpoint.pop("peft", None), checkpoint.pop("trainables", None)
        if peft is None and not trainables:
            raise RuntimeError("AdapterCheckpointIO needs the LightningModule to put its adapter under "
                               "checkpoint['peft'] or its trained weights under checkpoint['trainables'] (mgmlora's "
                               "LoraLitModule does).")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            tmp.mkdir(parents=True)
            if peft is not None:
                write_adapter(tmp, peft["config"], peft["adapter"])
            if trainables:
                write_tensors(tmp / TRAINABLES, trainables)
            torch.save(checkpoint, tmp / TRAINER_STATE)
            if path.exists():
                old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Reads a checkpoint directory back into Lightning's checkpoint dict."""
        path = Path(path)
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} is not an mgmlora checkpoint directory (expected "
                                    f"{TRAINER_STATE} and {ADAPTER_WEIGHTS} and/or {TRAINABLES} inside).")
        checkpoint = torch.load(path / TRAINER_STATE, map_location=map_location or "cpu", weights_only=True)
        if (path / ADAPTER_CONFIG).is_file():
            config, adapter = read_adapter(path)
            checkpoint["peft"] = {"config": config, "adapter": adapter}
        if (path / TRAINABLES).is_file():
            checkpoint["trainables"] = load_file(path / TRAINABLES)
        return checkpoint

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Deletes a checkpoint directory (ModelCheckpoint's top-k rotation)."""
        shutil.rmtree(path, ignore_errors=True)

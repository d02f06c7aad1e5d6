"""The contract between the data side and the training step: label/placeholder ids and the typed micro-batch.

The DataModules produce `Batch`; `LoraLitModule.training_step` and the models consume it. Nothing else travels
from the data to the step, so this file is the whole interface (docs/design/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

IGNORE_INDEX = -100  # label of positions without a loss (PyTorch cross_entropy's ignore_index)
IMAGE_TOKEN_INDEX = -200  # placeholder id of one image in input_ids (MGM/LLaVA); expands to the image's embeddings


@dataclass
class Batch:
    """One right-padded micro-batch.

    Attributes:
        input_ids: (B, T) token ids; MGM rows hold one IMAGE_TOKEN_INDEX per image.
        attention_mask: (B, T) 1 on real tokens, 0 on padding.
        labels: (B, T) next-token targets, IGNORE_INDEX where nothing is supervised (position t predicts labels[t+1]).
        window_tokens: () long, the number of supervised tokens (after the causal shift) in this micro-batch's whole
            accumulation window on all ranks, counted by the WindowBatchSampler before the window's first backward.
            None when the loader has no window sampler (validation, plain loaders): see mgmlora.training.window.
        window_end: whether the optimizer steps after this micro-batch (the sampler decides; None without one).
        model_inputs: the model family's own inputs by the name its forward takes them, each (B, ...), e.g. an
            image-text family's image tensors (`Processor.image_inputs`, mgmlora.models.processor); empty for text.
        host: after `to` moved the batch off the CPU, the CPU batch it came from (its ids, mask and labels), so that
            shapes that depend on the data (sample lengths, image positions, supervised positions) are read on the
            host instead of from the device, where each read would make the host wait for the GPU (a sync). Set by
            `to` only (not a constructor argument, so `dataclasses.replace` never carries a stale copy); read-only.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    window_tokens: torch.Tensor | None = None
    window_end: bool | None = None
    model_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    host: Batch | None = field(default=None, init=False, repr=False, compare=False)

    def supervised_tokens(self) -> torch.Tensor:
        """() long on the batch's device: positions with a target after the causal shift (no host sync)."""
        return (self.labels[:, 1:] != IGNORE_INDEX).sum()

    def image_count(self) -> torch.Tensor:
        """() long: image placeholders in this micro-batch."""
        return (self.input_ids == IMAGE_TOKEN_INDEX).sum()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor on `device` (Lightning's transfer hook calls this).

        A copy from the CPU to a CUDA device is queued without blocking (Lightning passes `non_blocking` to plain
        tensors only): a blocking copy makes the host wait for all the work queued on the GPU, the previous
        micro-batch's backward. From pinned memory (the DataLoaders pin on CUDA machines) the copy is asynchronous;
        from pageable memory CUDA stages it before the call returns and may still wait. PyTorch keeps a pinned block
        until its copy is done; the CPU tensors must not be changed in place meanwhile (nothing here does). The CPU
        batch stays reachable as `host`.
        """
        device = torch.device(device)
        from_host = self.input_ids.device.type == "cpu" and device.type != "cpu"
        non_blocking = non_blocking or (from_host and device.type == "cuda")
        moved = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        moved = {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                 for k, v in moved.items()}
        moved["model_inputs"] = {k: v.to(device, non_blocking=non_blocking) for k, v in self.model_inputs.items()}
        out = replace(self, **moved)
        out.host = replace(self, model_inputs={}) if from_host else self.host
        return out

    def on_host(self) -> Batch | None:
        """This batch's ids, mask and labels on the CPU without a device sync: itself on the CPU, else `host`."""
        return self if self.input_ids.device.type == "cpu" else self.host

    def pin_memory(self) -> Batch:
        """Page-locked copies (DataLoader(pin_memory=True) calls this on custom batch types)."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)},
                       model_inputs={k: v.pin_memory() for k, v in self.model_inputs.items()})

    def __len__(self) -> int:
        return self.input_ids.shape[0]


__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "Batch"]

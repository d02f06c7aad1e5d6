"""Host-built tensors (positions, gather indices, labels) queued for the device without the host waiting.

A CPU tensor copied to a CUDA device with `non_blocking=True` is queued asynchronously only from pinned memory; from
ordinary (pageable) memory CUDA stages the copy and may wait for the work already queued on the stream (CUDA's "API
synchronization behavior"). The step builds small tensors on the host each micro-batch so that it never reads the
device (mgmlora.batch.Batch.on_host); pinning them first keeps their copies off the host's critical path too.
PyTorch's caching host allocator reuses a pinned block only after its copy has run.
"""

from __future__ import annotations

import torch


def queue_to(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` (on the CPU) on `device`: pinned and copied asynchronously to a CUDA device, else copied as usual."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


__all__ = ["queue_to"]

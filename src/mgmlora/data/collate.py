"""Padding collate: samples (and the sampler's window facts) -> one typed `Batch`."""

from __future__ import annotations

import torch

from mgmlora.batch import IGNORE_INDEX, Batch
from mgmlora.data.chat import TokenizedSample
from mgmlora.data.sampling import WindowKey


def pad_collate(samples: list[TokenizedSample], pad_id: int, window: WindowKey | None = None,
                pad_to_multiple_of: int = 8) -> Batch:
    """Right-pads a list of samples into a `Batch` of (B, T) `input_ids`, `attention_mask` and `labels`.

    T is the longest sample rounded up to `pad_to_multiple_of` (tensor-core friendly shapes on GPU). When the batch
    comes from a WindowBatchSampler, `window` (any of the micro-batch's keys: they share it) gives the accumulation
    window's supervised-token count over all ranks and whether this micro-batch ends the window.
    """
    longest = max(len(s.input_ids) for s in samples)
    t = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(samples), t), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(samples), t), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(samples), t), dtype=torch.long)  # (B, T)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        attention_mask[row, :n] = 1
    if window is None:
        return Batch(input_ids, attention_mask, labels)
    return Batch(input_ids, attention_mask, labels, torch.tensor(window.window_tokens, dtype=torch.long),
                 window_end=window.window_end)

"""Padding collate for text batches."""

from __future__ import annotations

import torch

from mgmlora.data.chat import IGNORE_INDEX, TokenizedSample


def pad_collate(samples: list[TokenizedSample], pad_id: int, window_tokens: int | None = None,
                pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pads a list of samples into `input_ids`, `attention_mask`, `labels` of shape (B, T).

    T is the longest sample rounded up to `pad_to_multiple_of` (tensor-core friendly shapes on GPU). When the batch
    comes from a WindowBatchSampler, `window_tokens` (the accumulation window's supervised-token count over all ranks)
    travels with it as a 0-d tensor.
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
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if window_tokens is not None:
        batch["window_tokens"] = torch.tensor(window_tokens, dtype=torch.long)
    return batch

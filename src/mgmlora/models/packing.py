"""Padding-free micro-batches: the samples of one micro-batch as one row, each sample a segment of its own.

The one place that builds a packed row, for text models (token ids) and MGM (input embeddings) alike. With
`speed.packing`, B right-padded rows become one (1, N) row of their real positions; position ids restart at every
sample, from which transformers derives the per-sample causal mask, and mgmlora's packed attention reads the segment
lengths (mgmlora.models.attention). The window normalisation is untouched: the supervised tokens are the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mgmlora.batch import IGNORE_INDEX, Batch
from mgmlora.models.attention import bucket_padding
from mgmlora.models.transfer import queue_to


@dataclass
class PackedRow:
    """One packed row.

    Attributes:
        values: (1, N, ...) the samples' ids (1, N) or embeddings (1, N, H), then the padding segment if any.
        positions: (1, N) position ids restarting at 0 in every segment.
        labels: (1, N) or None; each segment's first label is IGNORE_INDEX.
        lengths: positions per segment, padding segment included (for the packed attention kernels).
        host_labels: `labels` on the CPU where they were built there (the loss then selects its positions without
            a device sync), else None.
    """

    values: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor | None
    lengths: list[int]
    host_labels: torch.Tensor | None = None


def pack_rows(rows: list[torch.Tensor] | tuple[torch.Tensor, ...], label_rows: list[torch.Tensor] | None,
              pad_to: int = 0) -> PackedRow:
    """Concatenates per-sample rows (n_i, ...) into one row, padded to a multiple of `pad_to` positions (0 = off).

    The padding is a trailing segment of zeros with ignored labels, so the GPU sees a few distinct shapes instead
    of one per row length (mgmlora.models.attention.bucket_padding) and no real sample attends to it. Every segment's
    first label becomes IGNORE_INDEX: after the causal shift it would be the target of the previous segment's last
    position. It is never a target in the padded layout either (the shift drops column 0), so the supervised
    positions are exactly those of the padded batch. The labels are packed on the CPU and copied once; the result
    keeps them as `host_labels`.
    """
    rows, lengths = list(rows), [int(r.shape[0]) for r in rows]
    labels = list(label_rows) if label_rows is not None else None
    if pad := bucket_padding(sum(lengths), pad_to):
        rows.append(rows[0].new_zeros((pad, *rows[0].shape[1:])))
        if labels is not None:
            labels.append(labels[0].new_full((pad,), IGNORE_INDEX))
        lengths.append(pad)
    device = rows[0].device
    # built on the host and copied once: one transfer instead of a kernel per segment, and no sync
    host_positions = torch.cat([torch.arange(n) for n in lengths])  # (N,)
    positions = queue_to(host_positions, device)[None]  # (1, N)
    packed_labels = host_labels = None
    if labels is not None:  # on the CPU (a copy first where a caller passes device labels: that waits for the GPU)
        host_labels = torch.cat(labels).cpu().masked_fill(host_positions == 0, IGNORE_INDEX)[None]  # (1, N)
        packed_labels = queue_to(host_labels, device)
    return PackedRow(torch.cat(rows)[None], positions, packed_labels, lengths, host_labels)


def pack_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                pad_to: int = 0, host: Batch | None = None) -> PackedRow:
    """Right-padded (B, T) token rows -> one packed row.

    With `host` (the same batch on the CPU, `Batch.on_host`) the sample lengths, the real positions and the labels
    come from there (the device `attention_mask` and `labels` are not read), and the row is gathered on the device
    without a sync; without it, the mask and labels are copied to the CPU first, which waits for the GPU.
    """
    host_mask = host.attention_mask if host is not None else attention_mask.cpu()  # (B, T) on the CPU
    host_labels = None if labels is None else host.labels if host is not None else labels.cpu()
    keep = host_mask.bool()
    lengths = [n for n in host_mask.sum(-1).tolist() if n]
    index = queue_to(keep.flatten().nonzero().squeeze(1), input_ids.device)  # (N,) flat real positions
    rows = input_ids.flatten().index_select(0, index).split(lengths)
    label_rows = host_labels[keep].split(lengths) if host_labels is not None else None
    return pack_rows(rows, label_rows, pad_to)


__all__ = ["PackedRow", "pack_padded", "pack_rows"]

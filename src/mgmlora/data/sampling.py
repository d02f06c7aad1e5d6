"""Batches grouped into gradient-accumulation windows, with the window's supervised-token count attached.

Why: the loss must be normalised by the number of supervised tokens of the *whole* optimizer step (every micro-batch
of the accumulation window, on every rank), so that `accumulate_grad_batches=4` with batch 1 gives the same gradient
as batch 4 without accumulation. A per-micro-batch mean weights short samples up; a mean of means is wrong whenever
lengths differ. The count must be known when the window's *first* micro-batch is processed, before any backward.
Every rank draws the same global permutation from (seed, epoch), so each rank can count the tokens of all ranks'
micro-batches itself, with no communication. The sampler also resumes mid-epoch by skipping consumed batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler


@dataclass(frozen=True)
class WindowKey:
    """What the dataset receives instead of a bare index: the index and its window's global token count."""

    index: int
    window_tokens: int


class SeededPermutation(Sampler[int]):
    """The epoch's global sample order: a permutation drawn from `seed + epoch` (or dataset order).

    It is the `.sampler` of WindowBatchSampler because Lightning calls `set_epoch` on `batch_sampler.sampler`.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())


class WindowBatchSampler(Sampler[list[WindowKey]]):
    """Deterministic, distributed-aware batch sampler whose batches know their accumulation window's token count.

    Args:
        num_supervised: supervised-token count of every sample, in dataset order.
        batch_size: micro-batch size per rank.
        accumulate: micro-batches per optimizer step (the trainer's accumulate_grad_batches).
        shuffle: draw a new permutation each epoch (seeded by `seed + epoch`); else dataset order.
        seed: base seed of the permutation; identical on every rank.
        rank: this process's rank; world_size: number of data-parallel ranks.
        drop_last: drop the final global batch when it is incomplete; otherwise it is filled by wrapping around to the
            start of the permutation (like torch's DistributedSampler), so every rank runs the same number of steps.
        whole_windows: keep only whole accumulation windows in each epoch. Needed under DeepSpeed, which steps every
            `accumulate` micro-batches across epoch boundaries (plain Lightning steps at each epoch's end), so a
            partial last window would be merged with the next epoch's first one and mis-normalised.
    """

    def __init__(self, num_supervised: Sequence[int], batch_size: int, accumulate: int = 1, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 whole_windows: bool = False):
        if batch_size < 1 or accumulate < 1:
            raise ValueError(f"batch_size ({batch_size}) and accumulate ({accumulate}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_supervised = list(num_supervised)
        self.sampler = SeededPermutation(len(self.num_supervised), shuffle, seed)
        self.batch_size, self.accumulate = batch_size, accumulate
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.whole_windows = whole_windows
        if whole_windows and self._batches_per_epoch() == 0:
            raise ValueError(f"one epoch holds {self._raw_batches()} global batch(es), fewer than one accumulation "
                             f"window ({accumulate}); under DeepSpeed every optimizer step needs a whole window. Add "
                             "data, or lower accumulate_grad_batches or the batch size.")
        self._resume: tuple[int, int] | None = None  # (epoch, batches already consumed in it)

    @property
    def epoch(self) -> int:
        """The current epoch (set through `self.sampler.set_epoch`)."""
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of the underlying permutation."""
        self.sampler.set_epoch(epoch)

    def resume_from(self, epoch: int, batches_consumed: int) -> None:
        """Skip the first `batches_consumed` batches when iterating `epoch` (mid-epoch resume)."""
        self._resume = (epoch, batches_consumed)

    def _global_batches(self) -> list[list[int]]:
        n = len(self.num_supervised)
        order = list(self.sampler)
        step = self.batch_size * self.world_size
        if n % step and not self.drop_last:
            order += (order * (step // n + 1))[: step - n % step]
        batches = [order[i : i + step] for i in range(0, len(order) - step + 1, step)]
        return batches[: self._batches_per_epoch()]

    def _raw_batches(self) -> int:
        n, step = len(self.num_supervised), self.batch_size * self.world_size
        return n // step if self.drop_last else -(-n // step)

    def _batches_per_epoch(self) -> int:
        raw = self._raw_batches()
        return raw - raw % self.accumulate if self.whole_windows else raw

    def __len__(self) -> int:
        return self._batches_per_epoch()

    def __iter__(self) -> Iterator[list[WindowKey]]:
        batches = self._global_batches()
        skip = self._resume[1] if self._resume and self._resume[0] == self.epoch else 0
        for w in range(0, len(batches), self.accumulate):
            window = batches[w : w + self.accumulate]
            tokens = sum(self.num_supervised[i] for batch in window for i in batch)
            for j, batch in enumerate(window):
                if w + j < skip:
                    continue
                mine = batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
                yield [WindowKey(i, tokens) for i in mine]

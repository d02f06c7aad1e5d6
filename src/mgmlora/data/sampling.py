"""Batches grouped into gradient-accumulation windows, with the window's supervised-token count attached.

Why: the loss must be normalised by the number of supervised tokens of the *whole* optimizer step (every micro-batch
of the accumulation window, on every rank), so that `accumulate_grad_batches=4` with batch 1 gives the same gradient
as batch 4 without accumulation. A per-micro-batch mean weights short samples up; a mean of means is wrong whenever
lengths differ. The count must be known when the window's *first* micro-batch is processed, before any backward.
Every rank draws the same global permutation from (seed, epoch), so each rank can count the tokens of all ranks'
micro-batches itself, with no communication. The sampler also resumes mid-epoch by skipping consumed batches.

WindowBatchSampler fills micro-batches with `batch_size` samples; TokenBudgetBatchSampler fills them up to a budget of
positions (length-grouped), for sequence packing, where a micro-batch costs the sum of its samples' lengths;
BalancedWindowBatchSampler fixes the samples per optimizer step and spreads each window's samples over its
micro-batches with balanced position counts.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowKey:
    """What the dataset receives instead of a bare index: the index and its accumulation window's facts.

    `window_tokens` is the window's supervised-token count over all ranks; `window_end` says whether this key's
    micro-batch is the window's last (the optimizer steps after it): the one place a window's end is decided.
    """

    index: int
    window_tokens: int
    window_end: bool = False


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
        return iter(self.order(self.epoch))

    def order(self, epoch: int) -> list[int]:
        """The sample order of `epoch` (the current one or any other)."""
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()


class WindowBatchSampler(Sampler[list[WindowKey]]):
    """Deterministic, distributed-aware batch sampler whose batches know their accumulation window's token count.

    The epoch is a list of global steps of `world_size` micro-batches each (rank r takes the r-th); every rank
    builds the same list from (seed, epoch), so each rank yields the same number of micro-batches and can count the
    supervised tokens of all ranks' micro-batches of its window itself. Subclasses change only how the micro-batches
    are formed (`_micro_batches`, `_raw_steps`); windows, sharding and resume are shared.

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

    `limit` cuts the epochs where the trainer's `limit_train_batches` stops them.
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
        self.cap: int | None = None  # micro-batches per rank Lightning runs per epoch (`limit`), None: all
        if whole_windows and self._steps_per_epoch() == 0:
            raise ValueError(f"one epoch holds {self._raw_steps()} global batch(es), fewer than one accumulation "
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

    def _micro_batches(self) -> list[list[int]]:
        """The epoch's micro-batches of every rank: global step s is [s * world_size, (s + 1) * world_size).

        Its length is a multiple of world_size (the last incomplete global batch wrapped around or dropped).
        """
        order = _to_multiple(list(self.sampler), self.batch_size * self.world_size, self.drop_last)
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _raw_steps(self) -> int:
        """Global steps of the current epoch before `whole_windows` trimming (what `_micro_batches` holds)."""
        n, step = len(self.num_supervised), self.batch_size * self.world_size
        return n // step if self.drop_last else -(-n // step)

    def _steps_per_epoch(self) -> int:
        raw = self._raw_steps()
        return raw - raw % self.accumulate if self.whole_windows else raw

    def __len__(self) -> int:
        return self._steps_per_epoch()

    def limit(self, limit_batches: int | float) -> None:
        """Cuts every epoch, and so its last window, where Lightning stops it under `trainer.limit_train_batches`.

        Lightning counts an epoch's micro-batches once per loader build: `len()` of the epoch the loader is built
        for, limited (an int: at most that many; a float: that share, rounded down), and ends every epoch there or
        where the loader runs out. Call this when the loader is built, with `len()` already that epoch's. The windows
        are then cut where the epoch stops, so the last one's token count covers only micro-batches that run (else
        its loss would be normalised over ones that never do, and its end never come). `len()` stays the whole
        epoch's, which Lightning limits itself.

        Raises:
            ValueError: with `whole_windows` (DeepSpeed, which steps every `accumulate` micro-batches across epochs),
                a limit that cuts an epoch inside a window: its micro-batches would join the next epoch's window.
        """
        steps = len(self)
        cap = min(steps, limit_batches if isinstance(limit_batches, int) else int(steps * limit_batches))
        if self.whole_windows and cap < steps and cap % self.accumulate:
            raise ValueError(f"trainer.limit_train_batches={limit_batches} stops each epoch after {cap} "
                             f"micro-batch(es), inside an accumulation window of {self.accumulate}; under DeepSpeed "
                             "every optimizer step needs a whole window. Set limit_train_batches to a multiple of "
                             "accumulate_grad_batches.")
        self.cap = cap if cap < steps else None

    def _steps_run(self) -> int:
        """Global steps this epoch runs: `len()`, at most the cap Lightning stops it at (`limit`)."""
        steps = self._steps_per_epoch()
        return steps if self.cap is None else min(steps, self.cap)

    def __iter__(self) -> Iterator[list[WindowKey]]:
        batches, world = self._micro_batches(), self.world_size  # (steps * world) lists of indices
        steps = self._steps_run()
        skip = self._resume[1] if self._resume and self._resume[0] == self.epoch else 0
        for w in range(0, steps, self.accumulate):
            window = range(w, min(w + self.accumulate, steps))
            tokens = sum(self.num_supervised[i] for s in window for batch in batches[s * world : (s + 1) * world]
                         for i in batch)
            for s in window:
                if s >= skip:
                    yield [WindowKey(i, tokens, s == window[-1]) for i in batches[s * world + self.rank]]


def _to_multiple(items: list, multiple: int, drop_last: bool) -> list:
    """`items` cut to a multiple of `multiple` (drop_last), or filled up to one by cycling from its start.

    How both samplers make every rank run the same number of micro-batches (like torch's DistributedSampler).
    """
    short = len(items) % multiple
    if not short:
        return items
    if drop_last:
        return items[:-short]
    return items + (items * (multiple // len(items) + 1))[: multiple - short]


def pack_by_cost(indices: Sequence[int], costs: Sequence[int], max_tokens: int, max_samples: int) -> list[list[int]]:
    """Greedily cuts `indices`, in their given order, into micro-batches of summed cost <= max_tokens.

    A micro-batch also closes at `max_samples` samples. A sample costlier than `max_tokens` on its own gets a
    micro-batch of its own: it is never dropped, and the caller reports it.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in indices:
        if current and (used + costs[i] > max_tokens or len(current) == max_samples):
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += costs[i]
    if current:
        batches.append(current)
    return batches


class TokenBudgetBatchSampler(WindowBatchSampler):
    """A WindowBatchSampler whose micro-batches hold up to `max_tokens` positions instead of `batch_size` samples.

    Why: with sequence packing a micro-batch costs the sum of its samples' lengths, so a fixed sample count either
    wastes memory on short samples or runs out of it on long ones; a position budget keeps every step near the
    memory the run was sized for. Per epoch: the seeded global permutation is cut into mega-chunks of about
    `chunk_steps` global steps' worth of samples; each chunk is sorted by cost (stably, so equal costs keep their
    random order) and packed greedily (`pack_by_cost`). Sorting inside chunks only keeps the micro-batches' make-up
    random from epoch to epoch while their samples have similar lengths (little padding when packing is off).
    The micro-batch order is then shuffled from (seed, epoch), so long and short micro-batches interleave rather
    than each chunk running from short to long. Rank sharding, accumulation windows and resume are the parent's.

    The number of micro-batches depends on the packing, hence on the epoch: `len()` is exact for the current epoch
    (call `set_epoch` first). Lightning reads it when the loader is built: its LR schedule total
    (`estimated_stepping_batches`) is estimated from the count at fit start, and it ends every epoch at that count,
    which cuts short a later epoch that packs into more micro-batches unless the loader is rebuilt each epoch
    (`trainer.reload_dataloaders_every_n_epochs: 1`).

    Args:
        num_supervised: supervised-token count of every sample, in dataset order.
        costs: positions every sample occupies in the model (image positions included), in dataset order.
        max_tokens: summed cost per micro-batch; a single sample above it gets a micro-batch of its own (logged).
        batch_size: most samples per micro-batch (null: no cap).
        accumulate: micro-batches per optimizer step (the trainer's accumulate_grad_batches).
        shuffle: new permutation and micro-batch order each epoch; else dataset order, packed in order.
        seed: base seed of both shuffles; identical on every rank.
        rank: this process's rank; world_size: number of data-parallel ranks.
        drop_last: drop the last incomplete global step; otherwise it is filled with the epoch's first micro-batches.
        whole_windows: keep only whole accumulation windows in each epoch (DeepSpeed; see WindowBatchSampler).
        chunk_steps: global steps' worth of samples per length-sorted mega-chunk (larger: less padding, less
            randomness in which samples share a micro-batch).
    """

    _ORDER_STREAM = 1 << 40  # keeps the micro-batch order's generator apart from the permutation's (seed + epoch)

    def __init__(self, num_supervised: Sequence[int], costs: Sequence[int], max_tokens: int,
                 batch_size: int | None = None, accumulate: int = 1, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False, whole_windows: bool = False,
                 chunk_steps: int = 64):
        if len(costs) != len(num_supervised):
            raise ValueError(f"{len(costs)} costs for {len(num_supervised)} samples")
        if max_tokens < 1 or chunk_steps < 1:
            raise ValueError(f"max_tokens ({max_tokens}) and chunk_steps ({chunk_steps}) must be >= 1")
        self.costs, self.max_tokens, self.chunk_steps = list(costs), max_tokens, chunk_steps
        self._packed: tuple[int, list[list[int]]] | None = None  # (epoch, its micro-batches)
        super().__init__(num_supervised, batch_size if batch_size is not None else max(len(self.costs), 1),
                         accumulate, shuffle, seed, rank, world_size, drop_last, whole_windows)
        oversize = sum(c > max_tokens for c in self.costs)
        if oversize and rank == 0:
            log.warning("%d sample(s) cost more than max_tokens=%d positions (longest: %d); each is a micro-batch of "
                        "its own, above the budget.", oversize, max_tokens, max(self.costs))

    def _chunk_size(self) -> int:
        """Samples per mega-chunk: `chunk_steps` global steps of the mean number of samples a budget holds."""
        per_batch = self.max_tokens * len(self.costs) // max(sum(self.costs), 1)
        return self.chunk_steps * self.world_size * max(1, min(self.batch_size, per_batch))

    def _micro_batches(self) -> list[list[int]]:
        if self._packed is not None and self._packed[0] == self.epoch:
            return self._packed[1]
        order, chunk = list(self.sampler), self._chunk_size()
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            by_cost = sorted(order[start : start + chunk], key=self.costs.__getitem__)
            batches += pack_by_cost(by_cost, self.costs, self.max_tokens, self.batch_size)
        if self.sampler.shuffle:
            generator = torch.Generator().manual_seed(self.sampler.seed + self.epoch + self._ORDER_STREAM)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        batches = _to_multiple(batches, self.world_size, self.drop_last)
        self._packed = (self.epoch, batches)
        return batches

    def _raw_steps(self) -> int:
        return len(self._micro_batches()) // self.world_size


def balance_by_cost(indices: Sequence[int], costs: Sequence[int], bins: int) -> list[list[int]]:
    """Splits `indices` into `bins` groups of near-equal summed cost (longest-processing-time first).

    Samples go, costliest first (ties: lower index first), to the group with the smallest cost so far (ties: lower
    group number), so the result depends only on the inputs. Needs at least as many indices as bins: no group is
    empty.
    """
    if len(indices) < bins:
        raise ValueError(f"{len(indices)} samples cannot fill {bins} micro-batches")
    groups: list[list[int]] = [[] for _ in range(bins)]
    loads = [(0, g) for g in range(bins)]  # (summed cost, group), a min-heap
    for i in sorted(indices, key=lambda i: (-costs[i], i)):
        load, g = heapq.heappop(loads)
        groups[g].append(i)
        heapq.heappush(loads, (load + costs[i], g))
    return groups


class BalancedWindowBatchSampler(WindowBatchSampler):
    """A WindowBatchSampler whose optimizer step holds `window_samples` samples per rank in `accumulate` micro-batches.

    Why: a recipe fixes the samples per optimizer step (MGM: 128) and its per-token loss normalisation, while how those
    samples are grouped into micro-batches is free. One sample per micro-batch leaves the GPU idle between small
    kernels; a fixed number of packed samples per micro-batch sizes memory for the longest ones. Here each window's
    samples (all ranks: `window_samples * world_size`, taken in the seeded permutation's order) are split into
    `accumulate * world_size` micro-batches of near-equal positions (`balance_by_cost`), so the micro-batches stay
    close to the window's mean cost and Lightning still steps every `accumulate` micro-batches. The gradient of a
    step equals that of the same samples one per micro-batch: the window's token count normalises both.

    An epoch that is not a whole number of windows is filled by wrapping around to the permutation's start (or its
    last window dropped with `drop_last`), so every window holds exactly `window_samples * world_size` samples.

    Args:
        num_supervised: supervised-token count of every sample, in dataset order.
        costs: positions every sample occupies in the model (image positions included), in dataset order.
        window_samples: samples per optimizer step per rank (the global batch is this times world_size).
        accumulate: micro-batches per optimizer step (the trainer's accumulate_grad_batches); at most window_samples.
        max_tokens: positions every micro-batch stays within (optional), checked for the run's epochs by
            `check_budget` before training.
        shuffle, seed, rank, world_size, drop_last, whole_windows: as WindowBatchSampler.
    """

    def __init__(self, num_supervised: Sequence[int], costs: Sequence[int], window_samples: int, accumulate: int = 1,
                 max_tokens: int | None = None, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, whole_windows: bool = False):
        if len(costs) != len(num_supervised):
            raise ValueError(f"{len(costs)} costs for {len(num_supervised)} samples")
        if not 1 <= accumulate <= window_samples:
            raise ValueError(f"accumulate_grad_batches ({accumulate}) must be between 1 and window_samples "
                             f"({window_samples}): every micro-batch needs at least one sample")
        if drop_last and len(costs) < window_samples * world_size:
            raise ValueError(f"{len(costs)} samples are fewer than one window of {window_samples} x {world_size} "
                             "rank(s), and drop_last drops it")
        self.costs, self.window_samples, self.max_tokens = list(costs), window_samples, max_tokens
        self._balanced: tuple[int, list[list[int]]] | None = None  # (epoch, its micro-batches)
        super().__init__(num_supervised, window_samples, accumulate, shuffle, seed, rank, world_size, drop_last,
                         whole_windows)

    def _micro_batches(self) -> list[list[int]]:
        if self._balanced is None or self._balanced[0] != self.epoch:
            self._balanced = (self.epoch, self._epoch_batches(self.epoch, self.accumulate))
        return self._balanced[1]

    def _epoch_batches(self, epoch: int, accumulate: int) -> list[list[int]]:
        """Every rank's micro-batches of `epoch`: global step s is [s * world_size, (s + 1) * world_size)."""
        per_window, bins = self.window_samples * self.world_size, accumulate * self.world_size
        order = _to_multiple(self.sampler.order(epoch), per_window, self.drop_last)
        return [batch for start in range(0, len(order), per_window)
                for batch in balance_by_cost(order[start : start + per_window], self.costs, bins)]

    def largest(self, epochs: Sequence[int], accumulate: int) -> tuple[int, int]:
        """(positions of the largest micro-batch, its epoch) over `epochs` at `accumulate` micro-batches per window."""
        return max((sum(self.costs[i] for i in batch), epoch) for epoch in epochs
                   for batch in self._epoch_batches(epoch, accumulate))

    def check_budget(self, epochs: Sequence[int]) -> None:
        """Raises ValueError, before any step runs, when a micro-batch of `epochs` holds more than `max_tokens`.

        The message names the smallest accumulate_grad_batches whose micro-batches all stay within it. Why: the
        micro-batch count per window is fixed (Lightning steps every `accumulate` micro-batches), so the budget is
        met by choosing it, and a window of long samples must not run out of memory hours into the run.
        """
        if self.max_tokens is None or not epochs:
            return
        largest_per_epoch = [self.largest([e], self.accumulate) for e in epochs]  # [(positions, epoch)]
        over = [e for largest, e in largest_per_epoch if largest > self.max_tokens]
        if not over:
            return
        largest, epoch = max(largest_per_epoch)
        fits = next((a for a in range(self.accumulate + 1, self.window_samples + 1)  # searched on the failing epochs
                     if self.largest(over, a)[0] <= self.max_tokens), None)
        fix = (f"set trainer.accumulate_grad_batches to {fits} or more" if fits else
               f"a single sample holds {max(self.costs)} positions: raise data.max_tokens to at least that")
        raise ValueError(f"data.max_tokens={self.max_tokens}: epoch {epoch} has a micro-batch of {largest} positions "
                         f"(data.window_samples {self.window_samples} over trainer.accumulate_grad_batches "
                         f"{self.accumulate}); {fix}, or raise data.max_tokens if the memory allows.")

    def _raw_steps(self) -> int:
        n, per_window = len(self.num_supervised), self.window_samples * self.world_size
        windows = n // per_window if self.drop_last else -(-n // per_window)
        return windows * self.accumulate

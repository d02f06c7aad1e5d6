"""Random-number state of training, saved in checkpoints so that a resumed run draws what the unbroken run drew.

LoRA dropout draws from torch's global generator (CUDA's on a GPU). Restoring that state once when training resumes
is not enough: between two training steps other code draws from the same generators, and not identically in an
unbroken and a resumed run (a DataLoader draws a worker seed when its iterator is created: at each epoch start in the
unbroken run, at the resume in the resumed one; validation creates iterators too). So training owns its own stream:
`TrainingRng.enter()` at the start of each training micro-batch sets the generators to the state the previous
micro-batch left (`leave()`), and the checkpoint stores that state, per rank. Whatever runs between micro-batches
draws from the generators as before but no longer shifts what training draws.

Saved per rank: torch's CPU generator, the current CUDA device's generator (where CUDA is in use), Python's `random`
and NumPy's global generator, as tensors, ints, floats and strings only (checkpoints load with `weights_only=True`).
Data loading draws nothing: the samplers shuffle with their own seeded generators (mgmlora.data.sampling) and
DataLoader workers only collate and decode images, so worker seeds do not matter.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

RNG_KEY = "rng_states"  # the checkpoint entry: one state per rank, indexed by global rank


def capture() -> dict[str, Any]:
    """This process's generator states (see the module docstring), in weights_only-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, torch.tensor(mt, dtype=torch.int64), gauss_next],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: each rank trains on one
    return state


def restore(state: dict[str, Any]) -> None:
    """Sets this process's generators to `state` (from `capture`)."""
    torch.set_rng_state(state["torch"])
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's `state`, indexed by global rank (a collective when torch.distributed runs: all ranks call it).

    Needed because one process writes the checkpoint (rank 0 under DDP; DeepSpeed's client state lives in rank 0's
    model-states file only).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


class TrainingRng:
    """The random-number stream of training micro-batches, isolated from what runs between them (module docstring)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None  # None: nothing to restore (a fresh run before its first micro-batch)
        self.window_start: dict[str, Any] | None = None  # the stream where the current accumulation window began

    def enter(self, starts_window: bool = False) -> None:
        """At the start of a training micro-batch: continue the stream where the previous micro-batch left it.

        `starts_window`: the micro-batch is its accumulation window's first; the stream's state here is kept, so that
        a checkpoint taken inside the window (wound back to its start: mgmlora.training.preemption) can store it.
        """
        if self.state is not None:
            restore(self.state)
        if starts_window:
            self.window_start = self.state if self.state is not None else capture()

    def leave(self) -> None:
        """At the end of a training micro-batch's forward: remember where the stream is."""
        self.state = capture()

    def save(self, at_window_start: bool = False) -> list[dict[str, Any]]:
        """Every rank's stream state for the checkpoint (a collective under torch.distributed).

        `at_window_start`: the checkpoint describes the start of the current window (it was taken inside one), so the
        state there is saved, not the one its finished micro-batches left: the resumed run replays the window with
        the dropout masks the unbroken run drew.
        """
        if at_window_start and self.window_start is not None:
            return gather(self.window_start)
        return gather(self.state if self.state is not None else capture())

    def load(self, states: list[dict[str, Any]] | None, rank: int, world_size: int) -> str | None:
        """Takes this rank's state from a checkpoint; returns why it could not (then the stream starts afresh)."""
        if not states:
            return "the checkpoint holds no random-number state (written before mgmlora saved it)"
        if len(states) != world_size:
            return f"the checkpoint holds the random-number states of {len(states)} ranks, this run has {world_size}"
        self.state = states[rank]
        self.window_start = None
        return None

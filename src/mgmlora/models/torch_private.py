"""Every private attribute of PyTorch that mgmlora reads or writes, in one place, each with why.

PyTorch offers no public way for these; tests/models/test_torch_private.py fails when a release renames or removes
one, so an upgrade breaks loudly here instead of silently in a benchmark or an estimate.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.profiler import profile


def uncompile(module: nn.Module) -> None:
    """Undoes `module.compile()`: calls run the eager forward again.

    `nn.Module.compile` keeps the compiled call in `_compiled_call_impl` and has no public inverse; the benchmark
    compares compiled and eager variants on one loaded model instead of loading it twice.
    """
    module._compiled_call_impl = None


def allocation_events(prof: profile) -> Iterator[tuple[int, int]]:
    """(start time in ns, bytes) of every allocation (positive) and free (negative) a `profile_memory` run recorded.

    The public `prof.events()` attributes memory to operators (net per op), which loses the moment of the peak; the
    raw timeline is only on the profiler's kineto results.
    """
    for event in prof.profiler.kineto_results.events():
        if event.name() == "[memory]":
            yield event.start_ns(), event.nbytes()


def stack_config() -> torch._C._profiler._ExperimentalConfig:
    """The profiler setting under which `with_stack=True` records each operator's Python stack.

    Without it, recent PyTorch records empty stacks; the loop profile (bench/loop_timing.py) uses the stacks to name
    the line behind each host wait.
    """
    return torch._C._profiler._ExperimentalConfig(verbose=True)


__all__ = ["allocation_events", "stack_config", "uncompile"]

"""How much of the real `fit` loop's time the GPU spends inside micro-batches: the loop-overhead figure.

bench/fit_smoke.py adds `MicroBatchTiming` to every run it measures. CUDA events are recorded on the compute stream at
`on_train_batch_start` (the batch is fetched, not yet moved or run) and at `on_train_batch_end` (its forward, backward
and, at the end of a window, the optimizer step are queued). Read on the GPU's clock after the run:

- `in_batch_s`: the sum over micro-batches of end - start: what an isolated step of the same shapes costs (its
  kernels plus any launch gaps inside it);
- `span_s`: from the first measured micro-batch's start to the last one's end;
- `loop_overhead` = 1 - in_batch_s / span_s: the share of the loop's time between micro-batches (data loading,
  host-to-device copies, Lightning's and DeepSpeed's per-batch hooks, logging). `in_batch_tokens_per_s` is the speed
  the loop would run at without it, at the loop's own shapes.

The first `skip_steps` optimizer steps are left out (compilation and allocator warm-up). No synchronisation happens
during the run, so measuring does not slow it down; events are read once at the end.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import torch

from mgmlora.models.torch_private import stack_config


class MicroBatchTiming(L.Callback):
    """Records one CUDA event pair per micro-batch after the first `skip_steps` optimizer steps."""

    def __init__(self, skip_steps: int = 2):
        self.skip_steps = skip_steps
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start: torch.cuda.Event | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        self._start = None
        if torch.cuda.is_available() and trainer.global_step >= self.skip_steps:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if self._start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self._start, end))
            self._start = None

    def summary(self, tokens: float | None = None) -> dict:
        """The figures above (seconds, shares); `tokens` (positions in the measured micro-batches) adds tokens/s."""
        if not self.events:
            return {"loop_overhead": None, "measured_micro_batches": 0}
        torch.cuda.synchronize()
        in_batch = sum(start.elapsed_time(end) for start, end in self.events) / 1e3
        span = self.events[0][0].elapsed_time(self.events[-1][1]) / 1e3
        result = {"measured_micro_batches": len(self.events), "skipped_optimizer_steps": self.skip_steps,
                  "in_batch_s": round(in_batch, 3), "span_s": round(span, 3),
                  "loop_overhead": round(1 - in_batch / span, 4)}
        if tokens:
            result |= {"loop_tokens_per_s": round(tokens / span, 1),
                       "in_batch_tokens_per_s": round(tokens / in_batch, 1)}
        return result


# Host calls that block the CPU until the GPU catches up (or that a blocking copy turns into such a wait): where the
# loop's host falls behind the device. Runtime API names as torch.profiler (Kineto) records them, and the aten ops
# that read a device value on the host.
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpyAsync", "aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero")


def annotation(event) -> bool:
    """A range the code or the profiler marked (`record_function`, Lightning's hooks, the profiler's step), not an op.

    On a GPU such ranges also come back as device events spanning their kernels: counted as device activity they
    would fill the idle gaps, and counted as operators take a whole step's or hook's time.
    """
    return bool(getattr(event, "is_user_annotation", False)) or event.key.startswith("ProfilerStep")


def busy_and_gaps(intervals: list[tuple[float, float, str]], top: int = 5) -> dict:
    """Device activity (start_us, end_us, name) -> busy time, span, idle share and the largest idle gaps.

    Overlapping intervals (kernels on several streams, copies beside kernels) count once. Each gap names the activity
    that ended before it and the one that started after it: where in the loop the device waited for the host.
    """
    if not intervals:
        return {"span_s": 0.0, "busy_s": 0.0, "idle_share": None, "largest_gaps": []}
    intervals = sorted(intervals)
    busy, gaps = 0.0, []
    start, end, last_name = intervals[0][0], intervals[0][1], intervals[0][2]
    for s, e, name in intervals[1:]:
        if s > end:  # a gap: the device had nothing to run
            busy += end - start
            gaps.append((s - end, last_name, name))
            start, end = s, e
        elif e > end:
            end = e
        if e >= end:
            last_name = name
    busy += end - start
    span = max(e for _, e, _ in intervals) - intervals[0][0]
    gaps.sort(key=lambda g: -g[0])
    return {"span_s": round(span / 1e6, 6), "busy_s": round(busy / 1e6, 6),
            "idle_share": round(1 - busy / span, 4) if span else None,
            "largest_gaps": [{"us": round(us, 1), "after": a[:80], "before": b[:80]} for us, a, b in gaps[:top]]}


# What a kernel does, from its name (the first pattern that matches wins): for splitting one profiled step's device
# time into the parts a speed change could address.
KERNEL_KINDS = (
    ("grouped gemm", re.compile(r"GroupProblemShape|grouped_mm|_grouped", re.I)),
    # before the GEMMs: attention kernels carry cutlass types in their template arguments (cutlass::bfloat16_t)
    ("attention", re.compile(r"flash|fmha|attention", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|xmma|cublas|cutlass", re.I)),
    ("compiled (triton)", re.compile(r"^triton_")),
    ("copy / memset", re.compile(r"memcpy|memset|copy_kernel", re.I)),
    ("communication", re.compile(r"nccl", re.I)),
    ("reduction", re.compile(r"reduce|softmax|norm|cross_entropy", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|index|scatter|gather", re.I)),
)


def device_breakdown(kernels: list[tuple[float, float, str]], top_per_kind: int = 8) -> dict:
    """Device activity (start_us, end_us, name) of one profiled step -> busy time, idle share and time per kind.

    Each kind's time is the sum of its kernels' durations, as a share of the busy time (`busy_and_gaps`: overlaps
    counted once), so kernels that ran concurrently on several streams can add up to more than 1. `other` is what no
    pattern of `KERNEL_KINDS` names. Each kind also lists its `top_per_kind` kernels by time (`top`: name, ms,
    launches), so a kind of many small kernels (compiled Triton ones) can be attributed.
    """
    busy = busy_and_gaps(kernels, top=3)
    kinds: dict[str, dict] = {}
    for start, end, name in kernels:
        kind = next((k for k, pattern in KERNEL_KINDS if pattern.search(name)), "other")
        entry = kinds.setdefault(kind, {"ms": 0.0, "kernels": 0, "by_name": {}})
        entry["ms"] += (end - start) / 1e3
        entry["kernels"] += 1
        ms, launches = entry["by_name"].get(name, (0.0, 0))
        entry["by_name"][name] = (ms + (end - start) / 1e3, launches + 1)
    total_ms = busy["busy_s"] * 1e3 or 1.0

    def top(by_name: dict[str, tuple[float, int]]) -> list[dict]:
        ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top_per_kind]
        return [{"name": name[:160], "ms": round(ms, 3), "launches": n} for name, (ms, n) in ranked]

    return {"span_ms": round(busy["span_s"] * 1e3, 3), "busy_ms": round(busy["busy_s"] * 1e3, 3),
            "idle_share": busy["idle_share"], "largest_gaps": busy["largest_gaps"],
            "kinds": {k: {"ms": round(v["ms"], 3), "share_of_busy": round(v["ms"] / total_ms, 4),
                          "kernels": v["kernels"], "top": top(v["by_name"])}
                      for k, v in sorted(kinds.items(), key=lambda item: -item[1]["ms"])}}


def _source(stack: list[str]) -> str:
    """The innermost frame of mgmlora's own code in a profiler stack ('file(line): function'), else the innermost.

    The profiler records each frame with the first line of its function.
    """
    ours = [frame for frame in stack if _ours(frame)]
    frame = (ours or stack or ["(no stack)"])[0]
    return frame.split("src/")[-1]


# the profiler names a frame by its path below sys.path: the bench scripts (run from bench/) by their file name alone
BENCH_SCRIPTS = {path.name for path in Path(__file__).parent.glob("*.py")}


def _ours(frame: str) -> bool:
    return "mgmlora" in frame or "/bench/" in frame or frame.split("(")[0] in BENCH_SCRIPTS


def _library(stack: list[str]) -> str | None:
    """The innermost frame outside torch and mgmlora (lightning, transformers, peft, ...), when it comes before ours.

    Names the library line that waits, where `_source` only names the mgmlora function that called into it (a wait
    inside Lightning's loop is attributed to `cli.main`).
    """
    for frame in stack:
        if _ours(frame):
            return None
        named = frame.split("site-packages/")[-1]  # 'file(line): function' below site-packages
        # a package's module (lightning/..., transformers/...), not torch's, nor a top-level module (the standard
        # library's contextlib.py, ...)
        if "/" in named.split("(")[0] and not named.startswith("torch/"):
            return named
    return None


class LoopProfile(L.Callback):
    """torch.profiler over `micro_batches` consecutive micro-batches of the real loop, after `skip_steps` steps.

    `summary()` gives the device's busy time and idle share over the profiled span with its largest idle gaps
    (`busy_and_gaps`, over kernels and copies: `annotation` ranges left out), the device time per kernel kind over
    the whole profiled span (`device_breakdown`'s `kinds`; with one micro-batch per optimizer step and
    `micro_batches=1`, one step, to set beside bench/train_step.py's profile of the isolated step), and per
    micro-batch the host calls that wait for the device (`HOST_WAITS`: count and host milliseconds), in total and by
    the function of mgmlora's code they come from (`name @ file(line): function`, the line where that function starts;
    the innermost frame of mgmlora's own code, so a wait inside a library is named by the mgmlora function that called
    into it) and, for a wait inside a library, by that library's frame too (`name in file(line): function`): the
    places where the host cannot queue work ahead of the GPU. With `trace` set, the Chrome trace is written there too
    (chrome://tracing or Perfetto).
    """

    def __init__(self, skip_steps: int = 2, micro_batches: int = 4, trace: str | None = None):
        self.skip_steps, self.micro_batches, self.trace = skip_steps, micro_batches, trace
        self._prof = None
        self._seen = 0
        self._summary: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if self._prof is None and self._summary is None and trainer.global_step >= self.skip_steps:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, with_stack=True,
                                                experimental_config=stack_config())
            self._prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if self._prof is None:
            return
        self._seen += 1
        if self._seen >= self.micro_batches:
            self._finish()

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: D102
        if self._prof is not None:  # the run ended before enough micro-batches: summarise what was profiled
            self._finish()

    def _finish(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        events = self._prof.events()
        device = [(e.time_range.start, e.time_range.end, e.name) for e in events
                  if e.device_type == torch.autograd.DeviceType.CUDA and not annotation(e)]
        waits: dict[str, dict] = {}
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CPU and e.name in HOST_WAITS:
                library = _library(e.stack)
                keys = [e.name, f"{e.name} @ {_source(e.stack)}"] + ([f"{e.name} in {library}"] if library else [])
                for key in keys:
                    w = waits.setdefault(key, {"count": 0, "host_ms": 0.0})
                    w["count"] += 1
                    w["host_ms"] += (e.time_range.end - e.time_range.start) / 1e3
        per = max(self._seen, 1)
        self._summary = {"profiled_micro_batches": self._seen, "skipped_optimizer_steps": self.skip_steps,
                         **busy_and_gaps(device), "kinds": device_breakdown(device)["kinds"],
                         "host_waits_per_micro_batch": {k: {"count": round(v["count"] / per, 2),
                                                            "host_ms": round(v["host_ms"] / per, 3)}
                                                        for k, v in sorted(waits.items())}}
        if self.trace:
            self._prof.export_chrome_trace(self.trace)
        self._prof = None

    def summary(self) -> dict | None:
        """The figures above, or None when nothing was profiled."""
        return self._summary

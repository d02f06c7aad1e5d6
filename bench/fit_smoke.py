"""Runs `bin/main.py fit` in-process with the given arguments and records what the run logged, as JSON.

    python bench/fit_smoke.py OUT.json [--memory_cap_gib 24] fit --config configs/<x>.yaml [--overrides ...]

Not a speed comparison against plain transformers + PEFT (that is bench/train_step.py): it measures our own training
loop as users run it, for the configs/README.md table. Tokens/s and step time are medians over the steps after the first
two (warm-up); peak memory is the maximum of `torch.cuda.max_memory_allocated` per optimizer step. `loop_timing` is the
loop-overhead figure of bench/loop_timing.py: the share of the loop's GPU-clock time spent between micro-batches after
the first two optimizer steps, and the tokens/s inside them. `positions_per_micro_batch` is the count, largest and
median of every micro-batch's positions as the model computes them (`batch_positions`: non-padding tokens, images
expanded; warm-up included): the largest is what peak memory follows, for comparing a run with the memory estimate.
With LOOP_PROFILE=N in the environment, `loop_profile` is bench/loop_timing.py's LoopProfile over N micro-batches after
two optimizer steps (device idle share, its largest gaps, host calls that wait for the device); LOOP_TRACE=path also
writes that stretch's Chrome trace. The profiler and its event processing run inside the measured steps, so a profiled
run reports no tokens/s, step time or loop overhead: they move under `timing_with_profiler`, for reference only
(`_withhold_profiled_timing`). `generation` is validation generation's cost against training time (GenerationEval's
`val_gen/time_s`), when the run generated.

`--memory_cap_gib N` caps this process's CUDA allocator at N GiB (`torch.cuda.set_per_process_memory_fraction`), to
prove a config fits an N GiB card on a bigger one. A run that runs out of memory is recorded as such (`"oom": true`,
with the peak reached), not dropped. Checkpoint directories written by the run are listed with their sizes.

On several GPUs (`--trainer.devices N`: Lightning starts one process per GPU running this same script) every rank
records its own peak memory (`peak_mem_alloc_gib_per_rank`), only rank 0 writes the JSON, and each checkpoint the run
wrote is read back through `mgmlora.tools.export.read_run_adapter` and compared with the adapter in memory after the run
(`checkpoint_adapter_identical`; gathered first under ZeRO-3). Only a checkpoint of the last step can be equal; for it,
`true` proves the adapter was saved whole and reloads bit for bit (under DeepSpeed bf16 these are the module's bf16
weights: the fp32 master copy lives in the optimizer-state files, which are not compared).
"""

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lightning  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from loop_timing import LoopProfile, MicroBatchTiming  # noqa: E402  (bench/, this script's folder)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from mgmlora.cli import main as cli_main  # noqa: E402
from mgmlora.tools.export import read_run_adapter  # noqa: E402
from mgmlora.training.callbacks import batch_positions  # noqa: E402
from mgmlora.training.lora import count_parameters  # noqa: E402

_RUN_PEAK = [0.0]  # bytes: the allocator peak over the whole run, kept across the per-step resets of ThroughputMonitor
_reset_peak = torch.cuda.reset_peak_memory_stats


def _run_peak(device=None) -> int:
    """Bytes: the allocator's peak since the process started, across the resets."""
    return max(_RUN_PEAK[0], torch.cuda.max_memory_allocated(device))


def _reset_keeping_run_peak(device=None) -> None:
    _RUN_PEAK[0] = _run_peak(device)
    _reset_peak(device)





def main() -> None:
    """Runs the CLI and writes OUT.json."""
    out, args = Path(sys.argv[1]), sys.argv[2:]
    cap = None
    if args[:1] == ["--memory_cap_gib"]:
        cap, args = float(args[1]), args[2:]
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap * 2**30 / total)
    command = "python bench/fit_smoke.py OUT.json " + (f"--memory_cap_gib {cap:g} " if cap else "") + " ".join(args)
    head = {"command": command, "memory_cap_gib": cap,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__, "lightning": lightning.__version__,
                         "python": platform.python_version()}}
    start = time.perf_counter()
    torch.cuda.reset_peak_memory_stats = _reset_keeping_run_peak  # for the run only: restored below
    try:
        extra = ["--trainer.callbacks+=__main__._CountingTiming"]
        if os.environ.get("LOOP_PROFILE"):
            extra.append("--trainer.callbacks+=__main__._EnvLoopProfile")
        cli = cli_main(args + extra if args[:1] == ["fit"] else args)
    except torch.cuda.OutOfMemoryError as error:
        # per rank: on several GPUs each rank that runs out writes OUT.rank<N>.json (the others may hang in a
        # collective until the launcher's timeout)
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        out = out if rank == 0 else out.with_suffix(f".rank{rank}.json")
        result = {**head, "oom": True, "error": str(error).splitlines()[0],
                  "peak_mem_alloc_gib": _run_peak() / 2**30,
                  "peak_mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                  "wall_s": round(time.perf_counter() - start, 1)}
        _write(out, result)
        return
    finally:
        torch.cuda.reset_peak_memory_stats = _reset_peak
    wall = time.perf_counter() - start
    peaks = _per_rank(_run_peak() / 2**30 if torch.cuda.is_available() else 0.0)  # whole run per rank, saves included
    live = cli.model.trained_on_host()[0]  # the adapter after the run; every rank takes part (ZeRO-3 gathers)
    log_dir = cli.trainer.log_dir  # a broadcast: every rank too
    if cli.trainer.global_rank != 0:
        return
    events = EventAccumulator(log_dir)
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    steady = lambda xs: xs[2:] or xs  # noqa: E731  (drop warm-up steps)
    trainable, total = count_parameters(cli.model.model)
    checkpoints, identical = {}, {}
    for ckpt in sorted(Path(log_dir).glob("checkpoints/*.ckpt")):
        files = [f for f in ckpt.rglob("*") if f.is_file()] if ckpt.is_dir() else [ckpt]
        checkpoints[ckpt.name] = {str(f.relative_to(ckpt.parent)): f.stat().st_size for f in files}
        if ckpt.is_dir() and live:
            saved = read_run_adapter(ckpt).adapter
            identical[ckpt.name] = saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in live)
    result = {
        **head,
        "oom": False,
        "trainable_params": trainable,
        "total_params": total,
        "optimizer_steps": cli.trainer.global_step,
        "wall_s": round(wall, 1),
        "tokens_per_s_median": statistics.median(steady(scalars.get("perf/tokens_per_s", [0]))),
        "supervised_tokens_per_s_median": statistics.median(steady(scalars.get("perf/supervised_tokens_per_s", [0]))),
        "step_time_s_median": statistics.median(steady(scalars.get("perf/step_time_s", [0]))),
        "peak_mem_alloc_gib": max(scalars.get("perf/peak_mem_alloc_gib", [0])),
        "peak_mem_reserved_gib": max(scalars.get("perf/peak_mem_reserved_gib", [0])),
        "train_loss_first_last": [scalars["train/loss"][0], scalars["train/loss"][-1]] if "train/loss" in scalars
        else None,
        "train_loss": scalars.get("train/loss"),
        "grad_norm": scalars.get("train/grad_norm"),
        "checkpoint_files_bytes": checkpoints,
        "world_size": cli.trainer.world_size,
        "peak_mem_alloc_gib_per_rank": peaks,
        "adapter_tensors": len(live),
        "adapter_nonzero_lora_B": sum(bool(v.any()) for k, v in live.items() if "lora_B" in k),
        "checkpoint_adapter_identical": identical,
        "loop_timing": _TIMING[-1].summary(_TIMING[-1].tokens) if _TIMING else None,
        "positions_per_micro_batch": _TIMING[-1].positions() if _TIMING else None,
        "loop_profile": _PROFILE[-1].summary() if _PROFILE else None,
        "generation": _generation_cost(scalars),
    }
    _write(out, _withhold_profiled_timing(result))


TIMING_KEYS = ("tokens_per_s_median", "supervised_tokens_per_s_median", "step_time_s_median", "loop_timing")


def _withhold_profiled_timing(result: dict) -> dict:
    """`result` with its timing moved under `timing_with_profiler` (and nulled) when the run was profiled.

    LoopProfile records stacks and processes its events inside a measured step, which then runs far slower than an
    unprofiled one (bench/results/2026-12-04-mgm2b_lora_recipe_loop_ab_nonblocking-h200.json, `profiled_run`): its
    figures are not the loop's speed.
    """
    if result.get("loop_profile") is None:
        return result
    return {**result, **dict.fromkeys(TIMING_KEYS), "timing_with_profiler": {k: result[k] for k in TIMING_KEYS}}


def _generation_cost(scalars: dict[str, list[float]]) -> dict | None:
    """What validation generation (GenerationEval's val_gen/time_s, the slowest rank's) cost against training.

    `train_time_s` is ThroughputMonitor's running total of time in optimizer steps; `share_of_train_time` is this run's
    generation time over it (its validations are closer together than a recipe's), and `steps_between_validations_for_
    10pct` is how many optimizer steps (at the median step time) a validation must be apart for generation to cost at
    most 10% of training time: compare it with the recipe's validation interval.
    """
    times = scalars.get("val_gen/time_s")
    if not times:
        return None
    train = (scalars.get("perf/train_time_s") or [0.0])[-1]
    steps = scalars.get("perf/step_time_s") or [0.0]
    step = statistics.median(steps[2:] or steps)
    return {"validations": len(times), "time_s_per_validation": times, "time_s_total": round(sum(times), 2),
            "train_time_s": round(train, 2), "share_of_train_time": round(sum(times) / train, 4) if train else None,
            "step_time_s_median": step,
            "steps_between_validations_for_10pct": round(max(times) / (0.1 * step), 1) if step else None,
            "scores": {k: v for k, v in scalars.items() if k.startswith("val_gen/") and k != "val_gen/time_s"}}


class _CountingTiming(MicroBatchTiming):
    """MicroBatchTiming that also sums the positions of the micro-batches it measures (on the GPU, read at the end).

    It keeps every micro-batch's positions too, warm-up included, for `positions()`: peak memory follows the largest
    micro-batch, not the mean.
    """

    def __init__(self):
        super().__init__(skip_steps=2)
        self._tokens = 0
        self._each: list[torch.Tensor] = []  # 0-d, one per micro-batch
        _TIMING.append(self)  # built by the CLI from its class path; main() reads it back here

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        positions = batch_positions(batch, pl_module.info.image_tokens)
        self._each.append(positions)
        if self._start is not None:
            self._tokens = self._tokens + positions
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def positions(self) -> dict | None:
        """Non-padding positions per micro-batch over the whole run: count, largest, median (None before any)."""
        if not self._each:
            return None
        each = [int(p) for p in torch.stack(self._each).tolist()]
        return {"micro_batches": len(each), "max": max(each), "median": statistics.median(each)}

    @property
    def tokens(self) -> float | None:
        return float(self._tokens) if self.events else None


_TIMING: list[_CountingTiming] = []


class _EnvLoopProfile(LoopProfile):
    """LoopProfile over LOOP_PROFILE micro-batches after 2 optimizer steps; LOOP_TRACE: where to write the trace."""

    def __init__(self):
        super().__init__(skip_steps=2, micro_batches=int(os.environ["LOOP_PROFILE"]),
                         trace=os.environ.get("LOOP_TRACE") or None)
        _PROFILE.append(self)


_PROFILE: list[_EnvLoopProfile] = []


def _per_rank(value: float) -> list[float]:
    """`value` from every rank, in rank order (just this one without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

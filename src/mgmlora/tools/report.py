"""Comparing finished runs: one Markdown table and PNG plots from their TensorBoard logs and saved configs.

A run directory is a Lightning log directory (`<save_dir>/<name>/version_N`) holding the TensorBoard events mgmlora
writes (train/loss per optimizer step, val/loss, perf/* from ThroughputMonitor, params/*) and the `config.yaml` that
LightningCLI saves beside them. Nothing is re-run: the report reads what the runs logged.

tokens/s is a whole-run figure: all tokens the run trained on divided by the time it spent in optimizer steps
(ThroughputMonitor's running totals perf/tokens_seen and perf/train_time_s; runs logged before train_time_s existed:
the same ratio over the logged steps, tokens_per_s x step_time_s). It includes the first, warm-up step, and excludes
validation and checkpointing. "final train loss" is the mean of the last `FINAL_LOSS_POINTS` logged train/loss values
(fewer in a shorter log): one optimizer step's loss depends on which samples its window held, so a single last value
would rank runs by their last window's samples. A chart no run has data for (peak memory of CPU runs) is left out,
with a note in the report saying why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mgmlora.training.lora import LORA_PRESETS

COLUMNS = ["run", "trainable.llm", "preset", "rank", "targets", "trainable params", "trainable %", "peak GiB",
           "tokens/s", "wall time s", "final train loss", "best val loss", "best val ppl"]
FINAL_LOSS_POINTS = 10  # "final train loss" is the mean of the run's last this many logged train/loss values


@dataclass
class RunSummary:
    """What one run logged, reduced to the comparison's columns, plus its curves."""

    name: str
    row: dict
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # tag -> [(x, value)]


# every file `compare` writes into its output directory (a directory of these only may be replaced by --overwrite)
REPORT_FILES = frozenset({"comparison.md", "train_loss_vs_step.png", "train_loss_vs_tokens.png", "val_loss.png",
                          "peak_memory.png"})


def _scalars(run_dir: Path) -> tuple[dict[str, list], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags().get("scalars", [])
    if not tags:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard scalars (is it a Lightning log directory of a run?)")
    scalars = {tag: events.Scalars(tag) for tag in tags}
    return scalars, _wall_time(run_dir)


def _wall_time(run_dir: Path) -> float:
    """Seconds from each fit's first logged value to its last, summed over the fits that logged into `run_dir`.

    A run resumed into its own directory (a named version) logs each fit into an event file of its own; the time
    between the fits (a preemption, a queue) is not the run's.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    total = 0.0
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        times = [e.wall_time for tag in events.Tags().get("scalars", []) for e in events.Scalars(tag)]
        total += max(times) - min(times) if times else 0.0
    return total


def whole_run_tokens_per_s(scalars: dict[str, list]) -> float | None:
    """Tokens per second of training over the whole run (module docstring), None when not logged."""
    seen = {e.step: e.value for e in scalars.get("perf/tokens_seen", [])}
    time = {e.step: e.value for e in scalars.get("perf/train_time_s", [])}
    both = sorted(set(seen) & set(time))
    if both and time[both[-1]] > 0:
        return seen[both[-1]] / time[both[-1]]
    rate = {e.step: e.value for e in scalars.get("perf/tokens_per_s", [])}
    step_time = {e.step: e.value for e in scalars.get("perf/step_time_s", [])}
    steps = sorted(set(rate) & set(step_time))
    total_time = sum(step_time[s] for s in steps)
    return sum(rate[s] * step_time[s] for s in steps) / total_time if total_time > 0 else None


def final_train_loss(losses: list[float]) -> float | None:
    """The mean of the last `FINAL_LOSS_POINTS` logged train losses (None without any)."""
    tail = losses[-FINAL_LOSS_POINTS:]
    return sum(tail) / len(tail) if tail else None


def summarize(run_dir: str | Path, name: str | None = None) -> RunSummary:
    """Reads one run directory."""
    run_dir = Path(run_dir)
    scalars, wall = _scalars(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    model = config.get("model", {})
    lora = model.get("lora", {})
    preset = lora.get("preset", "balanced")
    llm = model.get("trainable", {}).get("llm", "lora")
    values = lambda tag: [e.value for e in scalars.get(tag, [])]  # noqa: E731
    trainable, total = values("params/trainable"), values("params/total")
    val = values("val/loss")
    train = scalars.get("train/loss", [])
    # a running total, so it stays right when metrics are logged only every log_every_n_steps
    seen = {e.step: e.value for e in scalars.get("perf/tokens_seen", [])}
    row = {
        "run": name or run_dir.parent.name,
        "trainable.llm": llm,
        "preset": preset if llm == "lora" else "-",
        "rank": (lora.get("r") or LORA_PRESETS.get(preset, {}).get("r")) if llm == "lora" else "-",
        "targets": ",".join(lora.get("target_modules") or LORA_PRESETS.get(preset, {}).get("target_modules", []))
        if llm == "lora" else "all",
        "trainable params": int(trainable[-1]) if trainable else None,
        "trainable %": 100 * trainable[-1] / total[-1] if trainable and total else None,
        "peak GiB": max(values("perf/peak_mem_alloc_gib"), default=None),
        "tokens/s": whole_run_tokens_per_s(scalars),
        "wall time s": wall,
        "final train loss": final_train_loss([e.value for e in train]),
        "best val loss": min(val, default=None),
        "best val ppl": math.exp(min(min(val), 50)) if val else None,
    }
    curves = {"train/loss": [(e.step, e.value) for e in train],
              "val/loss": [(e.step, e.value) for e in scalars.get("val/loss", [])]}
    if seen:
        curves["train/loss vs tokens"] = [(seen[e.step], e.value) for e in train if e.step in seen]
    return RunSummary(row["run"], row, curves)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(runs: list[RunSummary]) -> str:
    """The comparison table (one row per run, COLUMNS)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.row[c]) for c in COLUMNS) + " |" for r in runs]
    return "\n".join(lines)


def plot(runs: list[RunSummary], out: Path) -> tuple[list[Path], list[str]]:
    """Loss vs step, loss vs tokens, validation loss and peak-memory bars, as PNG files in `out`.

    Returns the files written and one note per chart left out because no run logged its data (an empty chart
    would read as a measurement of zero).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written, notes = [], []
    for tag, xlabel, filename in [("train/loss", "optimizer step", "train_loss_vs_step.png"),
                                  ("train/loss vs tokens", "tokens seen", "train_loss_vs_tokens.png"),
                                  ("val/loss", "optimizer step", "val_loss.png")]:
        if not any(run.curves.get(tag) for run in runs):
            notes.append(f"`{filename}` left out: no run logged {tag}.")
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for run in runs:
            points = run.curves.get(tag, [])
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o" if len(points) < 20 else None,
                        label=run.name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.set_title(tag)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename, dpi=120)
        plt.close(fig)
        written.append(out / filename)
    peaks = [(r.name, r.row["peak GiB"]) for r in runs if r.row["peak GiB"] is not None]
    if not peaks:
        notes.append("`peak_memory.png` left out: no run logged peak GPU memory (it is measured on CUDA only).")
        return written, notes
    missing = [r.name for r in runs if r.row["peak GiB"] is None]
    if missing:
        notes.append(f"`peak_memory.png` has no bar for {', '.join(missing)}: no peak GPU memory logged (CPU run).")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([n for n, _ in peaks], [p for _, p in peaks])
    ax.set_ylabel("peak allocated GiB")
    ax.set_title("peak GPU memory")
    fig.tight_layout()
    fig.savefig(out / "peak_memory.png", dpi=120)
    plt.close(fig)
    written.append(out / "peak_memory.png")
    return written, notes


def _distinct_names(run_dirs: list[Path]) -> list[str]:
    """Each run by its experiment name (the folder above `version_N`), with as many folders more as tell runs apart."""
    names = [d.parent.name for d in run_dirs]  # "exp", then "exp/version_0", "a/exp/version_0", ...
    for depth in range(2, max(len(d.parts) for d in run_dirs) + 1):
        if len(set(names)) == len(names):
            return names
        names = ["/".join(d.parts[-depth:]) for d in run_dirs]
    return [str(d) for d in run_dirs]


def compare(run_dirs: list[str | Path], out: str | Path, names: list[str] | None = None) -> Path:
    """Writes `comparison.md` (table + plot links) and the PNG plots to `out`; returns the Markdown path.

    Every run directory is checked first: a missing one is one line naming it, and `out` is not created.
    """
    for run_dir in run_dirs:
        if not Path(run_dir).is_dir():
            raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist or is not a directory; pass "
                                    "Lightning log directories such as lightning_logs/<name>/version_0.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if names is None:
        names = _distinct_names([Path(d).resolve() for d in run_dirs])
    runs = [summarize(d, names[i]) for i, d in enumerate(run_dirs)]
    pngs, notes = plot(runs, out)
    text = ["# Run comparison", "", markdown_table(runs), "",
            "tokens/s: whole run, all tokens trained on / time in optimizer steps (this rank; warm-up included; "
            "a resumed run's earlier fits too). wall time: first to last logged value of each fit logged into the "
            "run's directory, summed.", ""]
    text += [f"![{p.stem}]({p.name})" for p in pngs]
    if notes:
        text += ["", *(f"- {note}" for note in notes)]
    text += ["", "Runs: " + ", ".join(f"`{d}`" for d in run_dirs)]
    md = out / "comparison.md"
    md.write_text("\n".join(text) + "\n")
    return md

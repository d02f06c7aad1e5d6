"""Runs `bin/main.py fit` in-process with the given arguments and records what the run logged, as JSON.

    python bench/fit_smoke.py OUT.json fit --config configs/<x>.yaml [--overrides ...]

Not a speed comparison (that is bench/train_step.py, issue 6): it measures our own training loop as users run it,
for the configs/README.md table. Tokens/s and step time are medians over the steps after the first two (warm-up);
peak memory is the maximum of `torch.cuda.max_memory_allocated` per optimizer step.
"""

import json
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
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from mgmlora.cli import main as cli_main  # noqa: E402
from mgmlora.lora import count_parameters  # noqa: E402


def main() -> None:
    """Runs the CLI and writes OUT.json."""
    out, args = Path(sys.argv[1]), sys.argv[2:]
    start = time.perf_counter()
    cli = cli_main(args)
    wall = time.perf_counter() - start
    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    steady = lambda xs: xs[2:] or xs  # noqa: E731  (drop warm-up steps)
    trainable, total = count_parameters(cli.model.model)
    result = {
        "command": "python bench/fit_smoke.py OUT.json " + " ".join(args),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "lightning": lightning.__version__, "python": platform.python_version()},
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
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

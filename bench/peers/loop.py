"""Ours in the real `fit` loop as one side of bench/peers/rounds.py: a recipe as shipped against the peer.

    python bench/peers/loop.py fit --config configs/<x>.yaml [--overrides ...] --out /tmp/ours.json

Runs bench/fit_smoke.py with the `fit` arguments in a fresh process and writes its record in the layout rounds.py
reads from bench/train_step.py: one setting, `loop`, whose tokens/s is the loop's median over its steps after the
first two (fit_smoke's `tokens_per_s_median`, timed by the loop's own ThroughputMonitor: from the start of an
optimizer step's first micro-batch, its batch already fetched and on the device, to the end of its optimizer step;
the loop between micro-batches is fit_smoke's `loop_timing`), its peak the run's allocated peak, its step time the
median optimizer step and its first-step loss the first logged training loss. A run of fewer than 3 optimizer steps
has no step after the warm-up and gives an error, not a figure.
MFU and HFU are not computed for a loop (its samples' lengths are not recorded per step); the isolated step's rounds
give them. The whole fit_smoke record is kept under `fit`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

FIT_SMOKE = Path(__file__).resolve().parents[1] / "fit_smoke.py"


def as_setting(fit: dict) -> dict:
    """fit_smoke's record -> the `variants` entry rounds.py reads (an OOM or a run without steps gives an error)."""
    if fit.get("oom"):
        return {"error": f"out of memory at {fit.get('peak_mem_alloc_gib')} GiB allocated"}
    tokens, steps = fit.get("tokens_per_s_median"), fit.get("optimizer_steps") or 0
    if not tokens or steps < 3:
        return {"error": f"no timed steps ({steps} optimizer steps ran; the first two are warm-up)"}
    losses = fit.get("train_loss") or []
    return {"tokens_per_s": tokens, "peak_alloc_gib": fit.get("peak_mem_alloc_gib"),
            "step_s_median": fit.get("step_time_s_median"), "loss_first_step": losses[0] if losses else None,
            "mfu": None, "hfu": None, "positions_per_micro_batch": fit.get("positions_per_micro_batch")}


def main() -> int:
    """Runs the fit, converts its record, writes `--out`; exits as the fit did."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, required=True)
    args, fit_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="loop_side_") as tmp:
        fit_json = Path(tmp) / "fit.json"
        proc = subprocess.run([sys.executable, str(FIT_SMOKE), str(fit_json), *fit_args])
        fit = json.loads(fit_json.read_text()) if fit_json.exists() else {}
    setting = as_setting(fit) if fit else {"error": f"fit_smoke exited {proc.returncode} without a record"}
    record = {"command": "python bench/peers/loop.py " + shlex.join(sys.argv[1:]), "device": fit.get("device"),
              "versions": fit.get("versions"), "variants": {"loop": setting}, "fit": fit}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())

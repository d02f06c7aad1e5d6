"""Runs the variants of a sweep file one after another, then compares them (bin/compare.py).

    python bench/sweep.py --sweep configs/sweep/<x>.yaml --steps N --output DIR [-- common bin/main.py arguments]

Each variant is `python bin/main.py fit <its arguments> <common arguments> --trainer.max_steps N` with its own
TensorBoard logger (`DIR/runs/<variant>`), in a fresh process so that one run's memory does not bleed into the next
one's peak. A variant that fails is reported and left out of the comparison; the others still run.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mgmlora.report import compare  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    """Runs the sweep; returns the comparison's Markdown file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", required=True, type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    runs = yaml.safe_load(args.sweep.read_text())["runs"]
    existing = [n for n in runs if (args.output / "runs" / n).exists()]
    if existing:  # their old event files would be mixed into the new comparison
        raise SystemExit(f"{args.output}/runs already holds {existing}: choose a new --output or remove them.")
    done, failed = [], []
    for name, run_args in runs.items():
        cmd = [sys.executable, str(ROOT / "bin" / "main.py"), "fit", *map(str, run_args), *common,
               "--trainer.max_steps", str(args.steps), "--trainer.enable_progress_bar", "false",
               "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
               "--trainer.logger.save_dir", str(args.output / "runs"), "--trainer.logger.name", name,
               "--trainer.logger.version", "0"]
        print("==", name, " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT)
        (done if proc.returncode == 0 else failed).append(name)
    if failed:
        print(f"failed runs (left out of the comparison): {failed}", flush=True)
    if not done:
        raise SystemExit("no run of the sweep finished")
    return compare([args.output / "runs" / n / "version_0" for n in done], args.output, done)


if __name__ == "__main__":
    main()

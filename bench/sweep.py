"""Runs the variants of a sweep file one after another, then compares them (bin/compare.py).

    python bench/sweep.py --sweep configs/sweep/<x>.yaml --steps N --output DIR [-- common bin/main.py arguments]

Each variant is `python bin/main.py fit <its arguments> <common arguments> --trainer.max_steps N` with its own
TensorBoard logger (`DIR/runs/<variant>`), in a fresh process so that one run's memory does not bleed into the next
one's peak. A variant that fails is reported and left out of the comparison; the others still run.

`--gpus 0,1,...` runs variants side by side, one per listed GPU at a time (each process sees only its GPU through
CUDA_VISIBLE_DEVICES; their logs go to DIR/runs/<variant>.log): each run's timing then covers its own GPU only.
"""

import argparse
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mgmlora.errors import MgmloraError, UsageError, run  # noqa: E402
from mgmlora.tools.report import compare  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    """Runs the sweep; returns the comparison's Markdown file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", required=True, type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--gpus", default=None, help="comma-separated GPU ids to run variants on side by side")
    args = parser.parse_args(argv)
    devices = [common[i + 1] for i, a in enumerate(common[:-1]) if a == "--trainer.devices"]
    devices += [a.partition("=")[2] for a in common if a.startswith("--trainer.devices=")]
    if args.gpus and any(d not in ("1", "[0]") for d in devices):
        raise UsageError("--gpus gives each run one GPU; drop --trainer.devices from the common arguments.")
    runs = yaml.safe_load(args.sweep.read_text())["runs"]
    existing = [n for n in runs if (args.output / "runs" / n).exists()]
    if existing:  # their old event files would be mixed into the new comparison
        raise UsageError(f"{args.output}/runs already holds {existing}: choose a new --output or remove them.")
    commands = {}
    for name, run_args in runs.items():
        commands[name] = [sys.executable, str(ROOT / "bin" / "main.py"), "fit", *map(str, run_args), *common,
                          "--trainer.max_steps", str(args.steps), "--trainer.enable_progress_bar", "false",
                          "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
                          "--trainer.logger.save_dir", str(args.output / "runs"), "--trainer.logger.name", name,
                          "--trainer.logger.version", "0"]
    results = run_all(commands, args.gpus.split(",") if args.gpus else [None], args.output / "runs")
    done = [n for n in runs if results[n] == 0]
    failed = [n for n in runs if results[n] != 0]
    if failed:
        print(f"failed runs (left out of the comparison): {failed}", flush=True)
    if not done:
        raise MgmloraError(f"no run of the sweep finished (their output: {args.output / 'runs'})")
    md = compare([args.output / "runs" / n / "version_0" for n in done], args.output, done)
    print(f"sweep report: {md} (table, notes and plots in {md.parent})", flush=True)
    return md


def run_all(commands: dict[str, list[str]], gpus: list[str | None], log_dir: Path) -> dict[str, int]:
    """Runs the commands, one per GPU at a time (`[None]`: one after another, output to the console)."""
    todo: queue.Queue = queue.Queue()
    for name in commands:
        todo.put(name)
    codes: dict[str, int] = {}

    def worker(index: int, gpu: str | None) -> None:
        while True:
            try:
                name = todo.get_nowait()
            except queue.Empty:
                return
            codes[name] = -1  # until the run says otherwise: a launch that raises counts as failed
            env = dict(os.environ)
            if gpu is not None:
                # its own GPU, and its own rendezvous port: DeepSpeed starts a process group even on one GPU, and runs
                # started side by side would otherwise all bind the default port
                env.update(CUDA_VISIBLE_DEVICES=gpu, MASTER_PORT=str(29500 + 17 * (index + 1)))
            print(f"== {name}" + (f" (GPU {gpu})" if gpu is not None else ""), " ".join(commands[name][1:]), flush=True)
            try:
                if gpu is None:
                    codes[name] = subprocess.run(commands[name], cwd=ROOT, env=env).returncode
                    continue
                log_dir.mkdir(parents=True, exist_ok=True)
                with open(log_dir / f"{name}.log", "w") as log:
                    codes[name] = subprocess.run(commands[name], cwd=ROOT, env=env, stdout=log,
                                                 stderr=subprocess.STDOUT).returncode
            except OSError as error:
                print(f"== {name} could not run: {error}", flush=True)
            print(f"== {name} exited {codes[name]}", flush=True)

    threads = [threading.Thread(target=worker, args=(i, gpu)) for i, gpu in enumerate(gpus)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)

"""Interleaved rounds, ours against a peer, in one GPU session: the only speed ratio mgmlora reports.

    python bench/peers/rounds.py --model qwen3-30b-a3b --budget_gib 80 --targets attention --peer trl --rounds 3 \
        --ours "bench/train_step.py --model qwen3-30b-a3b --variants {sweep}" \
        --ours_sweep liger+packing+nocast+fused+fastexperts+compilex64 \
        --peer "bench/peers/trl_sft.py --model qwen3-30b-a3b --batch_sizes {sweep}" --peer_sweep 64,80 \
        --out bench/results/<date>-peer_trl-qwen3-30b-a3b-attention-h200.json

Each round runs ours, then the peer, each in a fresh process (ours, peer, ours, peer, ...), so drift of the machine
(clocks, temperature, neighbours) reaches both alike. Round 1 runs each side's whole sweep (`{sweep}` in its command:
the variants or micro-batch sizes to try) and keeps each side's fastest setting whose peak memory stays within
`--budget_gib`; later rounds run only those two. When round 1 leaves a side without any setting, the rounds stop there
(`stopped` says why, with each setting's error): no later round could give a ratio. A round's figure for a side is its
tokens/s (the median of its timed steps); the ratio of the round is ours over the peer's. The JSON holds every round,
the median and minimum ratio, ours' MFU and HFU (medians over the rounds; mgmlora.models.flops), the peer's, the
first-step losses of both (same weights, same first batch, LoRA starting as a no-op: they agree when both train the same
function), and each run's own JSON. It is rewritten after every run, so a cut session keeps the rounds it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def best_within(record: dict, budget_gib: float, cuda: bool) -> tuple[str, dict] | None:
    """The fastest variant of one run's JSON whose peak stays within the budget (None if none does).

    Without CUDA (smoke runs) a variant with no measured peak counts as fitting.
    """
    def fits_budget(rec: dict) -> bool:
        peak = rec.get("peak_alloc_gib")
        return peak <= budget_gib if peak is not None else not cuda

    fits = [(name, rec) for name, rec in record["variants"].items() if rec.get("tokens_per_s") and fits_budget(rec)]
    return max(fits, key=lambda item: item[1]["tokens_per_s"], default=None)


def why_none(record: dict, budget_gib: float) -> str:
    """Why a side's run gave no setting: the run's own failure, every variant's error, or the budget."""
    if record.get("error"):
        return record["error"]
    variants = record.get("variants", {})
    if not variants:
        return "the run reported no settings"
    errors = {name: rec["error"] for name, rec in variants.items() if rec.get("error")}
    if errors and len(errors) == len(variants):
        return "every setting failed: " + "; ".join(f"{name}: {error}" for name, error in errors.items())
    failed = f" ({len(errors)} of {len(variants)} settings failed: {'; '.join(errors.values())})" if errors else ""
    return f"no setting within {budget_gib} GiB{failed}"


def run_side(command: str, sweep: str, out: Path, timeout: float, pythonpath: str | None = None) -> dict:
    """Runs one side's command (`{sweep}` filled in) with `--out`, returns its JSON (or the failure).

    `pythonpath` replaces PYTHONPATH for this side (`--peer old`: the earlier tree's src).
    """
    argv = [sys.executable] + shlex.split(command.replace("{sweep}", sweep)) + ["--out", str(out)]
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath is not None else None
    start = time.perf_counter()
    # its own process group: a side that starts processes of its own (bench/peers/loop.py runs fit_smoke) is killed
    # whole on a timeout, so nothing of it keeps the GPU while the other side runs
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except BaseException as stop:  # the side's timeout, or this process told to stop (SIGTERM, Ctrl-C): the side too
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group ended on its own meanwhile
            pass
        proc.communicate()
        if isinstance(stop, subprocess.TimeoutExpired):
            return {"error": f"timed out after {timeout:.0f} s", "argv": argv}
        raise
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        failed = {"error": f"exit {proc.returncode}", "argv": argv, "stderr_tail": stderr[-3000:]}
        if out.exists():  # what the side recorded before it failed (bench/peers/loop.py: the fit's own record)
            try:
                failed["record"] = json.loads(out.read_text())
            except json.JSONDecodeError:
                failed["record_unreadable"] = True
        return failed
    record = json.loads(out.read_text())
    record["wall_s"] = round(wall, 1)
    return record


def summarise(rounds: list[dict]) -> dict:
    """Median and minimum ratio over the complete rounds, and ours' / the peer's median MFU and HFU."""
    done = [r for r in rounds if r.get("ratio")]
    def med(key: str) -> float | None:
        values = [r[key] for r in done if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"rounds_complete": len(done), "ratio_median": med("ratio"),
            "ratio_min": min((r["ratio"] for r in done), default=None),
            "ratio_max": max((r["ratio"] for r in done), default=None),
            "ours_tokens_per_s_median": med("ours_tokens_per_s"), "peer_tokens_per_s_median": med("peer_tokens_per_s"),
            "ours_mfu": med("ours_mfu"), "ours_hfu": med("ours_hfu"), "peer_mfu": med("peer_mfu"),
            "peer_hfu": med("peer_hfu")}


def main() -> None:
    """Runs the rounds and writes the JSON after each run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--model", required=True, help="the result's model name (qwen3-30b-a3b, mgm-2b)")
    parser.add_argument("--budget_gib", type=float, required=True)
    parser.add_argument("--targets", choices=["attention", "experts"], required=True)
    parser.add_argument("--peer", choices=["trl", "plain", "old"], required=True,
                        help="old: mgmlora's earlier tree (an A/B of one change; --peer_pythonpath its src)")
    parser.add_argument("--ours", required=True, help="ours' command after `python` ({sweep}: the variants)")
    parser.add_argument("--ours_sweep", required=True)
    parser.add_argument("--peer_cmd", required=True, help="the peer's command after `python` ({sweep}: its sizes)")
    parser.add_argument("--peer_sweep", required=True)
    parser.add_argument("--peer_pythonpath", help="PYTHONPATH for the peer's runs (default: this process's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=480, help="seconds per run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # a SIGTERM (the caller's `timeout`) unwinds like Ctrl-C, so the running side's process group is killed with it
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    import torch

    result = {
        "command": "python bench/peers/rounds.py " + shlex.join(sys.argv[1:]),
        "model": args.model, "budget_gib": args.budget_gib, "targets": args.targets, "peer": args.peer,
        "peer_pythonpath": args.peer_pythonpath,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "rounds": [], "runs": [],
    }
    sweep = {"ours": args.ours_sweep, "peer": args.peer_sweep}
    command = {"ours": args.ours, "peer": args.peer_cmd}
    tmp = Path(tempfile.mkdtemp(prefix="rounds_"))
    for i in range(args.rounds):
        entry: dict = {"round": i + 1}
        for side in ("ours", "peer"):
            record = run_side(command[side], sweep[side], tmp / f"{side}{i}.json", args.timeout,
                              args.peer_pythonpath if side == "peer" else None)
            result["runs"].append({"round": i + 1, "side": side, **record})
            best = best_within(record, args.budget_gib, torch.cuda.is_available()) if "variants" in record else None
            if best is None:
                entry[f"{side}_error"] = why_none(record, args.budget_gib)
            else:
                name, rec = best
                entry.update({f"{side}_setting": name, f"{side}_tokens_per_s": rec["tokens_per_s"],
                              f"{side}_peak_gib": rec["peak_alloc_gib"], f"{side}_mfu": rec.get("mfu"),
                              f"{side}_hfu": rec.get("hfu"), f"{side}_step_s": rec["step_s_median"],
                              f"{side}_loss_first_step": rec.get("loss_first_step", (rec.get("losses") or [None])[0])})
                if i == 0:  # later rounds run only the setting that won the sweep
                    sweep[side] = str(rec["samples_per_step"]) if side == "peer" and args.peer == "trl" else name
            if entry.get("ours_tokens_per_s") and entry.get("peer_tokens_per_s"):
                entry["ratio"] = entry["ours_tokens_per_s"] / entry["peer_tokens_per_s"]
            result["rounds"] = [r for r in result["rounds"] if r["round"] != i + 1] + [entry]
            result.update(summarise(result["rounds"]))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
            print(f"round {i + 1} {side}: " + json.dumps({k: v for k, v in entry.items() if k.startswith(side)}),
                  flush=True)
        if i == 0 and any(f"{side}_error" in entry for side in ("ours", "peer")):
            # round 1 swept every setting: with no setting on one side no later round can give a ratio
            result["stopped"] = "after round 1: " + "; ".join(f"{side}: {entry[f'{side}_error']}"
                                                              for side in ("ours", "peer") if f"{side}_error" in entry)
            args.out.write_text(json.dumps(result, indent=2))
            print(f"stopped {result['stopped']}", flush=True)
            break
    s = summarise(result["rounds"])
    print(f"{args.model} {args.targets} vs {args.peer} within {args.budget_gib} GiB: ratio median "
          f"{s['ratio_median']} (min {s['ratio_min']}, max {s['ratio_max']}) over {s['rounds_complete']} rounds; "
          f"ours MFU {s['ours_mfu']} HFU {s['ours_hfu']}")


if __name__ == "__main__":
    main()

"""One comparison's interleaved rounds from several bench/peers/rounds.py runs, as one JSON.

    python bench/peers/merge_rounds.py A.json B.json --out C.json

A rounds run must fit one GPU call; where a comparison's rounds take longer than that, it runs in several calls on
the same machine and each call writes its own file. This puts their complete rounds in one file, renumbered in the
order given (each keeps its `source` file and `source_round`), with every run's record, each source's command, and the
summary (median, min and max ratio, MFU, HFU) recomputed over all of them by rounds.py's own `summarise`. The runs
must compare the same thing: the same model, budget, targets, peer (and its PYTHONPATH) and device, the same
commands on each side (`--ours`, `--peer_cmd`), and every complete round with the same setting on each side;
otherwise it stops with the difference.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/peers/, this script's folder

from rounds import summarise  # noqa: E402

SAME = ("model", "budget_gib", "targets", "peer", "peer_pythonpath", "device")
SAME_ARGUMENTS = ("--ours", "--peer_cmd")  # of each source's rounds.py command: what each side ran


def _arguments(command: str) -> dict[str, str | None]:
    argv = shlex.split(command or "")
    return {flag: argv[argv.index(flag) + 1] if flag in argv[:-1] else None for flag in SAME_ARGUMENTS}


def merge(records: dict[str, dict]) -> dict:
    """The rounds files (name -> parsed JSON) as one record; ValueError names what differs between them."""
    first_name, first = next(iter(records.items()))
    first_arguments = _arguments(first.get("command"))
    for name, record in records.items():
        for key in SAME:
            if record.get(key) != first.get(key):
                raise ValueError(f"{name}: {key} is {record.get(key)!r}, {first_name} has {first.get(key)!r}")
        for flag, value in _arguments(record.get("command")).items():
            if value != first_arguments[flag]:
                raise ValueError(f"{name}: {flag} differs from {first_name}'s ({value!r})")
    rounds, runs, number = [], [], {}
    for name, record in records.items():
        for entry in record["rounds"]:
            if not entry.get("ratio"):
                continue  # an incomplete round (one side cut or failed): no ratio to merge
            number[name, entry["round"]] = len(rounds) + 1
            rounds.append({**entry, "round": len(rounds) + 1, "source": name, "source_round": entry["round"]})
        # a run keeps its source's round as source_round; `round` is its merged round's (None: an incomplete round)
        runs += [{**run, "round": number.get((name, run["round"])), "source": name, "source_round": run["round"]}
                 for run in record["runs"]]
    if not rounds:
        raise ValueError("no complete round in " + ", ".join(records))
    for side in ("ours", "peer"):
        settings = {entry[f"{side}_setting"] for entry in rounds}
        if len(settings) > 1:
            raise ValueError(f"the complete rounds ran {side} with different settings: {sorted(settings)}")
    merged = {key: first.get(key) for key in SAME}
    merged.update(sources={name: record.get("command") for name, record in records.items()}, rounds=rounds,
                  runs=runs, **summarise(rounds))
    return merged


def main(argv: list[str] | None = None) -> int:
    """Merges the files given and writes `--out`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        merged = merge({path.name: json.loads(path.read_text()) for path in args.files})
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    merged = {"command": "python bench/peers/merge_rounds.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              **merged}
    args.out.write_text(json.dumps(merged, indent=2))
    print(f"{merged['rounds_complete']} rounds: ratio median {merged['ratio_median']:.3f} "
          f"(min {merged['ratio_min']:.3f}, max {merged['ratio_max']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

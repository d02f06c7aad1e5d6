#!/usr/bin/env python
"""Data-item-level sampling of a Chameleons JSON file.

    python bin/sample_chameleons.py INPUT OUTPUT --max_data_items 3 --seed 42

Keeps at most `max_data_items` data_items per record, chosen with Python's `random` seeded once (the same seed and
file give the same output on any machine); writes the same schema (one collection per record), UTF-8, indent 2.
The output is written to a temporary file and renamed, so an interrupted run never leaves half a file.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing

from mgmlora.data.chameleons import load_records, sample_data_items  # noqa: E402
from mgmlora.errors import run  # noqa: E402
from mgmlora.tools.args import positive_int, refuse_overwrite  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Samples INPUT into OUTPUT and returns the counts it prints."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--max_data_items", type=positive_int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    refuse_overwrite({"OUTPUT": args.output}, files={"INPUT": args.input})
    records = load_records(args.input)
    sampled = sample_data_items(records, args.max_data_items, args.seed, args.input)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text(json.dumps(sampled, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, args.output)
    count = lambda recs: sum(len(c["data"]) for r in recs for c in r["task"]["task_behavior_collections"])  # noqa: E731
    summary = {"records": len(records), "data_items_in": count(records), "data_items_out": count(sampled),
               "max_data_items": args.max_data_items, "seed": args.seed}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)

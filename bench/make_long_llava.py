"""Writes LLaVA records whose rows fill 2048 positions after image expansion (for memory measurements).

    python bench/make_long_llava.py OUT.json [--repeat 150] [--copies 11]

Takes the bundled image records and repeats each answer, so that every row is cut at the model's 2048-position limit;
`--copies` repeats the record list (24 x 11 = 264 rows: two optimizer steps at accumulate_grad_batches 128).
"""

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Writes OUT.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--repeat", type=int, default=150)
    parser.add_argument("--copies", type=int, default=11)
    args = parser.parse_args()
    records = json.loads((ROOT / "tests/assets/llava/llava_demo.json").read_text())
    long = []
    for r in records:
        if "image" in r:
            turns = [dict(t) for t in r["conversations"][:2]]
            turns[1]["value"] = " ".join([turns[1]["value"]] * args.repeat)
            long.append({**r, "conversations": turns})
    args.out.write_text(json.dumps(long * args.copies))


if __name__ == "__main__":
    main()

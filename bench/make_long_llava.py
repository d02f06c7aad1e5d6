"""Writes LLaVA records with long answers, for memory and speed measurements at real lengths.

    python bench/make_long_llava.py OUT.json [--repeat 150] [--copies 11]
    python bench/make_long_llava.py OUT.json --text_tokens 100 1500 --copies 11 [--seed 0]

Takes the bundled image records and repeats each answer. With `--repeat` every row is cut at the model's
2048-position limit (the worst case for memory). With `--text_tokens LO HI` each record's answer is repeated to about a
uniformly drawn number of text tokens in [LO, HI] (one image adds 576 embeddings), the realistic LLaVA/MGM spread.
`--copies` repeats the record list (24 x 11 = 264 rows: two optimizer steps at accumulate_grad_batches 128).
"""

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS_PER_ANSWER = 24  # the bundled answers are 23-24 tokens with the bundled Gemma-style tokenizer


def main() -> None:
    """Writes OUT.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--repeat", type=int, default=150)
    parser.add_argument("--text_tokens", type=int, nargs=2, default=None, metavar=("LO", "HI"))
    parser.add_argument("--copies", type=int, default=11)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    records = [r for r in json.loads((ROOT / "tests/assets/llava/llava_demo.json").read_text()) if "image" in r]
    long = []
    for _ in range(args.copies):
        for r in records:
            turns = [dict(t) for t in r["conversations"][:2]]
            repeat = args.repeat
            if args.text_tokens:
                repeat = max(1, round(rng.uniform(*args.text_tokens) / TOKENS_PER_ANSWER))
            turns[1]["value"] = " ".join([turns[1]["value"]] * repeat)
            long.append({**r, "conversations": turns})
    args.out.write_text(json.dumps(long))


if __name__ == "__main__":
    main()

"""Writes a synthetic Chameleons-format train.json whose samples have realistic token lengths (for speed/memory runs).

    python bench/make_chameleons.py OUT.json [--users 64] [--items 12] [--seed 0]

Real Chameleons data is not available on the GPU machines. The schema follows docs/design/chameleons.md (user
profile, task description, dialogue data items with context turns and the character's continuation); the words are
drawn from the bundled sample's vocabulary. Context lengths are drawn so that, once the prompt builder adds the
character's history and the data module truncates at 1024 tokens, most samples fall between 200 and 1024 tokens,
like the real data (measure with `bin/show_samples.py --stats`-style tools: the benchmark JSON records the actual
lengths it trained on).
"""

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEAKERS = ["OTTO", "BEA", "MIRA", "JONAH", "ELSA", "RAFE"]


def _sentence(rng: random.Random, words: list[str], lo: int, hi: int) -> str:
    text = " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))
    return text[:1].upper() + text[1:] + rng.choice([".", "?", "!", "..."])


def make(users: int, items: int, seed: int) -> list[dict]:
    """`users` records, each with `items` dialogue data items of varied context length."""
    rng = random.Random(seed)
    sample = json.loads((ROOT / "tests/assets/chameleons_demo.json").read_text())
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z']+", json.dumps(sample)) if len(w) > 1})
    description = sample[0]["task"]["description"]
    records = []
    for u in range(users):
        name = f"CHARACTER {u:03d}"
        data = []
        for _ in range(items):
            turns = max(1, min(14, int(rng.lognormvariate(1.3, 0.6))))  # median ~4 turns, long tail
            context = []
            for t in range(turns):
                speaker = name if t % 2 else rng.choice(SPEAKERS)
                context.append({"source": speaker, "content": _sentence(rng, words, 4, 40)})
            if context[-1]["source"] == name:
                context.append({"source": rng.choice(SPEAKERS), "content": _sentence(rng, words, 4, 30)})
            data.append({"context": context, "continuation": _sentence(rng, words, 3, 45)})
        records.append({"user_hash": hashlib.md5(name.encode()).hexdigest(),
                        "user": {"profile": {"name": name, "gender": rng.choice(["m", "f"])}},
                        "task": {"description": description,
                                 "task_behavior_collections": [{"type": "dialogue", "data": data}]}})
    return records


def main() -> None:
    """Writes OUT.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--items", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.write_text(json.dumps(make(args.users, args.items, args.seed), ensure_ascii=False))


if __name__ == "__main__":
    main()

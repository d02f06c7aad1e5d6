"""What generation-based evaluation asks of a data split: prompts, references and what to show next to them.

Each DataModule turns its records into `GenerationItem`s with the same prompt builders as training and
`bin/generate.py` (`TokenizedDataModule.generation_items`); `seeded_subset` picks the fixed evaluation subset, so a
validation run compares the same prompts every time and `bin/score.py` scores the same items a run monitored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class GenerationItem:
    """One prompt to answer and the reference answer it is scored against.

    Attributes:
        key: a stable id of the item in its file (record / data_item position), for tables and score files.
        prompt_ids: the training prompt up to the assistant header (IMAGE_TOKEN_INDEX where an image goes).
        reference: the reference answer (plain text, as in the data file).
        context: a short human-readable view of the prompt (end of the dialogue, or the question) for tables.
        image: the image file for image-text items (absolute or relative to the working directory), else None.
    """

    key: str
    prompt_ids: list[int]
    reference: str
    context: str
    image: str | None = None


def seeded_subset(n: int, num_samples: int | None, seed: int) -> list[int]:
    """Indices (sorted) of `num_samples` of `n` items drawn with `seed`; all of them when num_samples is None or >= n.

    Independent of the rank count and of anything else the run draws (its own `random.Random`).
    """
    if num_samples is None or num_samples >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), num_samples))


def tail(text: str, limit: int = 400) -> str:
    """The last `limit` characters of `text`, marked when cut (tables show the end of a long context)."""
    return text if len(text) <= limit else "…" + text[len(text) - limit:]


__all__ = ["GenerationItem", "seeded_subset", "tail"]

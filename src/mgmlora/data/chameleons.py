"""Chameleons persona-dialogue JSON: parsing, extraction, data-item sampling, train/val split and history.

Schema (an array of records; several records may share a `user_hash`; extra keys are ignored):

    {"user_hash": str, "user": {"profile": {"name": str, "gender": str, ...}, ...},
     "task": {"description": str,
              "task_behavior_collections": [{"data": [{"context": [{"source": str, "content": str}, ...],
                                                       "continuation": str}, ...]}, ...]}}

Faithful to the original scripts where they are right (one sample per data_item, role mapping, keep/drop rule,
data-item sampling with Python's `random`, the per-user floor(0.9 n) split), and corrected where they are wrong:
history is built from training samples only and never contains the sample's own target (the original's on-disk
cache leaked targets), and the split has a true held-out-users mode. See docs/design/chameleons.md.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mgmlora.data.textfile import read_utf8

SplitMode = Literal["per_user", "held_out_users"]


class ChameleonsFormatError(ValueError):
    """A Chameleons file is malformed; the message names the file, the record index, the key and the fix."""


@dataclass
class Turn:
    """One context turn after role mapping: `assistant` is the target character, `user` anyone else."""

    role: Literal["user", "assistant"]
    content: str


@dataclass
class DialogueSample:
    """One training example: a data_item of a record, with its record's user information.

    Attributes:
        user_hash: the character's id (not unique per record).
        profile: the record's `user.profile` (name, gender, ...).
        task_description: the record's `task.description`.
        context: mapped turns, oldest first (empty for a character's opening line).
        target: the continuation (stripped); None for leaderboard items without one.
        history: the character's own earlier lines, attached after the split (see `attach_history`).
        index: (record, collection, item) position in the source file, for error messages and write-back.
    """

    user_hash: str
    profile: dict[str, Any]
    task_description: str
    context: list[Turn]
    target: str | None
    history: list[str] = field(default_factory=list)
    index: tuple[int, int, int] = (0, 0, 0)


def load_records(path: str | Path) -> list[dict]:
    """Reads a Chameleons JSON file (a top-level array of records).

    Raises:
        FileNotFoundError: when `path` does not exist or is a directory.
        ChameleonsFormatError: for bytes that are not UTF-8, invalid JSON, an empty file, or a top level that is not
            a non-empty array.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory; pass the JSON file inside it" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"Chameleons file {str(path)!r} {what}.")
    text = read_utf8(path, ChameleonsFormatError)
    if not text.strip():
        raise ChameleonsFormatError(f"{path}: the file is empty; expected a JSON array of records.")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ChameleonsFormatError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno} ({err.msg}); "
                                    "expected a JSON array of records.") from err
    if not isinstance(records, list) or not records:
        raise ChameleonsFormatError(f"{path}: the top level must be a non-empty JSON array of records, got "
                                    f"{type(records).__name__}{' (empty)' if records == [] else ''}.")
    return records


def _get(record: Any, keys: str, where: str, expected: type | tuple[type, ...], what: str) -> Any:
    value = record
    for key in keys.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ChameleonsFormatError(f"{where}: key '{keys}' is missing; expected {what}.")
        value = value[key]
    if not isinstance(value, expected):
        raise ChameleonsFormatError(f"{where}: key '{keys}' is {type(value).__name__}; expected {what}.")
    return value


def iter_items(records: list[dict], path: str | Path, require_continuation: bool = True):
    """Validates records and yields (record index, collection index, item index, record, item).

    Raises:
        ChameleonsFormatError: naming file, record index, key and expectation for any malformed field.
    """
    for r, record in enumerate(records):
        where = f"{path}: record {r}"
        if not isinstance(record, dict):
            raise ChameleonsFormatError(f"{where}: expected a JSON object, got {type(record).__name__}.")
        _get(record, "user_hash", where, str, "the character id (a string)")
        _get(record, "user.profile.name", where, str, "the character's name (a string), e.g. \"DANTE\"")
        _get(record, "task.description", where, str, "the task description (a string)")
        collections = _get(record, "task.task_behavior_collections", where, list, "a list of {\"data\": [...]}")
        for c, collection in enumerate(collections):
            items = _get(collection, "data", f"{where}, task.task_behavior_collections[{c}]", list,
                         "a list of data_items {context, continuation}")
            for i, item in enumerate(items):
                at = f"{where}, task.task_behavior_collections[{c}].data[{i}]"
                turns = _get(item, "context", at, list, "a list of {source, content} turns (may be empty)")
                for k, turn in enumerate(turns):
                    _get(turn, "source", f"{at}.context[{k}]", str, "the speaker's name (a string)")
                    _get(turn, "content", f"{at}.context[{k}]", str, "the utterance (a string)")
                if require_continuation:
                    _get(item, "continuation", at, str, "the character's next line (a string)")
                elif "continuation" in item and not isinstance(item["continuation"], str):
                    raise ChameleonsFormatError(f"{at}: key 'continuation' must be a string when present.")
                yield r, c, i, record, item


def map_turns(turns: list[dict], name: str) -> list[Turn]:
    """The original's role mapping of context turns.

    The character's own turns (source == profile name after strip, or the literal "user" in any case) become
    `assistant`, everyone else `user`; other speakers' names are dropped, and turns whose content is empty after
    stripping are removed.
    """
    mapped = []
    for turn in turns:
        content = turn["content"].strip()
        if not content:
            continue
        source = turn["source"].strip()
        own = source == name.strip() or source.lower() == "user"
        mapped.append(Turn("assistant" if own else "user", content))
    return mapped


def extract_samples(records: list[dict], path: str | Path = "<records>") -> tuple[list[DialogueSample], int]:
    """One sample per data_item, with the original's keep/drop rule.

    Kept: a non-empty continuation whose mapped context is empty (the character's opening line) or ends with
    another speaker's turn. Dropped: empty continuations, and contexts that end with the character's own turn.

    Returns:
        The samples in file order, and the number of data_items dropped.
    """
    samples, dropped = [], 0
    for r, c, i, record, item in iter_items(records, path):
        target = item["continuation"].strip()
        context = map_turns(item["context"], record["user"]["profile"]["name"])
        if not target or (context and context[-1].role != "user"):
            dropped += 1
            continue
        samples.append(DialogueSample(record["user_hash"], dict(record["user"]["profile"]),
                                      record["task"]["description"], context, target, index=(r, c, i)))
    return samples, dropped


def sample_data_items(records: list[dict], max_data_items: int, seed: int = 42,
                      path: str | Path = "<records>") -> list[dict]:
    """At most `max_data_items` data_items per record, as the original `sample_dataset_data_item_level.py`.

    One `random.Random(seed)` walks the records in file order; a record's items (all its collections, concatenated)
    are sub-sampled with `rng.sample` only when there are more than `max_data_items`, so the count is
    sum(min(n_i, N)) and the same seed and file give the same output on any machine (Python's Mersenne Twister and
    `sample` are platform-independent). Each record is rewritten with `user_hash`, `user`, `task.description` and one
    collection `{"data": [...]}`; records with no items are kept.
    """
    if max_data_items < 1:
        raise ValueError(f"max_data_items must be >= 1 (got {max_data_items}).")
    list(iter_items(records, path, require_continuation=False))  # validate before writing anything
    rng = random.Random(seed)
    out = []
    for record in records:
        items = [item for coll in record["task"]["task_behavior_collections"] for item in coll["data"]]
        if len(items) > max_data_items:
            items = rng.sample(items, max_data_items)
        out.append({"user_hash": record["user_hash"], "user": record["user"],
                    "task": {"description": record["task"]["description"],
                             "task_behavior_collections": [{"data": items}]}})
    return out


def split_samples(samples: list[DialogueSample], mode: SplitMode, val_ratio: float,
                  seed: int = 42) -> tuple[list[DialogueSample], list[DialogueSample]]:
    """Train/validation split.

    per_user (the original): group by user_hash in first-appearance order, shuffle each group with one
        `random.Random(seed)`, put floor(n * (1 - val_ratio)) samples (at least 1) in train and the rest in val.
        Users with few samples lose a larger share: on data sampled to 3 items per record the validation share is
        around 25-30%, not 10%. The same characters appear in both splits (in-user evaluation).
    held_out_users: a true ratio of *users*: round(val_ratio * n_users) users (at least 1 when val_ratio > 0 and
        there are 2+ users), chosen with the seed, go entirely to val.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1) (got {val_ratio}).")
    groups: dict[str, list[DialogueSample]] = defaultdict(list)
    for s in samples:
        groups[s.user_hash].append(s)
    rng = random.Random(seed)
    train, val = [], []
    if mode == "per_user":
        for group in groups.values():
            group = list(group)
            rng.shuffle(group)
            n_train = max(1, math.floor(len(group) * (1 - val_ratio)))
            train += group[:n_train]
            val += group[n_train:]
    elif mode == "held_out_users":
        users = list(groups)
        rng.shuffle(users)
        n_val = round(val_ratio * len(users))
        if val_ratio > 0 and len(users) > 1:
            n_val = min(max(1, n_val), len(users) - 1)
        held_out = set(users[:n_val])
        for s in samples:
            (val if s.user_hash in held_out else train).append(s)
    else:
        raise ValueError(f"split mode {mode!r} is not one of: per_user, held_out_users.")
    return train, val


def _words(text: str) -> set[str]:
    return set(text.lower().split())


def attach_history(samples: list[DialogueSample], train: list[DialogueSample], max_items: int = 15,
                   max_candidates: int = 30) -> None:
    """Sets `sample.history` for every sample from the character's lines in the *training* samples only.

    Candidates are the character's own context turns and targets from the user's other training samples, in file
    order, minus the current target and the lines already in the current context; deduplicated keeping the most
    recent occurrence, limited to the last `max_candidates`. With more than `max_items` left, the `max_items` with the
    highest word-set Jaccard overlap with the current context are kept, in their original order (the original's rule,
    without its target-leaking cache).
    """
    by_user: dict[str, list[DialogueSample]] = defaultdict(list)
    for s in sorted(train, key=lambda s: s.index):
        by_user[s.user_hash].append(s)
    for sample in samples:
        own_context = {t.content for t in sample.context if t.role == "assistant"}
        lines: list[str] = []
        for other in by_user.get(sample.user_hash, []):
            if other is sample:
                continue
            lines += [t.content for t in other.context if t.role == "assistant"] + [other.target]
        lines = [x for x in lines if x and x != sample.target and x not in own_context]
        last = {x: i for i, x in enumerate(lines)}  # dedupe, keeping the most recent occurrence
        candidates = [x for i, x in enumerate(lines) if last[x] == i][-max_candidates:]
        if len(candidates) > max_items:
            ctx = _words(" ".join(t.content for t in sample.context))

            def jaccard(x: str) -> float:
                w = _words(x)
                return len(w & ctx) / max(len(w | ctx), 1)

            best = sorted(range(len(candidates)), key=lambda i: -jaccard(candidates[i]))[:max_items]
            candidates = [candidates[i] for i in sorted(best)]
        sample.history = candidates

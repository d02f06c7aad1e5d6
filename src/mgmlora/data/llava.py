r"""LLaVA-style image-text JSON: reading, checking and tokenising records for any image-text family.

Records: `{"id": str, "image": "relative/path.jpg" (optional), "conversations": [{"from": "human"|"gpt", "value":
str}, ...]}`; roles alternate human/gpt (a leading gpt turn is dropped, as the original). A record with an `image`
has at most one `<image>` tag, in a human turn; the tag is removed from the question and the family's template puts
the image where the family wants it (MGM: in front of the first question). A record without `image` has no tag (a
text-only sample).

The rounds are rendered by the model family's processor (`Processor.render`, mgmlora.models.processor; MGM's Gemma
template in mgmlora.models.mgm_processor), which places the image and names the supervised character spans. The text
is split at the image placeholder the template placed and each chunk tokenised on its own with one IMAGE_TOKEN_INDEX
between chunks, as the original `tokenizer_image_token`; labels come from character spans, so chunk boundaries cannot
shift them. Questions and answers are text (mgmlora.data.literal): an `<image>` or a control token spelled out in a
prompt stays text, so the image goes only where the family's template puts it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from mgmlora.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mgmlora.data.chat import TokenizedSample
from mgmlora.data.literal import LiteralEncoder, Span, label_tokens, overlaps, render_located
from mgmlora.data.textfile import read_utf8
from mgmlora.models.processor import IMAGE_PLACEHOLDER, Processor, Rounds

IMAGE = IMAGE_PLACEHOLDER  # the LLaVA format's image tag, which is also where a rendered template puts the image


class LlavaFormatError(ValueError):
    """A LLaVA record is malformed; the message names the file, the record, the key and the fix."""


def read_llava_json(path: str | Path) -> list[dict]:
    """Reads and validates a LLaVA JSON list (or JSONL, one record per line).

    Raises:
        FileNotFoundError: when `path` does not exist.
        LlavaFormatError: naming file, record index and id, and key, for any malformed record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA data file {str(path)!r} does not exist.")
    text = read_utf8(path, LlavaFormatError)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise LlavaFormatError(f"{path}: not valid JSON at line {err.lineno} ({err.msg}).") from err
    else:  # JSONL: each line parsed alone, so an error's line number is the line's in the file, not 1
        records = []
        for line_no, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LlavaFormatError(f"{path}: not valid JSON at line {line_no} ({err.msg}); write one JSON "
                                       "record per line, or one JSON list.") from err
    if not records:
        raise LlavaFormatError(f"{path}: no records.")
    for i, record in enumerate(records):
        where = f"{path}: record {i} (id={record.get('id') if isinstance(record, dict) else None!r})"
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise LlavaFormatError(f"{where}: key 'conversations' must be a list of {{from, value}} turns.")
        if "image" in record and not isinstance(record["image"], str):
            raise LlavaFormatError(f"{where}: key 'image' must be a path string (one image per sample for MGM-2B).")
        for k, turn in enumerate(record["conversations"]):
            if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") or not isinstance(
                    turn.get("value"), str):
                raise LlavaFormatError(f"{where}: conversations[{k}] must be {{\"from\": \"human\"|\"gpt\", \"value\": "
                                       f"str}}, got {turn!r:.80}.")
        _check_image_tags(record, where)
        _check_alternation(record, where)
    return records


def _check_alternation(record: dict, where: str) -> None:
    """Each (question, answer) pair `rounds` reads is a human then a gpt turn (a leading gpt turn is dropped)."""
    turns = record["conversations"]
    first = 1 if turns and turns[0]["from"] == "gpt" else 0
    for k in range(first, len(turns) - (len(turns) - first) % 2):
        expected = "human" if (k - first) % 2 == 0 else "gpt"
        if turns[k]["from"] != expected:
            raise LlavaFormatError(f"{where}: conversations[{k}] is a {turns[k]['from']} turn where a {expected} turn "
                                   "belongs; turns must alternate human/gpt (merge or remove the extra turn).")


def _check_image_tags(record: dict, where: str) -> None:
    """One image per sample, and an `<image>` tag only where there is an image.

    A record with an `image` and no tag is fine (the tag is put in front of the first question), and so is a record
    with neither (a text-only sample, part of MGM's recipe). Two tags would be merged into one image slot, and a tag
    without an image would be dropped and the record trained text-only: both mean the data is not what its author
    thinks it is.
    """
    tags = [k for k, turn in enumerate(record["conversations"]) for _ in range(turn["value"].count(IMAGE))]
    if len(tags) > 1:
        raise LlavaFormatError(f"{where}: {len(tags)} {IMAGE} tags (in conversations{sorted(set(tags))}), but MGM "
                               f"takes one image per sample; keep one {IMAGE} tag and split the rest into records of "
                               "their own.")
    if tags and "image" not in record:
        raise LlavaFormatError(f"{where}: conversations[{tags[0]}] has an {IMAGE} tag but the record has no 'image' "
                               f"key; add the image's path under 'image', or remove the tag for a text-only sample.")
    if tags and record["conversations"][tags[0]]["from"] != "human":
        raise LlavaFormatError(f"{where}: the {IMAGE} tag is in a gpt turn (conversations[{tags[0]}]); move it to a "
                               "human turn (the model cannot be trained to emit an image).")


def rounds(record: dict) -> Rounds:
    """The record's (question, answer) rounds, image tags removed (the family's template places the image)."""
    turns = list(record["conversations"])
    if turns and turns[0]["from"] == "gpt":
        turns = turns[1:]  # the original drops a leading gpt turn
    has_image = "image" in record
    out = []
    for i in range(0, len(turns) - 1, 2):
        question, answer = turns[i]["value"], turns[i + 1]["value"]
        if turns[i]["from"] != "human" or turns[i + 1]["from"] != "gpt":
            raise LlavaFormatError(f"record id={record.get('id')!r}: conversations must alternate human/gpt.")
        if IMAGE in question or (i == 0 and has_image):
            question = question.replace(IMAGE, "").strip()
        out.append((question, answer))
    return out


def render(processor: Processor, record: dict) -> tuple[str, list[tuple[int, int]]]:
    """The record in the family's template, and the character spans that are supervised."""
    return processor.render(rounds(record), "image" in record)


def _located(render_text: Callable[[Rounds], str], pairs: Rounds) -> tuple[str, list[Span]]:
    """`render_text(pairs)` and the span of each question and answer in it (mgmlora.data.literal)."""
    def render_texts(texts: list[str]) -> str:
        return render_text(list(zip(texts[::2], texts[1::2])))

    return render_located(render_texts, [text for pair in pairs for text in pair])


def generation_prompt(tokenizer: PreTrainedTokenizerBase, processor: Processor, question: str,
                      has_image: bool) -> list[int]:
    """Token ids of a one-question prompt in the training template, ending with the model turn's header.

    The question is text: an `<image>` or a control token spelled out in it stays text.
    """
    text, texts = render_located(lambda q: processor.prompt(q[0], has_image), [question])
    return _tokenize(tokenizer, text, texts, [])[0]


@lru_cache(maxsize=4)
def _literal(tokenizer: PreTrainedTokenizerBase) -> LiteralEncoder:
    return LiteralEncoder(tokenizer)


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str, texts: list[Span], spans: list[Span]
              ) -> tuple[list, list]:
    """Ids with IMAGE_TOKEN_INDEX for each <image> the template placed, labels on the characters inside `spans`.

    `texts` are the questions' and answers' spans: what is inside them is encoded as text (an `<image>` there too).
    """
    images = [m.start() for m in re.finditer(re.escape(IMAGE), text) if not overlaps(m.start(), m.end(), texts)]
    ids, starts, cursor = [], [], 0
    for at in [*images, len(text)]:
        chunk_ids, chunk_starts = _literal(tokenizer).encode(text, texts, cursor, at)
        ids += chunk_ids
        starts += chunk_starts
        if at < len(text):
            ids.append(IMAGE_TOKEN_INDEX)
            starts.append(-1)  # outside every span: never labelled
        cursor = at + len(IMAGE)
    return ids, label_tokens(ids, starts, spans, IGNORE_INDEX)


def tokenize_record(tokenizer: PreTrainedTokenizerBase, processor: Processor, record: dict) -> TokenizedSample:
    """Token ids with one IMAGE_TOKEN_INDEX per image, and labels on the answers only (unexpanded)."""
    pairs, has_image = rounds(record), "image" in record
    text, texts = _located(lambda r: processor.render(r, has_image)[0], pairs)
    ids, labels = _tokenize(tokenizer, text, texts, processor.render(pairs, has_image)[1])
    return TokenizedSample(ids, labels, meta={"id": record.get("id"), "image": record.get("image")})


def fit_after_expansion(sample: TokenizedSample, image_tokens: int, max_length: int) -> TokenizedSample | None:
    """Truncates so that the sequence *after* image expansion fits `max_length` (the model then cuts nothing).

    Returns None when no supervised token would survive (the original trained on such samples with an all-ignored
    loss; mgmlora skips and counts them).
    """
    n_images = sum(1 for t in sample.input_ids if t == IMAGE_TOKEN_INDEX)
    budget = max_length - n_images * (image_tokens - 1)
    if len(sample.input_ids) > budget:
        sample = TokenizedSample(sample.input_ids[:max(budget, 0)], sample.labels[:max(budget, 0)], sample.meta)
        if n_images and IMAGE_TOKEN_INDEX not in sample.input_ids:
            return None
    return sample if sample.num_supervised > 0 else None

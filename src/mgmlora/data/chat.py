"""Chat conversations: reading `{"messages": [...]}` JSONL, and turning messages into training tensors.

The second half is the model-family transform every data source goes through: the tokenizer's own chat template
renders the conversation, and labels cover only assistant text plus the end-of-turn token that closes it (so the
model learns to stop). Labels are found on the rendered string, not by re-tokenising pieces, which works for any
chat template whose assistant content appears verbatim (ChatML/Qwen3, Gemma, Llama 3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import PreTrainedTokenizerBase

from mgmlora.batch import IGNORE_INDEX
from mgmlora.data.textfile import read_utf8

ROLES = ("system", "user", "assistant")
TrainOn = Literal["all_assistant", "last_assistant"]


class DataFormatError(ValueError):
    """A record of an input file is malformed; the message names the file, the record, the key and the fix."""


def _check_messages(messages: object, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: key 'messages' must be a non-empty list of {{role, content}} objects.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataFormatError(f"{where}: messages[{i}] must be an object with keys 'role' and 'content'.")
        if m["role"] not in ROLES:
            raise DataFormatError(f"{where}: messages[{i}].role is {m['role']!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(m["content"], str):
            kind = type(m["content"]).__name__
            raise DataFormatError(f"{where}: messages[{i}].content must be a string, got {kind}.")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{where}: no message has role 'assistant', so there is nothing to learn; add the "
                              "reply to predict or remove the record.")
    return messages


def read_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """Reads one conversation per line: `{"messages": [{"role": ..., "content": ...}, ...], ...}`.

    Extra keys on a line are ignored. Blank lines are skipped.

    Raises:
        FileNotFoundError: when `path` does not exist.
        DataFormatError: naming the file, line number and key, for bytes that are not UTF-8, invalid JSON or an
            invalid conversation.
    """
    return [messages for _, messages in read_chat_lines(path)]


def read_chat_lines(path: str | Path) -> list[tuple[int, list[dict]]]:
    """`read_chat_jsonl` with each conversation's 1-based line number in the file (blank lines do not shift it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist.")
    conversations = []
    for line_no, line in enumerate(read_utf8(path, DataFormatError).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{where}: not valid JSON ({err.msg}); write one JSON object per line.") from err
        if not isinstance(record, dict) or "messages" not in record:
            raise DataFormatError(f"{where}: missing key 'messages' (expected {{\"messages\": [...]}}).")
        conversations.append((line_no, _check_messages(record["messages"], where)))
    if not conversations:
        raise DataFormatError(f"{path}: no conversations found (the file is empty).")
    return conversations


@dataclass
class TokenizedSample:
    """One training sample: token ids and labels of equal length (IGNORE_INDEX where not supervised)."""

    input_ids: list[int]
    labels: list[int]
    meta: dict | None = None  # source information (e.g. user_hash), carried for inspection tools

    @property
    def num_supervised(self) -> int:
        """Number of predicted tokens after the causal shift (label at position 0 predicts nothing)."""
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)


class ChatTokenizer:
    """Renders conversations with the tokenizer's chat template and labels the assistant spans.

    Args:
        tokenizer: a fast tokenizer (offsets are needed) with a chat template.
        max_length: longest sample in tokens; longer conversations lose their oldest turns first, and a conversation
            whose last assistant turn alone does not fit is skipped (counted in `skipped`), never cut mid-target.
        train_on: label every assistant turn, or only the last one.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, train_on: TrainOn = "all_assistant"):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("mgmlora needs a fast tokenizer (tokenizer.json) to locate assistant spans by offsets.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train_on = train_on
        self.skipped = 0
        # Longest first, so "<|im_end|>" wins over a shorter special token that is its prefix.
        self._specials = sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the model sees it (the same builder serves training and generation)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _assistant_spans(self, text: str, messages: list[dict]) -> list[tuple[int, int]]:
        spans, cursor = [], 0
        targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on == "last_assistant":
            targets = targets[-1:]
        for i, m in enumerate(messages):
            content = m["content"].strip()
            start = text.find(content, cursor) if content else cursor
            if start < 0:
                raise ValueError(f"the chat template changed the text of message {i} ({content[:40]!r}...); mgmlora "
                                 "cannot locate it to set labels. Use a template that keeps message content verbatim.")
            end = start + len(content)
            if i in targets:
                end += next((len(s) for s in self._specials if text.startswith(s, end)), 0)  # the end-of-turn token
                spans.append((start, end))
            cursor = end
        return spans

    def encode(self, messages: list[dict]) -> TokenizedSample:
        """Tokenises `messages` as rendered by the chat template, labelling the assistant spans; no truncation."""
        text = self.render(messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = self._assistant_spans(text, messages)
        labels = [tok if any(a <= s < b for a, b in spans) else IGNORE_INDEX
                  for tok, (s, _) in zip(enc["input_ids"], enc["offset_mapping"])]
        return TokenizedSample(list(enc["input_ids"]), labels)

    def __call__(self, messages: list[dict]) -> TokenizedSample | None:
        """Tokenises one conversation, or returns None (and counts it) when its target cannot fit `max_length`."""
        messages = list(messages)
        while True:
            sample = self.encode(messages)
            if len(sample.input_ids) <= self.max_length:
                return sample
            # Drop the oldest exchange after any leading system prompt; the rest still starts on a user turn.
            head = 1 if messages[0]["role"] == "system" else 0
            rest = messages[head + 1:]
            while rest and rest[0]["role"] != "user":
                rest = rest[1:]
            if not any(m["role"] == "assistant" for m in rest):
                self.skipped += 1
                return None
            messages = messages[:head] + rest

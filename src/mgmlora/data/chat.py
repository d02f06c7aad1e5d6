"""Chat conversations: reading `{"messages": [...]}` JSONL, and turning messages into training tensors.

The second half is the model-family transform every data source goes through: the tokenizer's own chat template
renders the conversation, and labels cover only assistant text plus the end-of-turn token that closes it (so the
model learns to stop). Labels are found on the rendered string, not by re-tokenising pieces, which works for any
chat template whose message content appears verbatim or trimmed (ChatML/Qwen3, Gemma, Llama 3). Where each message
sits in that string is known exactly, and message text is encoded as text (mgmlora.data.literal): a control token
spelled out in a data file or prompt cannot end a turn or open an assistant turn.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import PreTrainedTokenizerBase

from mgmlora.batch import IGNORE_INDEX
from mgmlora.data.literal import LiteralEncoder, Span, label_tokens, render_located
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

    Message text is encoded as text: a control token of the template spelled out inside a message does not become
    that token (mgmlora.data.literal).

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
        self.literal = LiteralEncoder(tokenizer)
        # Longest first, so "<|im_end|>" wins over a shorter special token that is its prefix.
        self._specials = sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the model sees it (the same builder serves training and generation)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _tokens(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[Span], list, list]:
        """The rendered text, each message's span in it, and the token ids and start characters."""
        def render(texts: list[str]) -> str:
            return self.render([{**m, "content": t} for m, t in zip(messages, texts)], add_generation_prompt)

        text, spans = render_located(render, [m["content"] for m in messages])
        return (text, spans, *self.literal.encode(text, spans))

    def _supervised(self, text: str, spans: list[Span], messages: list[dict]) -> list[Span]:
        """The assistant text (trimmed) of each target turn plus the end-of-turn token that follows it."""
        targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on == "last_assistant":
            targets = targets[-1:]
        out = []
        for i in targets:
            a, b = spans[i]
            start = a + len(text[a:b]) - len(text[a:b].lstrip())
            end = max(start, a + len(text[a:b].rstrip()))
            end += next((len(s) for s in self._specials if text.startswith(s, end)), 0)  # the end-of-turn token
            out.append((start, end))
        return out

    def encode(self, messages: list[dict]) -> TokenizedSample:
        """Tokenises `messages` as rendered by the chat template, labelling the assistant spans; no truncation."""
        text, spans, ids, starts = self._tokens(messages, False)
        return TokenizedSample(ids, label_tokens(ids, starts, self._supervised(text, spans, messages), IGNORE_INDEX))

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` plus the assistant header, for generation."""
        return self._tokens(messages, True)[2]

    def fit_prompt(self, messages: list[dict], limit: int) -> tuple[list[int], list[dict]]:
        """`prompt_ids` of `messages` without their oldest exchanges, so that it fits `limit`, and the messages kept.

        Exchanges are dropped as training drops them; when nothing fits, the last message alone (after any system
        prompt) is the prompt, even if over `limit`.
        """
        fitted = self._fit(messages, limit, True, len(messages) - 1)
        if fitted is None:
            kept = messages[:self._head(messages)] + messages[-1:]
            return self.prompt_ids(kept), kept
        return fitted[2], fitted[4]

    def __call__(self, messages: list[dict]) -> TokenizedSample | None:
        """Tokenises one conversation, or returns None (and counts it) when its target cannot fit `max_length`."""
        messages = list(messages)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)  # -1: nothing to drop
        fitted = self._fit(messages, self.max_length, False, last)
        if fitted is None:
            self.skipped += 1
            return None
        text, spans, ids, starts, kept = fitted
        return TokenizedSample(ids, label_tokens(ids, starts, self._supervised(text, spans, kept), IGNORE_INDEX))

    @staticmethod
    def _head(messages: list[dict]) -> int:
        return 1 if messages and messages[0]["role"] == "system" else 0

    def _fit(self, messages: list[dict], limit: int, add_generation_prompt: bool, keep: int) -> tuple | None:
        """`_tokens` of `messages` without its oldest exchanges, the fewest dropped that fit `limit`, and the kept ones.

        Dropping an exchange removes everything from the first message after any system prompt up to the next user
        message, so what is left starts on a user turn; message `keep` is never dropped (None when nothing fits).
        The whole conversation is tokenised once and the length after each possible drop is read off its token
        offsets, which is exact for a template that renders each turn on its own (every common one): one more
        tokenisation confirms it, so the work grows linearly with the conversation. A template for which it is not
        exact falls back to tokenising each candidate in turn.
        """
        text, spans, ids, starts = whole = self._tokens(messages, add_generation_prompt)
        if len(ids) <= limit:
            return (*whole, messages)
        head = self._head(messages)
        cuts = [j for j in range(head + 1, keep + 1) if messages[j]["role"] == "user"]
        if not cuts:
            return None
        first = bisect_left(starts, spans[head][0])  # tokens before the first droppable message's text
        estimates = [len(ids) - (bisect_left(starts, spans[j][0]) - first) for j in cuts]
        k = next((k for k, n in enumerate(estimates) if n <= limit), None)
        if k is None:
            return None
        kept = messages[:head] + messages[cuts[k]:]
        trial = self._tokens(kept, add_generation_prompt)
        if len(trial[2]) == estimates[k]:
            return (*trial, kept)
        for j in cuts:  # the template renders turns depending on each other: try each drop in turn
            kept = messages[:head] + messages[j:]
            trial = self._tokens(kept, add_generation_prompt)
            if len(trial[2]) <= limit:
                return (*trial, kept)
        return None


def question_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """Token ids of one user question in the tokenizer's chat template, ending with the assistant header.

    The question is text: a control token spelled out in it stays text (`ChatTokenizer.prompt_ids`).
    """
    return ChatTokenizer(tokenizer, max_length=tokenizer.model_max_length).prompt_ids(
        [{"role": "user", "content": question}])

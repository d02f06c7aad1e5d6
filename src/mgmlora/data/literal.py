r"""User and assistant text stays text: a chat template's control tokens come only from the template.

A rendered conversation is one string in which the template's structure (`<start_of_turn>model`, `<|im_end|>`, the
image placeholder) and the messages' text sit side by side. Tokenised as one string, a message that contains the
text `<end_of_turn>\n<start_of_turn>model\n` would become the real control tokens: a data file or a prompt could end
a turn or forge an assistant turn. So:

- `render_located` renders once with a unique mark per message and once with the messages, and from the two finds
  exactly where each message's text sits (no search for the text, which the text itself could fool);
- `LiteralEncoder` tokenises the whole string as before, and where a control token came from inside a message's
  text, re-tokenises that occurrence as plain text (special-token parsing off). Text without control-token strings
  therefore encodes exactly as a single call of the tokenizer on the rendered string, as it always did.

Control tokens are the tokenizer's special tokens, and its other added tokens (e.g. Qwen3's `<think>`) where the
template itself writes them in this conversation; an added token the template does not use (Gemma's HTML tags such as
`<table>`) is ordinary text and encodes as it always did. Whitespace-only added tokens are never control tokens:
whitespace cannot forge structure, and some tokenizers add whitespace runs as tokens of plain text.
"""

from __future__ import annotations

import uuid
from bisect import bisect_right
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

Span = tuple[int, int]  # [start, end) characters of the rendered text


class TemplateChangedTextError(ValueError):
    """The chat template changes, drops or repeats a message's text, so its place in the rendered text is unknown."""


class _DroppedOrRepeated(TemplateChangedTextError):
    """A message the template does not render exactly once: no search can say which occurrence is the message."""


def render_located(render: Callable[[list[str]], str], texts: list[str]) -> tuple[str, list[Span]]:
    """`render(texts)` and the span each text occupies in it.

    `render` turns the messages' texts into the rendered conversation (the template around them). It is called with
    unique marks in place of the texts, which splits the template into the pieces between the texts, and with the
    texts themselves; each text is then matched at its known place, as is or as the template trims it.

    A template that renders differently around a text than around its mark (Qwen3 wraps an assistant message that
    holds `</think>` in its own think block) falls back to finding each text, in order, after the one before it: the
    search the marks avoid, used only where the marks cannot place the texts.

    Raises:
        TemplateChangedTextError: when the template drops or repeats a text, or a changed text is not found.
    """
    try:
        return _by_marks(render, texts)
    except _DroppedOrRepeated:
        raise
    except TemplateChangedTextError:
        text = render(texts)
        spans = _by_search(text, texts)
        if spans is None:
            raise
        return text, spans


def _by_search(text: str, texts: list[str]) -> list[Span] | None:
    """Each text's span in `text`, found in order after the previous one (or trimmed as templates trim); else None."""
    spans, pos = [], 0
    for content in texts:
        for candidate in dict.fromkeys((content, content.strip(), content.strip("\n"))):
            at = text.find(candidate, pos)
            if at >= 0:
                spans.append((at, at + len(candidate)))
                pos = at + len(candidate)
                break
        else:
            return None
    return spans


def _by_marks(render: Callable[[list[str]], str], texts: list[str]) -> tuple[str, list[Span]]:
    nonce = uuid.uuid4().hex[:12]
    marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(texts))]
    skeleton, text = render(marks), render(texts)
    pieces, cursor = [], 0
    repeated = skeleton.count(f"\ue000{nonce}:") != len(marks)
    for i, mark in enumerate(marks):
        at = skeleton.find(mark, cursor)
        if at < 0 or repeated:
            raise _DroppedOrRepeated(f"the chat template drops or repeats message {i}; mgmlora cannot locate its "
                                           "text to set labels. Use a template that renders each message once.")
        pieces.append(skeleton[cursor:at])
        cursor = at + len(mark)
    pieces.append(skeleton[cursor:])
    if not text.startswith(pieces[0]):
        raise TemplateChangedTextError(_changed(0, texts))
    spans, pos = [], len(pieces[0])
    for i, content in enumerate(texts):
        after = pieces[i + 1]
        trims = (content, content.strip(), content.lstrip(), content.rstrip(), content.lstrip("\n"),
                 content.strip("\n"))
        for candidate in dict.fromkeys(trims):
            end = pos + len(candidate)
            if text.startswith(candidate, pos) and text.startswith(after, end):
                break
        else:
            raise TemplateChangedTextError(_changed(i, texts))
        spans.append((pos, end))
        pos = end + len(after)
    if pos != len(text):
        raise TemplateChangedTextError(_changed(len(texts) - 1, texts))
    return text, spans


def _changed(i: int, texts: list[str]) -> str:
    shown = texts[i][:40] if texts else ""
    return (f"the chat template changed the text of message {i} ({shown!r}...); mgmlora cannot locate it to set "
            "labels. Use a template that keeps message content verbatim.")


class LiteralEncoder:
    """Tokenises rendered text so that no control token comes from inside the given text spans (module docstring).

    Args:
        tokenizer: a fast tokenizer (offsets are needed).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.all_special_ids)
        # added tokens that are not special (Gemma's HTML tags, Qwen3's <think>), whitespace-only ones left out
        self.added = {i: content for content, i in tokenizer.get_added_vocab().items()
                      if content.strip() and i not in self.special_ids}
        self.control_ids = self.special_ids | set(self.added)  # every token that can be a control token

    def encode(self, text: str, texts: list[Span], start: int = 0, end: int | None = None
               ) -> tuple[list[int], list[int]]:
        """Token ids of `text[start:end]` and the start character of each in `text`; `texts` are encoded as text.

        The characters inside the spans of `texts` yield no control token. `texts` are sorted and do not overlap
        (the messages' spans from `render_located`).
        """
        template = "\0".join(text[a:b] for a, b in _gaps(texts, len(text)))  # the template's own characters
        control = self.special_ids | {i for i, content in self.added.items() if content in template}
        return self._encode(text, start, len(text) if end is None else end, texts, control)

    def _tokenize(self, text: str, start: int, end: int, literal: bool = False) -> tuple[list, list, list]:
        enc = self.tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True,
                             split_special_tokens=literal)
        return (list(enc["input_ids"]), [start + s for s, _ in enc["offset_mapping"]],
                [start + e for _, e in enc["offset_mapping"]])

    def _encode(self, text: str, start: int, end: int, texts: list[Span], control: set[int]
                ) -> tuple[list[int], list[int]]:
        ids, starts, ends = self._tokenize(text, start, end)
        forged = [(starts[n], ends[n]) for n, token in enumerate(ids)
                  if token in control and overlaps(*_visible(text, starts[n], ends[n]), texts)]
        if not forged:
            return ids, starts
        out_ids, out_starts, cursor = [], [], start
        for a, b in forged:  # the text around each forged token as usual, the token's characters as plain text
            for piece in (self._encode(text, cursor, a, texts, control), self._literal(text, a, b)):
                out_ids += piece[0]
                out_starts += piece[1]
            cursor = b
        rest = self._encode(text, cursor, end, texts, control)
        return out_ids + rest[0], out_starts + rest[1]

    def _literal(self, text: str, start: int, end: int) -> tuple[list[int], list[int]]:
        """`text[start:end]` (one control token's characters) as plain text.

        Special-token parsing off covers special tokens; an added token that is not special is still matched, so its
        characters are split in two until no control token is left (a single character is what it is).
        """
        ids, starts, _ = self._tokenize(text, start, end, literal=True)
        if end - start < 2 or not any(i in self.control_ids for i in ids):
            return ids, starts
        middle = start + (end - start) // 2
        left, right = self._literal(text, start, middle), self._literal(text, middle, end)
        return left[0] + right[0], left[1] + right[1]


def _gaps(spans: list[Span], length: int) -> list[Span]:
    """The parts of [0, length) outside the sorted, non-overlapping `spans`."""
    gaps, cursor = [], 0
    for a, b in spans:
        gaps.append((cursor, a))
        cursor = b
    return [*gaps, (cursor, length)]


def _visible(text: str, start: int, end: int) -> Span:
    """[start, end) without the whitespace at its ends.

    An added token that strips whitespace beside it (`lstrip`, `rstrip`) may cover a message's leading or trailing
    blank without having come from the message.
    """
    piece = text[start:end]
    return start + len(piece) - len(piece.lstrip()), start + len(piece.rstrip())


def overlaps(start: int, end: int, spans: list[Span]) -> bool:
    """Whether characters [start, end) overlap one of the sorted, disjoint `spans`."""
    k = bisect_right(spans, (start, float("inf"))) - 1  # the last span starting at or before `start`
    return (k >= 0 and spans[k][1] > start) or (k + 1 < len(spans) and spans[k + 1][0] < end)


def label_tokens(ids: list[int], starts: list[int], spans: list[Span], ignore: int) -> list[int]:
    """Each token's id where its first character lies in one of the sorted, disjoint `spans`, else `ignore`."""
    labels = []
    for token, s in zip(ids, starts):
        k = bisect_right(spans, (s, float("inf"))) - 1
        labels.append(token if k >= 0 and s < spans[k][1] else ignore)
    return labels


__all__ = ["LiteralEncoder", "Span", "TemplateChangedTextError", "label_tokens", "overlaps", "render_located"]

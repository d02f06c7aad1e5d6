"""Persona-dialogue prompts: the seven ablations and the `simple` layout, one builder for training and generation.

The `simple` layout reproduces the original's training prompt (docs/design/chameleons.md): one system
message whose parts are joined by a blank line:

    [USER_HASH=<hash>]
    [USER_PROFILE] + one tag per line            (profile ablations)
    [TASK] + the task sentence
    [HISTORY] + numbered lines                   (history ablations)
    [RECENT_DIALOGUE] + "User: ..." / "Assistant: ..." lines   (context ablations)
    Continue the dialogue as the character:      (after 3 newlines) and the Note line (after 4)

The target is the continuation between "[ANSWER]" and "[/ANSWER]" lines, as the assistant reply. Unlike the
original, generation uses this very builder (the original's inference prompt differed from its training prompt in
four ways).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mgmlora.data.chameleons import DialogueSample
from mgmlora.models.generation import END_OF_TURN

AblationName = Literal[
    "profile_and_history_and_context", "profile_and_history", "profile_and_context", "history_and_context",
    "profile_only", "history_only", "context_only",
]


@dataclass(frozen=True)
class Ablation:
    """Which optional prompt sections an ablation uses ([USER_HASH], [TASK] and the instruction are always there)."""

    use_profile: bool
    use_history: bool
    use_context: bool


ABLATIONS: dict[str, Ablation] = {
    "profile_and_history_and_context": Ablation(True, True, True),
    "profile_and_history": Ablation(True, True, False),
    "profile_and_context": Ablation(True, False, True),
    "history_and_context": Ablation(False, True, True),
    "profile_only": Ablation(True, False, False),
    "history_only": Ablation(False, True, False),
    "context_only": Ablation(False, False, True),
}

CHAMELEONS_DESCRIPTION = "基于角色在电影中的历史对话数据，模拟该角色的对话风格和行为模式"
CHAMELEONS_TASK = ("Given the historical dialogue of a character in a movie, model the character's speaking style and "
                   "behavioral patterns, and predict the next utterance the user would produce.")
CONTINUE = "\nContinue the dialogue as the character:"
NOTE = ("Note: Do not include any thinking process or explanation. Output only the character's response between "
        "[ANSWER] and [/ANSWER] tags.")
HISTORY_ITEM_CHARS = 200  # the original cuts each history line to 197 characters + "..."


def get_ablation(name: str) -> Ablation:
    """Returns the named ablation.

    Raises:
        ValueError: listing the seven valid names.
    """
    try:
        return ABLATIONS[name]
    except KeyError:
        raise ValueError(f"unknown ablation {name!r}; use one of: {', '.join(ABLATIONS)}.") from None


def format_target(continuation: str) -> str:
    """The supervised reply: the continuation between [ANSWER] tags."""
    return f"[ANSWER]\n{continuation}\n[/ANSWER]"


def parse_answer(text: str) -> str:
    """The first non-empty [ANSWER]...[/ANSWER] span of a generated reply, else the stripped text."""
    rest = text
    while "[ANSWER]" in rest:
        rest = rest.split("[ANSWER]", 1)[1]
        answer = rest.split("[/ANSWER]", 1)[0].strip()
        if answer:
            return answer
    return text.replace("[/ANSWER]", "").strip()


def clean_reply(text: str) -> str:
    """The answer span of a generated reply, without template tokens or tags (what is scored and written out)."""
    answer = parse_answer(text)
    for token in END_OF_TURN + ("[ANSWER]", "[/ANSWER]"):
        answer = answer.replace(token, "")
    return answer.strip()


def _profile_lines(profile: dict) -> list[str]:
    lines = [f"[USER_{key.upper()}={profile[key]}]" for key in ("name", "age", "gender") if profile.get(key)]
    for key, value in (profile.get("dimensions") or {}).items():
        if isinstance(value, dict):  # nested: scale -> sub-dimension -> score
            lines += [f"[DIM_{key.upper()}_{sub.upper()}={score}]" for sub, score in value.items()]
        else:
            lines.append(f"[DIM_{key.upper().replace('.', '_')}={value}]")
    skip = {"name", "age", "gender", "dimensions", "unstructured"}
    lines += [f"[USER_{key.upper()}={value}]" for key, value in profile.items() if key not in skip and value]
    return lines


def build_system_prompt(sample: DialogueSample, ablation: Ablation, keep_turns: int | None = None,
                        keep_history: int | None = None, mark_omitted: bool = False) -> str:
    """The `simple` prompt for `sample`.

    Args:
        sample: the data item.
        ablation: which sections to include.
        keep_turns: keep only the newest `keep_turns` context turns (None: all). Used by length fitting.
        keep_history: keep only the newest `keep_history` history lines (None: all).
        mark_omitted: say how many older turns were left out (the original printed a Chinese note that always said
            1; off by default).
    """
    parts = [f"[USER_HASH={sample.user_hash}]"]
    if ablation.use_profile and (lines := _profile_lines(sample.profile)):
        parts.append("[USER_PROFILE]\n" + "\n".join(lines))
    task = CHAMELEONS_TASK if sample.task_description == CHAMELEONS_DESCRIPTION else sample.task_description
    parts.append(f"[TASK]\n{task}")
    history = sample.history if keep_history is None else sample.history[len(sample.history) - keep_history:]
    if ablation.use_history and history:
        items = [h if len(h) <= HISTORY_ITEM_CHARS else h[: HISTORY_ITEM_CHARS - 3] + "..." for h in history]
        parts.append("[HISTORY]\n" + "\n".join(f"{i}. {h}" for i, h in enumerate(items, start=1)))
    turns = sample.context if keep_turns is None else sample.context[len(sample.context) - keep_turns:]
    if ablation.use_context and turns:
        lines = [f"{'Assistant' if t.role == 'assistant' else 'User'}: {t.content}" for t in turns]
        omitted = len(sample.context) - len(turns)
        if mark_omitted and omitted:
            lines.insert(0, f"({omitted} earlier turn{'s' if omitted > 1 else ''} omitted)")
        parts.append("[RECENT_DIALOGUE]\n" + "\n".join(lines))
    parts += [CONTINUE, "", NOTE]
    return "\n\n".join(parts)


def build_messages(system_prompt: str, target: str | None, prompt_role: Literal["system", "user"] = "system"
                   ) -> list[dict]:
    """Chat messages for the tokenizer's template: the prompt, then (in training) the [ANSWER] reply.

    `prompt_role: user` serves chat templates without a system role (Gemma) or that require a user turn.
    """
    messages = [{"role": prompt_role, "content": system_prompt}]
    if target is not None:
        messages.append({"role": "assistant", "content": format_target(target)})
    return messages

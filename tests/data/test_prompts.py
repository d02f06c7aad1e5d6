import pytest

from mgmlora.batch import IGNORE_INDEX
from mgmlora.data.chameleons import DialogueSample, Turn, extract_samples, load_records
from mgmlora.data.chameleons_datamodule import PersonaEncoder
from mgmlora.data.prompts import (
    ABLATIONS,
    build_messages,
    build_system_prompt,
    format_target,
    get_ablation,
    parse_answer,
)
from tests.conftest import ASSETS

# The fixture's first sample under profile_and_history_and_context (docs/design/chameleons.md, Test fixture).
EXPECTED = """[USER_HASH=3f9a1c0b7d2e4a6f8b1c2d3e4f5a6b7c]

[USER_PROFILE]
[USER_NAME=MARLOWE]
[USER_GENDER=m]

[TASK]
Given the historical dialogue of a character in a movie, model the character's speaking style and behavioral patterns, and predict the next utterance the user would produce.

[HISTORY]
1. Rain never stopped anybody.

[RECENT_DIALOGUE]
User: You said you'd be here at nine.
Assistant: The bridge was closed. I walked.
User: In this rain?


Continue the dialogue as the character:



Note: Do not include any thinking process or explanation. Output only the character's response between [ANSWER] and [/ANSWER] tags."""  # noqa: E501


def _first():
    sample = extract_samples(load_records(ASSETS / "chameleons_fixture.json"))[0][0]
    sample.history = ["Rain never stopped anybody."]
    return sample


def test_simple_prompt_reproduces_the_original_layout_exactly():
    assert build_system_prompt(_first(), get_ablation("profile_and_history_and_context")) == EXPECTED
    assert format_target(_first().target) == "[ANSWER]\nRain never stopped anybody who meant it.\n[/ANSWER]"


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_each_ablation_has_exactly_its_sections(name):
    ablation = get_ablation(name)
    text = build_system_prompt(_first(), ablation)
    assert text.startswith("[USER_HASH=3f9a1c0b7d2e4a6f8b1c2d3e4f5a6b7c]") and "[TASK]" in text and "Note:" in text
    assert ("[USER_PROFILE]" in text) == ablation.use_profile
    assert ("[HISTORY]" in text) == ablation.use_history
    assert ("[RECENT_DIALOGUE]" in text) == ablation.use_context


def test_unknown_ablation_lists_the_valid_names():
    with pytest.raises(ValueError, match="use one of: profile_and_history_and_context, .*context_only"):
        get_ablation("context")


def test_long_history_lines_are_cut_to_200_characters():
    sample = _first()
    sample.history = ["x" * 250]
    assert "1. " + "x" * 197 + "...\n" in build_system_prompt(sample, get_ablation("history_only")) + "\n"


def test_parse_answer():
    assert parse_answer("<think></think>[ANSWER]\n Hi there \n[/ANSWER] trailing") == "Hi there"
    assert parse_answer("[ANSWER][/ANSWER][ANSWER]second[/ANSWER]") == "second"
    assert parse_answer("no tags") == "no tags"


def _labels_text(tokenizer, encoded):
    return tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])


def test_labels_are_exactly_the_answer_and_end_of_turn(tokenizer):
    sample = _first()
    encoded = PersonaEncoder(tokenizer, 1024, "context_only", "system")(sample)
    assert _labels_text(tokenizer, encoded) == format_target(sample.target) + "<|im_end|>"
    answer_ids = tokenizer(format_target(sample.target) + "<|im_end|>", add_special_tokens=False).input_ids
    assert [t for t in encoded.labels if t != IGNORE_INDEX] == answer_ids
    assert encoded.meta["user_hash"] == sample.user_hash


def test_generation_uses_the_training_prompt(tokenizer):
    sample = _first()
    encoder = PersonaEncoder(tokenizer, 1024, "profile_and_context", "system")
    prompt = tokenizer.apply_chat_template(encoder.generation_messages(sample), tokenize=False,
                                           add_generation_prompt=True)
    train_text = tokenizer.decode(encoder(sample).input_ids)
    assert train_text.startswith(prompt)
    assert train_text[len(prompt):].startswith("[ANSWER]")


def _long_sample(n_turns=30):
    turns = [Turn("user" if i % 2 == 0 else "assistant", f"turn number {i} says something fairly long here")
             for i in range(n_turns)] + [Turn("user", "and the final question?")]
    return DialogueSample("ab" * 16, {"name": "X"}, "desc", turns, "The final answer.")


def test_truncation_drops_oldest_turns_and_keeps_the_target(tokenizer):
    sample = _long_sample()
    full = len(PersonaEncoder(tokenizer, 100_000, "context_only", "system")(sample).input_ids)
    encoder = PersonaEncoder(tokenizer, full // 2, "context_only", "system")
    encoded = encoder(sample)
    text = tokenizer.decode(encoded.input_ids)
    assert len(encoded.input_ids) <= full // 2 and encoder.truncated == 1 and encoder.skipped == 0
    assert "and the final question?" in text and "turn number 0 " not in text
    assert _labels_text(tokenizer, encoded) == "[ANSWER]\nThe final answer.\n[/ANSWER]<|im_end|>"
    # the kept turns are the newest that fit: one more would not
    kept = sum(f"turn number {i} " in text for i in range(30))
    bigger = PersonaEncoder(tokenizer, 100_000, "context_only", "system")._encode(sample, kept + 2, None)
    assert len(bigger.input_ids) > full // 2


def test_a_target_that_cannot_fit_is_skipped_and_counted(tokenizer):
    encoder = PersonaEncoder(tokenizer, 40, "context_only", "system")
    assert encoder(_long_sample()) is None and encoder.skipped == 1


def test_unicode_round_trips(tokenizer):
    sample = DialogueSample("cd" * 16, {"name": "小林"}, "desc", [Turn("user", "你好吗？🙂")], "很好！🎬")
    encoded = PersonaEncoder(tokenizer, 1024, "profile_and_context", "user")(sample)
    text = tokenizer.decode(encoded.input_ids)
    assert "[USER_NAME=小林]" in text and "User: 你好吗？🙂" in text
    assert _labels_text(tokenizer, encoded) == "[ANSWER]\n很好！🎬\n[/ANSWER]<|im_end|>"
    assert build_messages("p", None, "user") == [{"role": "user", "content": "p"}]

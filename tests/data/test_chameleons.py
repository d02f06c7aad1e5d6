import json
from collections import Counter

import pytest

from mgmlora.data.chameleons import (
    ChameleonsFormatError,
    DialogueSample,
    Turn,
    attach_history,
    extract_samples,
    load_records,
    map_turns,
    sample_data_items,
    split_samples,
)
from tests.conftest import ASSETS

FIXTURE = ASSETS / "chameleons_fixture.json"  # docs/design/chameleons.md, Test fixture


def _names(samples):
    return [s.target for s in samples]


def test_extraction_keeps_one_sample_per_item_with_the_original_rule():
    samples, dropped = extract_samples(load_records(FIXTURE))
    assert len(samples) == 7 and dropped == 1
    assert "And I'm not reading it twice." not in _names(samples)  # context ends with MARLOWE's own turn
    assert "Lights! Somebody get the lights!" in _names(samples)  # empty context: the character's opening line
    first = samples[0]
    assert [(t.role, t.content) for t in first.context] == [
        ("user", "You said you'd be here at nine."), ("assistant", "The bridge was closed. I walked."),
        ("user", "In this rain?")]
    assert Counter(s.user_hash for s in samples)["3f9a1c0b7d2e4a6f8b1c2d3e4f5a6b7c"] == 4  # two records, one user


def test_role_mapping_strips_names_accepts_literal_user_and_drops_empty_turns():
    turns = [{"source": " TESS ", "content": "a"}, {"source": "User", "content": "b"},
             {"source": "DOC", "content": "  "}, {"source": "DOC", "content": "c"}]
    assert [(t.role, t.content) for t in map_turns(turns, "TESS")] == [("assistant", "a"), ("assistant", "b"),
                                                                        ("user", "c")]


def test_empty_continuations_are_dropped(tmp_path):
    records = load_records(FIXTURE)
    records[1]["task"]["task_behavior_collections"][0]["data"][0]["continuation"] = "   "
    samples, dropped = extract_samples(records)
    assert len(samples) == 6 and dropped == 2


def test_data_item_sampling_counts_determinism_and_schema():
    records = load_records(FIXTURE)
    out = sample_data_items(records, 3, seed=42)
    assert [len(r["task"]["task_behavior_collections"][0]["data"]) for r in out] == [3, 1, 2, 1]
    assert all(list(r["task"]["task_behavior_collections"][0]) == ["data"] for r in out)  # `type` dropped
    assert out == sample_data_items(load_records(FIXTURE), 3, seed=42)
    picks = {json.dumps(sample_data_items(records, 1, seed=s)[0]) for s in range(20)}
    assert len(picks) > 1  # the seed matters
    for n in (1, 2, 5):
        got = sum(len(r["task"]["task_behavior_collections"][0]["data"]) for r in sample_data_items(records, n, 7))
        assert got == sum(min(k, n) for k in (4, 1, 2, 1))


def test_per_user_split_matches_the_original():
    samples, _ = extract_samples(load_records(FIXTURE))
    train, val = split_samples(samples, "per_user", 0.1, seed=42)
    assert (len(train), len(val)) == (5, 2)
    per_user = {h: (sum(s.user_hash == h for s in train), sum(s.user_hash == h for s in val))
                for h in {s.user_hash for s in samples}}
    assert sorted(per_user.values()) == [(1, 0), (1, 1), (3, 1)]
    assert split_samples(samples, "per_user", 0.1, seed=42) == (train, val)


def test_held_out_users_split_holds_out_whole_users():
    samples, _ = extract_samples(load_records(ASSETS / "chameleons_demo.json"))
    train, val = split_samples(samples, "held_out_users", 0.25, seed=42)
    train_users, val_users = {s.user_hash for s in train}, {s.user_hash for s in val}
    assert len(val_users) == 1 and len(train_users) == 3 and not train_users & val_users
    assert len(train) + len(val) == len(samples)


def test_history_comes_from_training_samples_and_never_holds_the_target():
    samples, _ = extract_samples(load_records(FIXTURE))
    train, val = split_samples(samples, "per_user", 0.1, seed=42)
    attach_history(train + val, train)
    train_lines = {t.content for s in train for t in s.context if t.role == "assistant"} | {s.target for s in train}
    for s in train + val:
        assert s.target not in s.history
        assert set(s.history) <= train_lines
        assert not set(s.history) & {t.content for t in s.context if t.role == "assistant"}
    val_targets = {s.target for s in val}
    assert not any(set(s.history) & val_targets for s in train + val)  # no validation target leaks anywhere


def test_history_keeps_the_most_relevant_lines_in_original_order():
    def sample(i, target, context="hello there"):
        return DialogueSample("u", {"name": "TESS"}, "", [Turn("user", context)], target, index=(i, 0, 0))

    # Word-set Jaccard overlap with the context {the, red, fox, jumps}, worked out by hand:
    # "jumps high" 1/5, "blue sky" 0, "red fox" 2/4, "nothing here" 0, "the fox" 2/4.
    lines = ["jumps high", "blue sky", "red fox", "nothing here", "the fox"]
    current = sample(9, "my own line", context="the red fox jumps")
    samples = [sample(i, line) for i, line in enumerate(lines)] + [current]
    attach_history(samples, samples, max_items=3, max_candidates=30)
    # the three highest (1/2, 1/2, 1/5) in file order, not in order of relevance ("red fox", "the fox", "jumps high")
    assert current.history == ["jumps high", "red fox", "the fox"]
    # with no more candidates than max_items, all of them, in file order, without the sample's own target
    attach_history(samples, samples, max_items=10, max_candidates=30)
    assert samples[0].history == ["blue sky", "red fox", "nothing here", "the fox", "my own line"]


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r[1]["user"]["profile"].pop("name"), r"record 1: key 'user.profile.name' is missing; expected the "),
    (lambda r: r[0]["task"]["task_behavior_collections"][0]["data"][1].pop("continuation"),
     r"record 0, task.task_behavior_collections\[0\].data\[1\]: key 'continuation' is missing"),
    (lambda r: r[2]["task"]["task_behavior_collections"][0]["data"][1]["context"][0].update(content=5),
     r"record 2, .*data\[1\].context\[0\]: key 'content' is int; expected the utterance \(a string\)"),
    (lambda r: r[3].update(user_hash=None), r"record 3: key 'user_hash' is NoneType"),
])
def test_bad_records_name_file_record_key_and_expectation(tmp_path, mutate, message):
    records = load_records(FIXTURE)
    mutate(records)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ChameleonsFormatError, match=r"bad.json: " + message):
        extract_samples(load_records(path), path)


@pytest.mark.parametrize("text,message", [
    ("", "the file is empty"), ("[]", "non-empty JSON array"), ('{"a": 1}', "got dict"),
    ('[{"user_hash": "x",', "not valid JSON at line 1, column"),
])
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ChameleonsFormatError, match=message):
        load_records(path)


def test_a_missing_file_and_a_directory_are_told_apart(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*gone.json' does not exist\.$"):
        load_records(tmp_path / "gone.json")
    with pytest.raises(FileNotFoundError, match=r"is a directory; pass the JSON file inside it\.$"):
        load_records(tmp_path)


def test_leaderboard_items_without_continuation_are_accepted_when_not_required():
    from mgmlora.data.chameleons import iter_items

    records = load_records(ASSETS / "chameleons_leaderboard_fixture.json")
    assert len(list(iter_items(records, "lb.json", require_continuation=False))) == 1
    with pytest.raises(ChameleonsFormatError, match="continuation"):
        list(iter_items(records, "lb.json"))

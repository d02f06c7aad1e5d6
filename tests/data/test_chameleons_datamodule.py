import json
import math
import subprocess
import sys

import pytest

from mgmlora.batch import IGNORE_INDEX
from mgmlora.data.chameleons import extract_samples, load_records
from mgmlora.data.chameleons_datamodule import ChameleonsDataModule
from tests.conftest import ASSETS, ROOT, TOKENIZER, connect_data

DEMO = ASSETS / "chameleons_demo.json"


def _dm(path=DEMO, **kwargs):
    dm = connect_data(ChameleonsDataModule(str(path), tokenizer_path=str(TOKENIZER), max_length=512, **kwargs))
    dm.setup("fit")
    return dm


def test_datamodule_builds_both_splits_with_labels_on_every_sample():
    dm = _dm()
    total = len(extract_samples(load_records(DEMO))[0])
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == total
    assert dm.stats["train:skipped_too_long"] == 0
    for sample in dm.splits["train"] + dm.splits["val"]:
        assert sample.num_supervised > 0 and len(sample.input_ids) <= 512
        supervised = [t for t in sample.labels if t != IGNORE_INDEX]
        assert supervised[-1] == dm.tokenizer.convert_tokens_to_ids("<|im_end|>")  # end-of-turn closes the target


def test_held_out_users_mode_and_history_ablation():
    dm = _dm(split="held_out_users", val_ratio=0.25, ablation="history_and_context")
    assert not set(dm.user_counts("train")) & set(dm.user_counts("val"))
    assert any(d.history for d in dm.dialogues["train"])
    assert not any(d.history for d in dm.dialogues["val"])  # held-out users have no training lines


@pytest.mark.integration
def test_on_the_fly_sampling_equals_the_sampling_command(tmp_path):
    out = tmp_path / "sampled.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "sample_chameleons.py"), str(DEMO), str(out),
                           "--max_data_items", "3", "--seed", "42"], capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout)
    records = load_records(DEMO)
    n_items = [sum(len(c["data"]) for c in r["task"]["task_behavior_collections"]) for r in records]
    assert summary["data_items_out"] == sum(min(n, 3) for n in n_items)
    again = tmp_path / "again.json"
    subprocess.run([sys.executable, str(ROOT / "bin" / "sample_chameleons.py"), str(DEMO), str(again),
                    "--max_data_items", "3", "--seed", "42"], capture_output=True, check=True)
    assert out.read_bytes() == again.read_bytes()
    assert "小林" in out.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes

    from_file, on_the_fly = _dm(out), _dm(max_data_items=3, sample_seed=42)
    for split in ("train", "val"):
        assert [s.input_ids for s in from_file.splits[split]] == [s.input_ids for s in on_the_fly.splits[split]]


@pytest.mark.integration
def test_show_samples_prints_what_the_config_trains_on(in_repo_root):
    command = [sys.executable, "bin/show_samples.py", "--config", "configs/demo_chameleons.yaml", "--n", "2"]
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row) == {"user_hash", "text", "target", "num_tokens", "num_label_tokens"}
        assert row["target"].startswith("[ANSWER]\n") and row["target"].endswith("[/ANSWER]<|im_end|>")
        assert row["text"].startswith("<|im_start|>system\n[USER_HASH=" + row["user_hash"] + "]")
        assert "[RECENT_DIALOGUE]" in row["text"] or "Continue the dialogue" in row["text"]
        assert 0 < row["num_label_tokens"] < row["num_tokens"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_data_items=0), "max_data_items"), (dict(val_ratio=1.0), "val_ratio"),
    (dict(ablation="everything"), "unknown ablation"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChameleonsDataModule(str(DEMO), **kwargs)


def test_training_dialogues_are_the_split_that_fit_trains_on():
    fresh = connect_data(ChameleonsDataModule(str(DEMO), tokenizer_path=str(TOKENIZER), ablation="history_and_context"))
    history_source = fresh.training_dialogues()  # without setup, as bin/generate.py asks it
    fitted = _dm(ablation="history_and_context")
    assert [d.index for d in history_source] == [d.index for d in fitted.dialogues["train"]]
    assert not {d.index for d in history_source} & {d.index for d in fitted.dialogues["val"]}


@pytest.mark.parametrize("turns", [16, 4096])
def test_a_dialogue_of_thousands_of_turns_is_fitted_in_logarithmically_many_tokenisations(turns):
    """Fitting halves the kept context turns per try: tokenisations grow with log2(turns), never with turns."""
    from transformers import AutoTokenizer

    from mgmlora.data.chameleons import DialogueSample, Turn
    from mgmlora.data.chameleons_datamodule import PersonaEncoder
    from tests.data.test_chat import _Counting

    counting = _Counting(AutoTokenizer.from_pretrained(TOKENIZER))
    context = [Turn("user" if i % 2 else "assistant", f"Line {i}.") for i in range(turns)]
    sample = DialogueSample("u1", {"name": "X"}, "a task", context, "The reply.")
    encoded = PersonaEncoder(counting, 256, "context_only", "system")(sample)
    assert encoded is not None and len(encoded.input_ids) <= 256
    assert counting.calls <= 2 + math.ceil(math.log2(turns + 1))  # the whole, then one per halving

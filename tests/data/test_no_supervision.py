"""`fit` on data that leaves no supervised sample is an error naming the file and why each record was dropped."""

import json

import pytest

from mgmlora.data.chameleons_datamodule import ChameleonsDataModule
from mgmlora.data.datamodule import NoTrainingSampleError
from mgmlora.data.llava import read_llava_json
from tests.conftest import TOKENIZER, connect_data
from tests.data.test_chameleons_datamodule import DEMO, _dm
from tests.data.test_llava import LLAVA, _datamodule


def test_llava_records_without_answers_or_room_are_an_error_with_counts_per_reason(tmp_path):
    records = read_llava_json(LLAVA / "llava_demo.json")[:5]
    for record in records[:3]:  # questions only: nothing to supervise
        record["conversations"] = record["conversations"][:1]
    for record in records[3:]:  # a long question pushes the answer past max_length
        record["conversations"][0]["value"] += " word" * 400
    with pytest.raises(NoTrainingSampleError) as err:
        _datamodule(tmp_path, records, max_length=200)
    message = str(err.value)
    assert str(tmp_path / "train.json") in message and "0 samples kept" in message
    assert "3 records without an answer" in message and "2 records whose answers do not fit max_length=200" in message


def test_llava_records_left_without_room_are_a_warning_naming_file_count_and_key(tmp_path):
    records = read_llava_json(LLAVA / "llava_demo.json")[:5]
    for record in records[3:]:  # a long question pushes the answer past max_length; the other three fit
        record["conversations"][0]["value"] += " word" * 400
    with pytest.warns(UserWarning) as caught:
        dm = _datamodule(tmp_path, records, max_length=200)
    assert dm.stats["train:samples"] == 3
    line = next(str(w.message) for w in caught if "supervised token" in str(w.message))
    assert str(tmp_path / "train.json") in line and "skipped 2 record(s)" in line
    assert "200 positions" in line and "data.init_args.max_length" in line


def test_chameleons_targets_all_too_long_is_an_error_before_training():
    dm = connect_data(ChameleonsDataModule(str(DEMO), tokenizer_path=str(TOKENIZER), max_length=8))
    with pytest.raises(NoTrainingSampleError, match=rf"{DEMO}: .* samples whose target and bare prompt exceed "
                                                    r"max_length=8.*raise data.init_args.max_length"):
        dm.setup("fit")


def test_chameleons_items_all_dropped_by_the_keep_drop_rule_is_named(tmp_path):
    records = json.loads(DEMO.read_text())
    for record in records:
        for collection in record["task"]["task_behavior_collections"]:
            for item in collection["data"]:
                item["continuation"] = " "
    path = tmp_path / "empty_targets.json"
    path.write_text(json.dumps(records))
    with pytest.raises(NoTrainingSampleError, match="dropped by the keep/drop rule"):
        _dm(path)

"""Commands refuse what would overwrite a user's file or cannot run here, before anything loads."""

import pytest
import torch

from mgmlora.commands import compare, sample_chameleons, score
from mgmlora.commands.parsing import check_device
from mgmlora.errors import UsageError
from mgmlora.tools.args import OutputPathError
from tests.conftest import ASSETS


def test_score_refuses_an_existing_output_that_no_progress_file_of_its_settings_belongs_to(tmp_path, monkeypatch):
    monkeypatch.setattr("mgmlora.tools.export.read_run_adapter", lambda *a: pytest.fail("the checkpoint was read"))
    data, checkpoint = ASSETS / "persona_chat_val.jsonl", tmp_path / "run"
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"mine": 1}\n')
    with pytest.raises(UsageError, match="mine.jsonl' exists and no progress file"):
        score.main(["--checkpoint", str(checkpoint), "--data", str(data), "--output", str(mine)])
    assert mine.read_text() == '{"mine": 1}\n'
    (tmp_path / "mine.jsonl").unlink()
    (tmp_path / "mine.summary.json").write_text("{}")  # the summary of a finished run counts too
    with pytest.raises(UsageError, match="mine.summary.json' exists"):
        score.main(["--checkpoint", str(checkpoint), "--data", str(data), "--output", str(mine)])


def test_sample_chameleons_refuses_an_existing_file_and_a_directory_and_overwrites_on_request(tmp_path):
    source = ASSETS / "chameleons_demo.json"
    mine = tmp_path / "mine.json"
    mine.write_text("precious")
    with pytest.raises(UsageError, match="exists: pass --overwrite"):
        sample_chameleons.main([str(source), str(mine)])
    assert mine.read_text() == "precious"
    with pytest.raises(UsageError, match="is a directory"):
        sample_chameleons.main([str(source), str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json"]  # nothing left beside it
    sample_chameleons.main([str(source), str(mine), "--overwrite", "--max_data_items", "1"])
    assert mine.read_text().startswith("[")


def test_compare_refuses_an_output_directory_that_holds_files(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "comparison.md").write_text("precious")
    with pytest.raises(UsageError, match="already holds files"):
        compare.main([str(tmp_path), "--output", str(tmp_path / "report")])
    assert (tmp_path / "report" / "comparison.md").read_text() == "precious"


@pytest.mark.parametrize("device,message", [("gpu", "is not a torch device"), ("cuda", "no CUDA GPU")])
def test_a_device_this_machine_lacks_is_refused_in_one_line(device, message):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UsageError, match=message):
        check_device(device)
    check_device("cpu")
    check_device(None)


def test_score_refuses_a_directory_as_output_before_loading_even_with_overwrite(tmp_path, monkeypatch):
    monkeypatch.setattr("mgmlora.tools.export.read_run_adapter", lambda *a: pytest.fail("the checkpoint was read"))
    data, out = ASSETS / "persona_chat_val.jsonl", tmp_path / "preds"
    out.mkdir()
    with pytest.raises(UsageError, match="--output '.*preds' is a directory"):
        score.main(["--checkpoint", str(tmp_path / "run"), "--data", str(data), "--output", str(out), "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds"]


def test_compare_with_overwrite_replaces_the_whole_report_and_refuses_a_file(tmp_path):
    """No plot of an earlier comparison survives beside the new table (it would show other runs' numbers)."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "exp" / "version_0"
    with SummaryWriter(str(run)) as writer:
        writer.add_scalar("train/loss", 1.0, 0)
    report = tmp_path / "report"
    report.mkdir()
    (report / "peak_memory.png").write_bytes(b"an earlier comparison's plot")
    compare.main([str(run), "--output", str(report), "--overwrite"])
    assert (report / "comparison.md").is_file() and not (report / "peak_memory.png").exists()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UsageError, match="is a file"):
        compare.main([str(run), "--output", str(tmp_path / "file")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compare.main([str(tmp_path / "missing"), "--output", str(tmp_path / "new" / "report")])
    assert not (tmp_path / "new").exists() and (tmp_path / "file").read_text() == "mine"
    for output in (tmp_path / "exp", run):  # replaced whole, it would take the run along
        with pytest.raises(OutputPathError, match="is or holds the run"):
            compare.main([str(run), "--output", str(output), "--overwrite"])
    assert any(run.iterdir())  # its event file is still there
    (report / "notes.txt").write_text("the user's")  # replaced whole, it would go: only a comparison may
    with pytest.raises(UsageError, match=r"holds files compare did not write \(notes.txt\)"):
        compare.main([str(run), "--output", str(report), "--overwrite"])
    assert (report / "notes.txt").read_text() == "the user's" and (report / "comparison.md").is_file()

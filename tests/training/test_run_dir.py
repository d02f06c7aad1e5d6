"""A fit never writes into a directory holding another run, unless it continues that run (run_dir.py)."""

import subprocess
import sys

import pytest

from mgmlora.errors import USAGE, classify
from mgmlora.training.run_dir import check_new_run
from tests.conftest import ROOT


def test_a_log_directory_holding_a_run_is_refused(tmp_path):
    run = tmp_path / "version_0"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"first run")
    (run / "config.yaml").write_text("first: run\n")
    with pytest.raises(Exception, match=r"version_0 already holds a run \(adapter, config.yaml\)") as refused:
        check_new_run(run, [], None)
    assert classify(refused.value) == ("user", USAGE) and "\n" not in str(refused.value)


def test_continuing_the_run_that_lives_there_and_fresh_directories_pass(tmp_path):
    run = tmp_path / "version_0"
    (run / "checkpoints" / "step=2.ckpt").mkdir(parents=True)
    (run / "config.yaml").write_text("first: run\n")
    check_new_run(run, [run / "checkpoints"], run / "checkpoints" / "step=2.ckpt")  # the same run going on
    check_new_run(run, [run / "checkpoints"], "last")
    check_new_run(tmp_path / "version_1", [tmp_path / "version_1" / "checkpoints"], None)  # a new version
    (tmp_path / "empty").mkdir()
    check_new_run(tmp_path / "empty", [], None)  # an empty directory holds no run
    with pytest.raises(Exception, match="already holds a run"):  # resuming another run into this one
        check_new_run(run, [], tmp_path / "elsewhere" / "step=2.ckpt")


def test_a_checkpoint_directory_with_entries_is_refused(tmp_path):
    (tmp_path / "ckpt" / "step=4.ckpt").mkdir(parents=True)
    with pytest.raises(Exception, match=r"checkpoint directory .*ckpt already holds 1 entries \(e\.g\. step=4\.ckpt\)"):
        check_new_run(None, [tmp_path / "ckpt"], None)


@pytest.mark.integration
def test_a_second_fit_into_a_named_version_is_refused_and_the_first_run_is_untouched(tmp_path):
    def fit():
        return subprocess.run([sys.executable, str(ROOT / "bin" / "main.py"), "fit", "--config",
                               "configs/demo_chat.yaml", "--trainer.max_steps", "2", "--trainer.enable_progress_bar",
                               "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
                               "--trainer.logger.init_args.version", "fixed"], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)

    first = fit()
    assert first.returncode == 0, first.stderr[-3000:]
    run = next(tmp_path.rglob("fixed"))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "events.out" not in p.name}
    assert run / "config.yaml" in before and run / "adapter" / "adapter_model.safetensors" in before
    second = fit()
    assert second.returncode == USAGE, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {run} already holds a run"), second.stderr[-3000:]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "events.out" not in p.name} == before

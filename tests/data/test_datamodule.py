"""mgmlora.data.datamodule's worker processes: they ignore stop signals (preemption) and still never keep a process
from exiting."""

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

SCRIPT = textwrap.dedent("""
    import signal, sys
    sys.path.insert(0, {src!r})
    from torch.utils.data import DataLoader
    from mgmlora.data.datamodule import worker_settings
    loader = DataLoader(list(range(64)), batch_size=2, persistent_workers=True, **worker_settings(2))
    batches = iter(loader)
    next(batches)
    KEPT = [batches]  # what an exception's traceback does to a Trainer: its loader's iterator stays alive
    {raise_}
""")


@pytest.mark.integration
@pytest.mark.parametrize("raise_", ["pass", "raise RuntimeError('CUDA out of memory (as in a training step)')"])
def test_a_process_with_live_workers_exits_after_an_error(raise_):
    # multiprocessing's exit hook SIGTERMs daemon workers and joins them without a timeout: workers that ignore
    # SIGTERM kept the process alive for good (an H200 run after a CUDA OOM), which a timeout here would catch
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(src=str(ROOT / "src"), raise_=raise_)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == (0 if raise_ == "pass" else 1), proc.stderr[-2000:]
    assert "killed by signal" not in proc.stderr  # torch's SIGCHLD handler stays quiet


def test_the_one_datamodule_builder_refuses_foreign_classes_and_unknown_settings_and_applies_overrides():
    import sys

    import pytest

    from mgmlora.data.datamodule import ChatDataModule, datamodule_from_section
    from mgmlora.errors import UsageError

    with pytest.raises(UsageError, match="not one of mgmlora's data sources"):
        datamodule_from_section({"class_path": "some_plugin_xyz.Data", "init_args": {}})
    assert "some_plugin_xyz" not in sys.modules  # refused before anything was imported
    section = {"class_path": "mgmlora.data.datamodule.ChatDataModule", "init_args": {"train_path": "a.jsonl"}}
    dm = datamodule_from_section(section, {"train_path": "b.jsonl", "max_length": None, "image_folder": "x"})
    assert isinstance(dm, ChatDataModule) and dm.hparams.train_path == "b.jsonl" and dm.hparams.max_length == 2048
    with pytest.raises(UsageError, match=r"\['batchsize'\] are not settings"):
        datamodule_from_section({**section, "init_args": {"train_path": "a", "batchsize": 2}})

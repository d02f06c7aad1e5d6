"""Figures the READMEs and docs/ pages quote are what the code prints today."""

import re
import shlex

import pytest

from tests.conftest import ROOT


def _estimate(capsys, args: str) -> str:
    from mgmlora.commands import estimate

    estimate.main(shlex.split(args))
    return capsys.readouterr().out


def _gib(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return match.group(1)


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
def test_the_tools_pages_estimate_figures_are_what_bin_estimate_prints(capsys, in_repo_root):
    readme = (ROOT / "docs" / "tools.md").read_text()
    fits = re.search(r"^python bin/estimate\.py (?P<args>[^\n#]+?)\s+# fits: ~?(?P<total>[\d.]+) GiB$", readme, re.M)
    full = re.search(r"^python bin/estimate\.py (?P<args>[^\n#]+)\n#\s+\.\.\. optimizer states (?P<opt>[\d.]+) GiB "
                     r"\.\.\. does NOT fit; cheapest change: (?P<fix>\S+) -> (?P<fixed>[\d.]+) GiB$", readme, re.M)
    assert fits and full, "docs/tools.md's estimate example changed shape: update this test with it"

    out = _estimate(capsys, fits["args"])
    assert _gib(r"total \(peak, per device\)\s+([\d.]+) GiB", out) == fits["total"]
    assert "verdict: fits in 24 GiB" in out

    out = _estimate(capsys, full["args"])
    assert _gib(r"optimizer states[^\n]*?([\d.]+) GiB", out) == full["opt"]
    assert "verdict: does NOT fit" in out
    fix = re.search(r"cheapest change that fits: (.+) -> ([\d.]+) GiB", out)
    assert fix and full["fix"] in fix.group(1) and fix.group(2) == full["fixed"], out


@pytest.mark.integration
def test_the_configs_readmes_demo_chat_start_loss_is_what_the_demo_logs(tmp_path, in_repo_root):
    import lightning as L
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mgmlora.cli import main

    row = next(line for line in (ROOT / "configs" / "README.md").read_text().splitlines()
               if line.startswith("| `demo_chat.yaml` |"))
    quoted = re.search(r"train ([\d.]+) →", row).group(1)
    log_every = 5  # demo_chat.yaml's log_every_n_steps: its first logged train/loss is step 5's
    cli = main(["--config", "configs/demo_chat.yaml", "--trainer.limit_val_batches", "0",
                "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)],
               run=False)

    class StopAfterFirstLog(L.Callback):  # the config's max_steps stays: it shapes the learning-rate schedule
        def on_train_batch_end(self, trainer, *_):
            trainer.should_stop = trainer.global_step >= log_every

    cli.trainer.callbacks.append(StopAfterFirstLog())
    cli.trainer.fit(cli.model, cli.datamodule)
    events = EventAccumulator(str(tmp_path / "demo_chat" / "version_0"))
    events.Reload()
    first = events.Scalars("train/loss")[0]
    assert first.step == log_every and f"{first.value:.2f}" == quoted  # logged at its optimizer step (StepLabels)


def test_every_reliability_promise_names_test_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What mgmlora guarantees", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert len(rows) >= 10
    for row in rows:
        named = re.findall(r"`(tests/[\w/]+\.py)`", row.rsplit("|", 2)[-2])
        assert named, row
        assert all((ROOT / path).is_file() for path in named), row
        assert all(re.search(r"^def test_", (ROOT / path).read_text(), re.M) for path in named), row

"""The training progress bar counts optimizer steps against the fit's real total, across epochs; plain lines when
standard output is not a terminal."""

import math
import re
import sys

import lightning as L
import pytest
from lightning.pytorch.callbacks import TQDMProgressBar

from mgmlora.cli import main

TRAIN_SAMPLES = 96  # lines of tests/assets/persona_chat_train.jsonl (demo_chat.yaml's training file)


def _shown(bar) -> tuple[float, float | None, str]:
    """(counter, total, label) of the training bar as displayed, for Lightning's TQDM and Rich bars alike."""
    if isinstance(bar, TQDMProgressBar):
        shown = bar.train_progress_bar
        return shown.n, shown.total, shown.desc
    task = next(t for t in bar.progress.tasks if t.id == bar.train_progress_bar_id)  # RichProgressBar
    return task.completed, task.total, task.description


class _Record(L.Callback):
    def __init__(self, bar):
        self.bar, self.seen = bar, []

    def on_train_batch_end(self, trainer, *_):
        self.seen.append(_shown(self.bar))


def _fit(tmp_path, *overrides):
    """A demo fit with the bar a terminal gets."""
    stdout_isatty = sys.stdout.isatty
    sys.stdout.isatty = lambda: True
    try:
        cli = main(["--config", "configs/demo_chat.yaml", "--trainer.logger.init_args.save_dir", str(tmp_path),
                "--trainer.limit_val_batches", "0", "--trainer.check_val_every_n_epoch", "1",
                    "--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "true", *overrides],
                   run=False)
    finally:
        sys.stdout.isatty = stdout_isatty
    bar = cli.trainer.progress_bar_callback
    record = _Record(bar)
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, cli.datamodule)
    return record.seen, _shown(bar)


@pytest.mark.parametrize("batch_size,max_steps,max_epochs", [(16, 4, -1), (32, -1, 2)],
                         ids=["max_steps=4, two epochs", "max_epochs=2, incomplete last window"])
@pytest.mark.integration
def test_the_bar_counts_optimizer_steps_and_never_passes_its_total(tmp_path, in_repo_root, batch_size, max_steps,
                                                                    max_epochs):
    accumulate = 2  # demo_chat.yaml's accumulate_grad_batches
    micro_batches = TRAIN_SAMPLES // batch_size
    # optimizer steps: a window of `accumulate` micro-batches, plus one for an epoch's incomplete last window
    expected = max_steps if max_steps > 0 else max_epochs * math.ceil(micro_batches / accumulate)
    seen, (n, total, label) = _fit(tmp_path, "--data.init_args.batch_size", str(batch_size), "--trainer.max_steps",
                                   str(max_steps), "--trainer.max_epochs", str(max_epochs))
    assert len(seen) == (max_steps * accumulate if max_steps > 0 else max_epochs * micro_batches)
    assert all(counter <= shown_total for counter, shown_total, _ in seen), seen
    assert (n, total) == (expected, expected)
    assert "-" not in label and label.startswith("Epoch 2")  # both runs end in their second epoch
    if max_epochs > 0:
        assert label.startswith(f"Epoch 2/{max_epochs}")


@pytest.mark.integration
def test_a_non_terminal_gets_plain_lines_without_cursor_codes(tmp_path, in_repo_root, capfd):
    cli = main(["--config", "configs/demo_chat.yaml", "--trainer.logger.init_args.save_dir", str(tmp_path),
                "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "2", "--trainer.val_check_interval", "2",
                "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "true"], run=False)
    assert not sys.stdout.isatty()  # pytest captures stdout: not a terminal
    cli.trainer.fit(cli.model, cli.datamodule)
    out = capfd.readouterr().out
    assert "\r" not in out and "\x1b[" not in out
    lines = [line for line in out.splitlines() if line.startswith("Epoch ")]
    # one line per 2 optimizer steps, counted against the fit's total, with the step time after the first
    assert [re.search(r"step (\d+/\d+)", line)[1] for line in lines] == ["2/4", "4/4"]
    assert all(re.search(r"\| [\d.]+ s/step$", line) for line in lines)
    # val_check_interval counts micro-batches: 4 steps x accumulate 2 (demo_chat.yaml) = 8, a validation every 2
    assert sum(line.startswith("validation | step ") for line in out.splitlines()) == 8 // 2

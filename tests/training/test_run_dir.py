"""A fit never writes into a directory holding another run, unless it continues that run; an evaluation of a checkpoint
logs into the checkpoint's run (run_dir.py)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mgmlora.errors import USAGE, UsageError, classify
from mgmlora.training.run_dir import (
    check_eval_checkpoint,
    check_last_found,
    check_new_run,
    checkpoint_run,
    discard_failed_run,
)
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


def test_last_is_refused_wherever_lightning_would_find_none_and_names_the_newest_checkpoint(tmp_path):
    import os

    def refused(log_dir, callbacks, picked, match):
        with pytest.raises(Exception, match=match) as error:
            check_last_found(log_dir, callbacks, picked)
        assert classify(error.value) == ("user", USAGE) and "\n" not in str(error.value)

    saves_last = [(None, True)]
    new = tmp_path / "demo" / "version_2"  # the version the logger picked for this fit; nothing written yet
    refused(new, saves_last, True, "new version directory .*version_2.*--ckpt_path <path>")  # no earlier run
    for version, age, name in (("version_0", 300, "last.ckpt"), ("version_0", 200, "step=000004.ckpt"),
                               ("version_1", 100, "interrupted-step=6.ckpt")):  # a preemption's save is the newest
        path = tmp_path / "demo" / version / "checkpoints" / name
        path.mkdir(parents=True)
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime - age))
    refused(new, saves_last, True, r"resume with --ckpt_path \S*version_1/checkpoints/interrupted-step=6.ckpt ")
    refused(new, [], True, "no ModelCheckpoint writes checkpoints")
    refused(new, [(None, False)], False, "no ModelCheckpoint saves one .*save_last: true")
    # a named version holding a run without a `last` (save_last was off then): training would start over on top of it
    named = tmp_path / "demo" / "job"
    (named / "adapter").mkdir(parents=True)
    (named / "adapter" / "adapter_model.safetensors").write_bytes(b"a finished run")
    refused(named, saves_last, False, r"job holds a run but none, so training would start over on top of it")
    # where Lightning finds a `last`, or on a first launch into a fixed, empty directory, its own lookup stands
    check_last_found(tmp_path / "demo" / "version_0", saves_last, True)
    check_last_found(tmp_path / "demo" / "fresh", saves_last, False)  # a job script's first launch
    check_last_found(new, [(tmp_path / "ckpt", True)], True)  # a dirpath of its own, empty
    check_last_found(None, saves_last, True)  # no logger: checkpoints go to default_root_dir


@pytest.mark.integration
def test_fit_ckpt_path_last_where_none_can_be_found_is_refused_before_anything_is_written(tmp_path):
    def fit(*args):
        return subprocess.run([sys.executable, str(ROOT / "bin" / "main.py"), "fit", "--config",
                               "configs/demo_chat.yaml", "--trainer.max_steps", "2", "--trainer.enable_progress_bar",
                               "false", "--trainer.logger.init_args.save_dir", str(tmp_path), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)

    for args, says in ((["--ckpt_path", "last"], "new version directory"),  # the demo's default new version_N
                       (["--trainer.logger.init_args.version", "job", "--ckpt_path", "last"], "save_last: true")):
        refused = fit(*args)
        assert refused.returncode == USAGE, refused.stderr[-3000:]
        last_line = refused.stderr.strip().splitlines()[-1]
        assert last_line.startswith("error: --ckpt_path last: no last checkpoint to resume") and says in last_line
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("adapter"))  # refused before writing


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


def test_checkpoint_run_is_the_run_directory_above_checkpoints_and_nothing_elsewhere(tmp_path):
    run = tmp_path / "demo" / "version_3"
    (run / "checkpoints" / "step=000004.ckpt").mkdir(parents=True)
    assert checkpoint_run(run / "checkpoints" / "step=000004.ckpt") is None  # no logger wrote there: not a run
    (run / "hparams.yaml").write_text("{}\n")
    assert checkpoint_run(run / "checkpoints" / "step=000004.ckpt") == run.resolve()
    (tmp_path / "config.yaml").write_text("not: a run of this checkpoint\n")
    (tmp_path / "own" / "step=2.ckpt").mkdir(parents=True)  # a ModelCheckpoint dirpath of its own
    assert checkpoint_run(tmp_path / "own" / "step=2.ckpt") is None
    assert checkpoint_run("last") is None and checkpoint_run(None) is None


@pytest.mark.integration
def test_validate_and_test_of_a_checkpoint_log_into_its_run_and_keep_its_config(tmp_path):
    """No `version_N` beside the run: the run's directory gets the evaluation's events, labelled with the
    checkpoint's step, and `<subcommand>_config.yaml`; the run's config.yaml is untouched; the log says where. The fit's
model summary shows no FLOPs figure (Lightning's is 0: it counted none)."""
    import logging
    import shutil

    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mgmlora.cli import main
    from tests.conftest import VAL

    config = yaml.safe_load((ROOT / "configs" / "demo_chat.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2  # the ModelCheckpoint
    config["trainer"]["callbacks"][4]["init_args"].update(num_samples=2, max_new_tokens=4)  # GenerationEval
    (tmp_path / "demo_chat.yaml").write_text(yaml.safe_dump(config))
    common = ["--config", str(tmp_path / "demo_chat.yaml"), "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.limit_val_batches", "1",
              "--data.init_args.val_path", str(VAL), "--data.init_args.test_path", str(VAL)]
    run = tmp_path / "runs" / "demo_chat" / "version_0"
    ckpt = run / "checkpoints" / "step=000002.ckpt"
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch")  # where rank_zero_info writes (it does not propagate)
    logger.addHandler(handler)
    try:
        main(["fit", *common, "--trainer.max_steps", "2", "--trainer.val_check_interval", "4"])
        summary = next(line for line in lines if "Trainable params" in line)  # mgmlora.training.callbacks.RunSummary
        assert "Total params" in summary and "flops" not in summary.lower(), summary  # none was counted
        assert ckpt.is_dir()
        config = (run / "config.yaml").read_bytes()
        main(["validate", *common, "--ckpt_path", str(ckpt)])
        main(["test", *common, "--ckpt_path", str(ckpt)])
        main(["validate", *common])  # no checkpoint: a new version, and the log says which
        events = sorted(p.name for p in run.glob("events.out.tfevents.*"))
        with pytest.raises(ValueError, match=r"model\.lora\.r: checkpoint 16 vs config 8"):
            main(["validate", *common, "--ckpt_path", str(ckpt), "--model.lora.r", "8"])
        assert sorted(p.name for p in run.glob("events.out.tfevents.*")) == events  # the failed one left none
        # a checkpoint outside a run's checkpoints/ names no run: its validate makes a version_N, which a failure
        # takes away whole, its validate_config.yaml included (checked by the directory listing below)
        copied = tmp_path / "copied" / "step=000002.ckpt"
        shutil.copytree(ckpt, copied)
        with pytest.raises(ValueError, match=r"model\.lora\.r: checkpoint 16 vs config 8"):
            main(["validate", *common, "--ckpt_path", str(copied), "--model.lora.r", "8"])
    finally:
        logger.removeHandler(handler)

    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0", "version_1"]
    assert f"mgmlora: validate logs to {run}" in lines and f"mgmlora: test logs to {run}" in lines, lines
    assert f"mgmlora: validate logs to {run.parent / 'version_1'}" in lines, lines
    assert (run / "config.yaml").read_bytes() == config
    assert (run / "validate_config.yaml").is_file() and (run / "test_config.yaml").is_file()
    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("test/loss")] == [2]
    assert sorted(e.step for e in events.Scalars("val/loss")) == [2, 2]  # fit's validation after step 2, validate's


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
def test_an_evaluation_into_a_new_version_never_shares_one_another_evaluation_made_after_the_listing(tmp_path,
                                                                                                       monkeypatch):
    # two evaluations started together both list the logger's directory and pick the same next version_N; the
    # other one's directory appears between this one's listing and its first write (simulated by a listing that
    # still says version_0 is free)
    from lightning.pytorch.loggers import TensorBoardLogger

    from mgmlora.cli import main
    from tests.conftest import VAL

    runs = tmp_path / "runs"
    other = runs / "demo_chat" / "version_0"
    other.mkdir(parents=True)
    (other / "validate_config.yaml").write_text("# the other evaluation's\n")
    monkeypatch.setattr(TensorBoardLogger, "_get_next_version", lambda self: 0)
    main(["validate", "--config", str(ROOT / "configs" / "demo_chat.yaml"), "--trainer.enable_progress_bar", "false",
          "--trainer.logger.init_args.save_dir", str(runs), "--trainer.limit_val_batches", "1",
          "--data.init_args.val_path", str(VAL)])
    assert [p.name for p in other.iterdir()] == ["validate_config.yaml"]  # untouched
    assert (other / "validate_config.yaml").read_text() == "# the other evaluation's\n"
    assert (runs / "demo_chat" / "version_1" / "validate_config.yaml").is_file()


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
@pytest.mark.parametrize("overrides", [
    ["--data.init_args.tokenizer_path", "missing_tokenizer"],  # refused while the data is connected to the model
    ["--model.speed.keep_attention_outputs", "true", "--model.model.gradient_checkpointing", "false"],  # configuring
], ids=["data", "model"])
def test_a_refused_evaluation_into_a_new_version_leaves_no_directory_behind(tmp_path, overrides):
    from mgmlora.cli import main
    from tests.conftest import VAL

    with pytest.raises(Exception):  # noqa: B017, PT011  (which error is the refusal's own test's concern)
        main(["validate", "--config", str(ROOT / "configs" / "demo_chat.yaml"), "--trainer.enable_progress_bar",
              "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "new" / "runs"),
              "--trainer.limit_val_batches", "1", "--data.init_args.val_path", str(VAL), *overrides])
    assert not (tmp_path / "new").exists()


def test_a_failed_run_takes_only_what_it_wrote_and_the_directory_only_when_that_empties_it(tmp_path):
    since = time.time()
    host, pid = socket.gethostname(), os.getpid()

    def made(folder, *names):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"x")
        return [folder / name for name in names]

    ours = f"events.out.tfevents.{int(since)}.{host}.{pid}.0"
    alone = tmp_path / "version_0"  # a directory the fit made: its event file, config and hparams all go
    written = made(alone, ours, "config.yaml", "hparams.yaml")
    assert discard_failed_run(alone, since, fresh=True) == [*written, alone] and not alone.exists()
    evaluated = tmp_path / "version_2"  # a failed `test` of no checkpoint, in a version_N it made
    written = made(evaluated, ours, "test_config.yaml")
    assert discard_failed_run(evaluated, since, True, "test_config.yaml") == [*written, evaluated]

    shared = tmp_path / "version_1"  # a directory that held a run: only this process's new event file goes
    other_pid = f"events.out.tfevents.{int(since)}.{host}.{pid + 1}.0"
    other_host = f"events.out.tfevents.{int(since)}.elsewhere.{pid}.0"
    old = f"events.out.tfevents.{int(since) - 7200}.{host}.{pid}.1"  # a reused pid, hours ago
    mine, *_ = made(shared, ours, other_pid, other_host, old, "config.yaml", "hparams.yaml")
    os.utime(shared / old, (since - 7200, since - 7200))
    assert discard_failed_run(shared, since, fresh=False) == [mine]
    assert {p.name for p in shared.iterdir()} == {other_pid, other_host, old, "config.yaml", "hparams.yaml"}
    assert discard_failed_run(tmp_path / "missing", since, True) == [] and discard_failed_run(None, since, True) == []
    named = tmp_path / "keep"  # an empty directory the user made and named as the version: it stays
    mine, = made(named, ours)
    assert discard_failed_run(named, since, fresh=False) == [mine] and named.is_dir()


def test_a_fit_without_logger_is_refused_where_its_default_root_dir_holds_a_config_or_a_run(tmp_path):
    # without a logger config.yaml, checkpoints/ and adapter/ go into default_root_dir (the working directory by
    # default): a user's own config.yaml there was overwritten, and a second fit replaced the first one's adapter
    (tmp_path / "config.yaml").write_text("# the user's own config\n")
    with pytest.raises(UsageError, match="trainer.logger off"):
        check_new_run(tmp_path, [None], None, logger_off=True)
    check_new_run(tmp_path / "fresh", [None], None, logger_off=True)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step=2.ckpt").mkdir()
    check_new_run(tmp_path, [None], tmp_path / "checkpoints" / "step=2.ckpt", logger_off=True)  # that run going on


def test_without_logger_a_resume_from_the_fits_own_checkpoint_directory_elsewhere_goes_on(tmp_path):
    run, ckpt = tmp_path / "runs" / "a", tmp_path / "scratch" / "ck"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed_everything: 0\n")
    (ckpt / "step=2.ckpt").mkdir(parents=True)
    check_new_run(run, [ckpt], ckpt / "step=2.ckpt", logger_off=True)  # the same run going on: its checkpoints
    with pytest.raises(UsageError, match="trainer.logger off"):  # another run's checkpoint: would replace this one
        check_new_run(run, [None], ckpt / "step=2.ckpt", logger_off=True)


def test_without_logger_last_is_looked_up_in_default_root_dir_and_refused_where_a_run_has_none(tmp_path):
    (tmp_path / "config.yaml").write_text("seed_everything: 0\n")  # a preempted run: no `last` among its checkpoints
    (tmp_path / "checkpoints" / "interrupted-step=000002.ckpt").mkdir(parents=True)
    with pytest.raises(UsageError, match="interrupted-step=000002.ckpt"):
        check_last_found(tmp_path, [(None, True)], picked_version=False)


def test_validate_or_test_of_last_or_best_without_such_a_checkpoint_is_refused(tmp_path):
    # Lightning only warns "No checkpoint will be loaded" and evaluates the untrained adapter (exit 0), or raises a
    # ValueError for `best`, which a fresh process never has
    new_version = tmp_path / "version_3"
    for subcommand in ("validate", "test"):
        with pytest.raises(UsageError, match=rf"^{subcommand} --ckpt_path last: no last checkpoint in "
                                             rf".*version_3.checkpoints, so the untrained adapter") as refused:
            check_eval_checkpoint(subcommand, "last", new_version, [None])
        assert classify(refused.value) == ("user", USAGE) and "\n" not in str(refused.value)
    with pytest.raises(UsageError, match=r"no checkpoint directory \(no ModelCheckpoint\)"):
        check_eval_checkpoint("validate", "last", new_version, [])
    with pytest.raises(UsageError, match=r"^validate --ckpt_path best: only a fit in the same process"):
        check_eval_checkpoint("validate", "best", new_version, [None])


def test_validate_of_last_in_a_named_run_or_of_a_path_passes(tmp_path):
    run = tmp_path / "version_0"
    (run / "checkpoints" / "last.ckpt").mkdir(parents=True)
    check_eval_checkpoint("validate", "last", run, [None])
    check_eval_checkpoint("test", "last", None, [run / "checkpoints"])  # a ModelCheckpoint dirpath, no logger
    check_eval_checkpoint("validate", str(tmp_path / "step=2.ckpt"), tmp_path / "version_1", [None])
    check_eval_checkpoint("validate", None, tmp_path / "version_1", [None])


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
def test_main_validate_with_last_in_a_new_version_is_one_line_exit_2_before_the_model_loads(tmp_path, capsys,
                                                                                         monkeypatch, in_repo_root):
    from mgmlora.cli import main
    from mgmlora.errors import run

    monkeypatch.delenv("MGMLORA_DEBUG", raising=False)
    monkeypatch.setattr("sys.argv", ["bin/main.py"])  # errors.run puts the arguments there
    monkeypatch.setattr("mgmlora.training.module.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        run(main, ["validate", "--config", "configs/demo_chat.yaml", "--ckpt_path", "last",
                   "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    assert exit_info.value.code == USAGE
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: validate --ckpt_path last: no last checkpoint in "), last
    assert not (tmp_path / "logs").exists()


def _cli_with_run_logger(save_dir, subcommand, config):
    """MgmCLI's hooks alone, on a built Trainer whose logger is neither TensorBoard's nor CSV's (MLflow, W&B, ...).

    Its run directory is <save_dir or default_root_dir>/proj/run7, where ModelCheckpoint keeps checkpoints; returns the
    CLI and that checkpoint directory.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import Logger

    from mgmlora.cli import MgmCLI

    class RunLogger(Logger):
        name, version = "proj", "run7"

        @property
        def save_dir(self):
            return save_dir

        def log_metrics(self, *args, **kwargs):
            pass

        def log_hyperparams(self, *args, **kwargs):
            pass

    trainer = L.Trainer(logger=RunLogger(), callbacks=[ModelCheckpoint(save_last=True)], default_root_dir=".",
                        enable_progress_bar=False)
    cli = MgmCLI.__new__(MgmCLI)
    cli.trainer, cli.subcommand, cli.config = trainer, subcommand, {subcommand: config}
    return cli, Path(save_dir or ".") / "proj" / "run7" / "checkpoints"


@pytest.mark.parametrize("save_dir", [None, "mlruns"])
def test_validate_last_is_looked_up_where_lightning_saves_it_for_any_logger(tmp_path, monkeypatch, save_dir):
    # for these loggers trainer.log_dir is the bare save_dir (or None), while ModelCheckpoint saves and finds `last` in
    # <save_dir or default_root_dir>/<name>/<version>/checkpoints
    monkeypatch.chdir(tmp_path)
    cli, checkpoints = _cli_with_run_logger(save_dir, "validate", {"ckpt_path": "last"})
    (checkpoints / "last.ckpt").mkdir(parents=True)
    cli._check_eval_checkpoint()  # before: "no last checkpoint in no checkpoint directory (no ModelCheckpoint)"


@pytest.mark.parametrize("save_dir", [None, "mlruns"])
def test_fit_resume_from_last_looks_where_lightning_saves_it_for_any_logger(tmp_path, monkeypatch, save_dir):
    # the check looked in trainer.log_dir, so a run there without a `last` went unnoticed and the fit would have
    # started over on it
    from jsonargparse import Namespace

    monkeypatch.chdir(tmp_path)
    logger = Namespace(class_path="lightning.pytorch.loggers.MLFlowLogger")  # names its runs itself
    config = Namespace(ckpt_path="last", trainer=Namespace(logger=logger))
    cli, checkpoints = _cli_with_run_logger(save_dir, "fit", config)
    (checkpoints / "step=1.ckpt").mkdir(parents=True)  # a run without a `last`: Lightning would start over on it
    with pytest.raises(UsageError, match=r"holds a run but none.*resume with --ckpt_path .*step=1\.ckpt"):
        cli._check_run_dirs("last", None)  # before: allowed (it looked in <save_dir>/checkpoints, found no run)
    (checkpoints / "last.ckpt").mkdir()
    cli._check_run_dirs("last", None)

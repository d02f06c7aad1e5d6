"""SIGTERM / SIGINT / SIGHUP: stop at the next micro-batch, resumable checkpoint + adapter, exit 128+n (preemption)."""

import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from mgmlora.cli import main as cli_main
from mgmlora.data.datamodule import ChatDataModule
from mgmlora.training.callbacks import AdapterExport
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.preemption import PreemptionCheckpoint
from tests.conftest import ROOT, TRAIN
from tests.training.test_module import _module

ACCUMULATE, STEPS = 2, 4


class _SignalAt(L.Callback):
    """Sends `signum` to this process after micro-batch `at` (0-based) of the first epoch, once."""

    def __init__(self, signum, at):
        self.signum, self.at, self.sent = signum, at, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def _fit(root, *callbacks, ckpt_path=None, max_steps=STEPS, lora_dropout=0.0, limit_train_batches=1.0):
    """Tiny Qwen3 LoRA (no dropout unless asked), 2 samples x 2 accumulated per step; returns the adapter."""
    torch.manual_seed(0)
    module = _module(lora_dropout=lora_dropout)
    data = ChatDataModule(str(TRAIN), batch_size=2, shuffle=True, seed=0)
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=ACCUMULATE,
                        logger=L.pytorch.loggers.TensorBoardLogger(root, "run"), enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
                        limit_train_batches=limit_train_batches, plugins=[AdapterCheckpointIO()],
                        callbacks=[  # the signal first: noted after that micro-batch
                            *callbacks, ModelCheckpoint(dirpath=root / "ckpt", filename="{step}",
                                                        every_n_train_steps=2, save_top_k=-1),
                            AdapterExport(), PreemptionCheckpoint()])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return {k: v.detach().clone() for k, v in module.model.named_parameters() if v.requires_grad}, trainer


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The adapter after STEPS optimizer steps without any signal."""
    return _fit(tmp_path_factory.mktemp("reference"))[0]


def test_sigterm_mid_window_saves_the_window_start_and_resuming_it_equals_an_uninterrupted_run(tmp_path, reference):
    # micro-batch 4 (0-based) is the first of step 3's window: steps 1-2 are done, step 3 half-accumulated
    with pytest.raises(SystemExit) as stopped:
        _fit(tmp_path / "a", _SignalAt(signal.SIGTERM, at=2 * ACCUMULATE))
    assert stopped.value.code == 143  # not 0, as with Lightning alone
    ckpt = tmp_path / "a" / "ckpt" / "interrupted-step=000002.ckpt"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["global_step"] == 2
    progress = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["processed"] == 2 * ACCUMULATE  # wound back from 5 to the window start
    adapter = load_file(tmp_path / "a" / "run" / "version_0" / "adapter" / "adapter_model.safetensors")
    at_step_2 = load_file(tmp_path / "a" / "ckpt" / "step=2.ckpt" / "adapter_model.safetensors")
    assert adapter.keys() == at_step_2.keys() and all(torch.equal(adapter[k], at_step_2[k]) for k in adapter)

    resumed, trainer = _fit(tmp_path / "b", ckpt_path=ckpt)
    assert trainer.global_step == STEPS
    for name, value in reference.items():  # step 3 saw both micro-batches of its window, as without the signal
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


def test_sigterm_at_an_epochs_last_micro_batch_resumes_into_the_next_epoch_as_an_uninterrupted_run(tmp_path):
    # epochs of 2 windows: the signal after the first epoch's last micro-batch is raised by Lightning only after the
    # fit loop counted that epoch complete; the checkpoint must describe the second epoch's start, not make the
    # resumed run take the second epoch for finished too and train the third epoch's samples in its place
    epoch = 2 * ACCUMULATE
    reference, unbroken = _fit(tmp_path / "ref", limit_train_batches=epoch)
    with pytest.raises(SystemExit):
        _fit(tmp_path / "a", _SignalAt(signal.SIGTERM, at=epoch - 1), limit_train_batches=epoch)
    ckpt = tmp_path / "a" / "ckpt" / "interrupted-step=000002.ckpt"
    resumed, trainer = _fit(tmp_path / "b", ckpt_path=ckpt, limit_train_batches=epoch)
    assert (trainer.global_step, trainer.current_epoch) == (STEPS, unbroken.current_epoch)
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


def test_sigterm_mid_window_with_lora_dropout_resumes_with_the_window_start_random_numbers(tmp_path):
    # the checkpoint is wound back to the window's start: its random-number state must be the one from there too,
    # else the replayed micro-batch draws other dropout masks than the unbroken run did
    reference = _fit(tmp_path / "ref", lora_dropout=0.1)[0]
    with pytest.raises(SystemExit):
        _fit(tmp_path / "a", _SignalAt(signal.SIGTERM, at=2 * ACCUMULATE), lora_dropout=0.1)
    ckpt = tmp_path / "a" / "ckpt" / "interrupted-step=000002.ckpt"
    resumed = _fit(tmp_path / "b", ckpt_path=ckpt, lora_dropout=0.1)[0]
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


def test_resuming_a_checkpoint_in_its_own_directory_leaves_it_as_it_was(tmp_path):
    # ModelCheckpoint does not remember its last saved step: after the first resumed micro-batch (mid-window, the
    # optimizer has not stepped) it saved step=2 again, over the very checkpoint being resumed
    _fit(tmp_path, max_steps=2, lora_dropout=0.1)
    state = tmp_path / "ckpt" / "step=2.ckpt" / "trainer_state.pt"
    before = state.read_bytes()
    _fit(tmp_path, ckpt_path=tmp_path / "ckpt" / "step=2.ckpt", lora_dropout=0.1)
    assert state.read_bytes() == before


def test_sigint_stops_like_sigterm_with_exit_130_and_a_second_one_interrupts_as_usual(tmp_path):
    # also the fence on Lightning's private stop flag: SIGINT only stops the run if `request_graceful_stop` still
    # reaches it
    with pytest.raises(SystemExit) as stopped:
        _fit(tmp_path, _SignalAt(signal.SIGINT, at=2 * ACCUMULATE + 1))  # the end of step 3's window
    assert stopped.value.code == 130  # not 1, as with Lightning's KeyboardInterrupt path
    state = torch.load(tmp_path / "ckpt" / "interrupted-step=000003.ckpt" / "trainer_state.pt", weights_only=True)
    assert state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 3 * ACCUMULATE
    with pytest.raises(KeyboardInterrupt):  # after the run SIGINT interrupts as usual again
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.integration
def test_main_fit_on_sigterm_to_its_process_group_exits_143_with_a_checkpoint_that_resumes(tmp_path, in_repo_root):
    config = yaml.safe_load((ROOT / "configs" / "demo_chameleons.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "demo_chameleons" / "version_0"
    proc = subprocess.Popen([sys.executable, str(ROOT / "bin" / "main.py"), "fit", "--config",
                             str(tmp_path / "demo.yaml"), "--trainer.max_steps", "100000",
                             "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir",
                             str(tmp_path), "--data.init_args.num_workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "step=000002.ckpt").is_dir():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)  # as schedulers do: the whole group, DataLoader workers included
        sent = time.monotonic()
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 143, out[-3000:]
    assert time.monotonic() - sent < 30, "the run did not stop promptly"
    interrupted = sorted((run / "checkpoints").glob("interrupted-step=*.ckpt"))
    assert len(interrupted) == 1 and (interrupted[0] / "trainer_state.pt").is_file(), out[-3000:]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert "stopped by SIGTERM" in out
    step = torch.load(interrupted[0] / "trainer_state.pt", weights_only=True)["global_step"]

    cli = cli_main(["fit", "--config", str(tmp_path / "demo.yaml"), "--trainer.max_steps", str(step + 2),
                    "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir",
                    str(tmp_path / "resumed"), "--ckpt_path", str(interrupted[0])])
    assert cli.trainer.global_step == step + 2 and not cli.trainer.interrupted


def _preempt_script(out, mode):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "preempt_fit.py"), str(out), mode],
                          capture_output=True, text=True, env=env, timeout=600, cwd=out)
    assert proc.returncode in (0, 143), proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_deepspeed_zero2_run_stopped_mid_window_resumes_to_the_unstopped_result(tmp_path):
    summary = _preempt_script(tmp_path, "zero2")
    assert summary["exit_code"] == 143 and summary["checkpoints"] == ["interrupted-step=000002.ckpt"]
    assert summary["adapter_written"] and summary["resumed_global_step"] == 4
    assert summary["max_abs_diff"] < 1e-6  # DeepSpeed's own checkpoint format, wound back to the window start too


@pytest.mark.integration
def test_two_rank_ddp_run_stops_together_when_one_rank_gets_the_signal(tmp_path):
    # Lightning's own handler runs a collective inside the signal handler and stops each rank on its own flag: the
    # other rank went on into the next backward and died ("Connection closed by peer"). Both ranks stop together here.
    summary = _preempt_script(tmp_path, "ddp2")
    assert summary["exit_code"] == 143
    assert "ckpt/interrupted-step=000002.ckpt" in summary["files"] and "adapter/adapter_model.safetensors" in summary[
        "files"], summary


def test_sighup_stops_like_sigterm_with_exit_129_and_a_resumable_checkpoint(tmp_path):
    # a closed terminal or ssh session: without the handler the process died and kept nothing of the current window
    with pytest.raises(SystemExit) as stopped:
        _fit(tmp_path, _SignalAt(signal.SIGHUP, at=2 * ACCUMULATE + 1))  # the end of step 3's window
    assert stopped.value.code == 128 + signal.SIGHUP
    state = torch.load(tmp_path / "ckpt" / "interrupted-step=000003.ckpt" / "trainer_state.pt", weights_only=True)
    assert state["global_step"] == 3
    assert (tmp_path / "run" / "version_0" / "adapter" / "adapter_model.safetensors").is_file()

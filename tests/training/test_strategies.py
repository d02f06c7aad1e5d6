"""The DeepSpeed gradient-accumulation scaling fix (docs/design/deepspeed.md), on CPU."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration
SCRIPT = ROOT / "tests" / "scripts" / "ds_accumulation.py"
W0 = 0.25
X, Y = [1.0, 2.0, -1.0, 3.0], [0.5, -1.0, 2.0, 1.0]
# d/dw (w x - y)^2 = 2 x (w x - y); one SGD(lr=1) step over 4 accumulated micro-batches moves w by minus their mean.
EXPECTED = -sum(2 * x * (W0 * x - y) for x, y in zip(X, Y)) / 4


def _delta(kind, stage=0):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT), kind, str(stage)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["delta"]


def test_plain_lightning_steps_by_the_mean_gradient():
    assert _delta("plain") == pytest.approx(EXPECTED, rel=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_mgm_deepspeed_strategy_matches_plain_lightning(stage):
    assert _delta("mgm_ds", stage) == pytest.approx(EXPECTED, rel=1e-5)


def test_lightning_deepspeed_strategy_alone_is_off_by_the_accumulation_factor():
    # Documents the upstream bug this strategy fixes; if Lightning fixes it, this test tells us to drop ours.
    assert _delta("lightning_ds", 2) == pytest.approx(EXPECTED / 4, rel=1e-5)


def fit_summary(out, stage, preset, resume=False, **env):
    """Runs tests/scripts/ds_fit_resume.py (STAGE 0 = plain Lightning) and returns its JSON summary."""
    script = ROOT / "tests" / "scripts" / "ds_fit_resume.py"
    env = dict(os.environ, DS_ACCELERATOR="cpu", **{f"MGM_TEST_{k.upper()}": str(v) for k, v in env.items()})
    args = [sys.executable, str(script), str(out), str(stage), preset] + (["--resume"] if resume else [])
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    """Tiny Qwen3-MoE with expert LoRA, 4 accumulated micro-batches per step, plain Lightning vs ZeRO-2 vs ZeRO-3."""
    base = tmp_path_factory.mktemp("moe")
    runs = {}
    for stage in (0, 2, 3):
        out = tmp_path_factory.mktemp(f"stage{stage}")
        runs[stage] = {**fit_summary(out, stage, "tiny-qwen3-moe", accum=4, base=base / "model"), "out": out,
                       "base": base / "model"}
    return runs


def test_deepspeed_logs_the_window_loss_and_schedule_of_plain_lightning(moe_runs):
    # Under DeepSpeed Lightning calls the optimizer step after every micro-batch; the module must still log one
    # token-mean loss per 4-micro-batch window (it logged the last micro-batch's loss before the fix), and the
    # learning-rate schedule must count optimizer steps.
    plain = moe_runs[0]
    for stage in (2, 3):
        assert moe_runs[stage]["losses"] == pytest.approx(plain["losses"], rel=1e-5), stage
        assert moe_runs[stage]["lrs"] == pytest.approx(plain["lrs"]), stage
    assert len(plain["losses"]) == 2


def test_zero3_marks_the_moe_block_as_a_leaf_and_adapts_the_experts(moe_runs):
    summary = moe_runs[3]
    assert summary["z3_leaf_modules"] == ["Qwen3MoeSparseMoeBlock"]  # ranks would hang on data-dependent experts
    assert moe_runs[0]["z3_leaf_modules"] == []
    assert summary["lora_b_absmax_at_start"] == 0.0
    assert summary["reloaded_lora_b_absmax"] > 0 and summary["reload_max_abs_diff"] == 0.0


@pytest.mark.parametrize("stage,preset,resume,ranks", [
    (2, "tiny-qwen3", True, 1),
    (3, "tiny-qwen3", True, 1),  # resume under ZeRO-3 loads into partitioned (empty) parameters: needs the gather
    (3, "tiny-qwen3", False, 2),  # 2 ranks: without the gather in strategies.gathered the exported adapter is empty
])
def test_deepspeed_fit_starts_from_a_no_op_adapter_saves_lora_only_and_resumes(tmp_path, stage, preset, resume, ranks):
    # resume: 4 steps with LoRA dropout, then again from the step-2 checkpoint to step 4 (same data, same schedule)
    summary = fit_summary(tmp_path, stage, preset, resume, ranks=ranks,
                          **(dict(steps=4, resume_to=4, dropout=0.1) if resume else {}))
    assert summary["resumed_global_step"] == (4 if resume else None)
    if resume:  # dropout's random numbers are in DeepSpeed's checkpoint too: the same losses, bit for bit
        later = {s: v for s, v in summary["losses_by_step"].items() if int(s) > 2}
        assert sorted(later) == ["3", "4"] and summary["resumed_losses_by_step"] == later
    assert summary["lora_b_absmax_at_start"] == 0.0  # 0.177 under ZeRO-3 without strategies.zero3_build
    # the exported adapter holds full tensors (not ZeRO-3's empty placeholders), and plain PEFT reloads trained weights
    assert min(summary["adapter_numels"]) > 0 and summary["reloaded_lora_b_absmax"] > 0
    assert summary["reload_max_abs_diff"] == 0.0
    if stage == 2:
        keys = summary["model_state_keys"]
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys[:5]  # no frozen base weights


@pytest.mark.parametrize("stage", [1, 2])
def test_a_nan_gradient_under_deepspeed_stops_the_run_before_a_checkpoint_holds_its_update(tmp_path, stage):
    # DeepSpeed's norm is known only after its engine stepped; the check must still come before the step's checkpoint
    # (ModelCheckpoint saves in on_train_batch_end, before the module's own hook), else the run names a NaN
    # checkpoint as the one to resume from.
    script = ROOT / "tests" / "scripts" / "ds_fit_resume.py"
    env = dict(os.environ, DS_ACCELERATOR="cpu", MGM_TEST_STEPS="3", MGM_TEST_POISON="2")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(stage), "tiny-qwen3"], capture_output=True,
                          text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0
    # DeepSpeed reports a NaN gradient's norm as inf and drops that step's update itself (was_step_applied is False),
    # which the message says; at stage 1 too, where the gradients are also in p.grad and only the engine's norm is
    # checked
    assert re.search(r"optimizer step 2: train/grad_norm = inf; stopped before applying it", proc.stderr), \
        proc.stderr[-3000:]
    assert "no checkpoint was written by this run" in proc.stderr
    assert not (tmp_path / "ckpt" / "step=2.ckpt").exists()  # a checkpoint every 2 steps: none holds step 2
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize(("fp16", "dynamic", "applied", "expected"), [
    (True, True, False, None),  # fp16's dynamic scaler skipped an overflowing step: routine, not a divergence
    (True, True, True, 1.5),
    (True, False, False, float("inf")),  # a static scale is never lowered: the overflow stays and stops the run
    (False, True, False, float("inf")),  # bf16 has no loss scaler: DeepSpeed dropped a non-finite step
])
def test_the_deepspeed_norm_leaves_out_only_a_step_the_fp16_loss_scaler_skipped(fp16, dynamic, applied, expected):
    from types import SimpleNamespace

    from mgmlora.training.strategies import MgmDeepSpeedStrategy, engine_grad_norm, engine_step_applied

    norm = float("inf") if not applied else 1.5  # what DeepSpeed 0.19.8 reports for a step it found overflowing
    strategy = MgmDeepSpeedStrategy(stage=2)
    strategy.model = SimpleNamespace(fp16_enabled=lambda: fp16, dynamic_loss_scale=lambda: dynamic,
                                     was_step_applied=lambda: applied, get_global_grad_norm=lambda: norm)
    trainer = SimpleNamespace(strategy=strategy)  # `strategy.deepspeed_engine` is its model
    assert engine_grad_norm(trainer) == expected
    assert engine_step_applied(trainer) is applied


def test_a_step_counts_as_the_scalers_skip_only_when_the_engine_did_not_apply_it():
    # ZeRO-1/2 with compute_grad_norm: false report no norm for applied steps too: before, a missing norm under fp16
    # counted every applied step as skipped, and the fit failed as having trained nothing
    from types import SimpleNamespace

    from mgmlora.training.strategies import MgmDeepSpeedStrategy, engine_grad_norm, scaler_skipped_step

    strategy = MgmDeepSpeedStrategy(stage=2)
    trainer = SimpleNamespace(strategy=strategy)
    for applied in (True, False):
        strategy.model = SimpleNamespace(fp16_enabled=lambda: True, dynamic_loss_scale=lambda: True,
                                         was_step_applied=lambda applied=applied: applied,
                                         get_global_grad_norm=lambda: None)
        assert engine_grad_norm(trainer) is None
        assert scaler_skipped_step(trainer) is (not applied)


def test_deepspeeds_engine_has_the_public_methods_the_norm_check_reads():
    deepspeed = pytest.importorskip("deepspeed")
    for name in ("fp16_enabled", "dynamic_loss_scale", "was_step_applied", "get_global_grad_norm"):
        assert callable(getattr(deepspeed.DeepSpeedEngine, name, None)), name


def test_deepspeed_resume_compares_and_applies_the_optimizer_settings_it_restored_itself(moe_runs, tmp_path):
    # DeepSpeed keeps the optimizer state (betas, eps, weight decay) in its own files, not in Lightning's checkpoint
    # dict; its engine restores them before on_load_checkpoint, which compares the restored groups (before the fix a
    # changed betas resumed silently with the checkpoint's). From a copy of the ZeRO-2 run's step-2 checkpoint.
    import shutil

    ckpt = shutil.copytree(moe_runs[2]["out"] / "ckpt" / "step=2.ckpt", tmp_path / "step=2.ckpt")
    env = dict(os.environ, DS_ACCELERATOR="cpu", MGM_TEST_STEPS="3", MGM_TEST_ACCUM="4", MGM_TEST_BETAS="0.8,0.95",
               MGM_TEST_BASE=str(moe_runs[2]["base"]))
    script = [sys.executable, str(ROOT / "tests/scripts/ds_fit_resume.py"), str(tmp_path), "2", "tiny-qwen3-moe",
              "--resume_from", str(ckpt)]
    refused = subprocess.run(script, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert refused.returncode != 0
    assert "model.optim.betas: checkpoint [0.9, 0.999] vs now [0.8, 0.95]" in refused.stderr, refused.stderr[-3000:]
    allowed = subprocess.run(script, capture_output=True, text=True, env={**env, "MGM_TEST_ALLOW": "1"}, timeout=600,
                             cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    groups = json.loads(allowed.stdout.strip().splitlines()[-1])["groups"]
    assert groups and all(g["betas"] == [0.8, 0.95] for g in groups)


def test_drop_frozen_removes_tied_weights_under_every_name():
    import torch

    from mgmlora.models.mgm import MGMConfig
    from mgmlora.models.mgm_checkpoint import build_mgm
    from mgmlora.models.registry import MGM_PRESETS
    from mgmlora.training.strategies import drop_frozen

    model = build_mgm(MGMConfig.from_dict(MGM_PRESETS["tiny-mgm"]), torch.float32)
    model.requires_grad_(False)
    model.mm_projector.requires_grad_(True)
    state = model.state_dict()
    assert "llm.lm_head.weight" in state  # tied to the embeddings: one parameter, two state-dict names
    deepspeed_style = {k: v for k, v in state.items()
                       if not any(k == n and not p.requires_grad for n, p in model.named_parameters())}
    assert "llm.lm_head.weight" in deepspeed_style  # what DeepSpeed's own filter leaves behind
    kept = drop_frozen(dict(state), model)
    assert sorted(kept) == sorted(k for k in state if k.startswith("mm_projector.")) + sorted(
        k for k in state if not k.startswith("mm_projector.") and k not in dict(model.named_parameters(
            remove_duplicate=False)))
    assert "llm.lm_head.weight" not in kept and "llm.model.embed_tokens.weight" not in kept


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoints_export_and_merge_like_plain_ones(moe_runs, stage, tmp_path):
    import torch
    from peft import PeftModel

    from mgmlora.models import load_model
    from mgmlora.tools.export import build_trained_model, merge_and_save, model_args_for, read_run_adapter

    out = moe_runs[stage]["out"]
    run = read_run_adapter(out / "ckpt" / "step=2.ckpt")  # DeepSpeed's model-states file, read with weights_only
    assert run.lora_config is not None and run.adapter and min(v.numel() for v in run.adapter.values()) > 0
    args = model_args_for(run)  # the base directory the run trained from, recorded in its hyperparameters
    ids = torch.tensor([[5, 17, 33, 48, 9, 70, 11]])
    with torch.no_grad():
        adapted = build_trained_model(run, args).model.eval()(input_ids=ids).logits
        final = PeftModel.from_pretrained(load_model(args).model, out / "adapter").eval()(input_ids=ids).logits
    # the step-2 checkpoint is the end of training, so it equals the final exported adapter
    torch.testing.assert_close(adapted, final, rtol=1e-5, atol=1e-5)
    merged_dir = merge_and_save(run, args, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_a_4bit_moe_base_under_deepspeed_is_refused_with_the_key_to_change(tmp_path):
    # On the GPU DeepSpeed's start-up broadcast fails on the experts' zero-memory placeholders with a stride error
    # that names nothing to fix; the refusal comes first, from config files, before the model loads.
    env = dict(os.environ, DS_ACCELERATOR="cpu", MGM_TEST_QUANT="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests/scripts/ds_fit_resume.py"), str(tmp_path), "2",
                           "tiny-qwen3-moe"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    assert "model.model.quantization on a MoE model does not run under DeepSpeed" in proc.stderr
    assert "trainer.strategy: auto" in proc.stderr


def test_deepspeed_on_a_machine_without_cuda_is_one_line_naming_what_to_drop(tmp_path):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from mgmlora.errors import UsageError
    from mgmlora.training.strategies import MgmDeepSpeedStrategy

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=MgmDeepSpeedStrategy(stage=2), max_steps=1,
                        logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(UsageError, match="DeepSpeed runs on CUDA GPUs only .* accelerator is cpu; drop the "
                                         "configs/strategy/ fragment"):
        trainer.fit(BoringModel())


@pytest.mark.parametrize("precision", ["16-mixed", "16-true"])
def test_fp16_at_deepspeed_stage_0_is_refused_before_training(tmp_path, precision):
    # stage 0's fp16 optimizers lower the scale to its minimum and then skip overflowing steps forever, so a diverged
    # run would end with exit 0 (ZeRO-1/2/3 raise at the minimum scale)
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from mgmlora.errors import UsageError
    from mgmlora.training.strategies import MgmDeepSpeedStrategy

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=MgmDeepSpeedStrategy(stage=0), precision=precision,
                        max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(UsageError, match=f"trainer.precision {precision} with DeepSpeed stage 0: .* Use stage 1, 2"):
        trainer.fit(BoringModel())


def _probe_strategy(monkeypatch, fail):
    """MgmDeepSpeedStrategy's save around a parent save that writes one file and then fails with `fail` (one rank)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    from mgmlora.training.strategies import MgmDeepSpeedStrategy

    class Probe(MgmDeepSpeedStrategy):
        is_global_zero, local_rank, world_size = True, 0, 1
        deepspeed_engine = SimpleNamespace(module_state_dict=lambda *a, **k: {}, module=None)

        def broadcast(self, obj, src=0):
            return obj

        def barrier(self, name=None):
            pass

        def reduce_boolean_decision(self, decision, all=True):
            return decision

    def parent_save(self, checkpoint, filepath, storage_options=None):
        Path(filepath).mkdir(parents=True, exist_ok=True)
        (Path(filepath) / "mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)
        raise fail

    monkeypatch.setattr(DeepSpeedStrategy, "save_checkpoint", parent_save)
    probe = Probe.__new__(Probe)
    probe.recovered = set()
    return probe


# what a full disk raises: Python's own write, and torch.save to a path (DeepSpeed's writer; seen on a full tmpfs)
FULL_DISK = {"oserror": OSError(28, "No space left on device"),
             "torch_save": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")}


@pytest.mark.parametrize("raised", FULL_DISK.values(), ids=FULL_DISK.keys())
def test_a_full_disk_during_a_deepspeed_save_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                             raised):
    from mgmlora.errors import DiskFullError

    previous = tmp_path / "checkpoints" / "step=1.ckpt"
    previous.mkdir(parents=True)
    (previous / "model.pt").write_bytes(b"old")
    strategy = _probe_strategy(monkeypatch, raised)
    target = tmp_path / "checkpoints" / "step=2.ckpt"
    with pytest.raises(DiskFullError, match=rf"^{re.escape(str(target))}: disk full after 1000 bytes written"):
        strategy.save_checkpoint({}, target)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step=1.ckpt"]  # no partial directory
    assert (previous / "model.pt").read_bytes() == b"old"

    other = _probe_strategy(monkeypatch, RuntimeError("not a disk matter"))
    with pytest.raises(RuntimeError, match="not a disk matter"):  # anything else passes through unchanged
        other.save_checkpoint({}, tmp_path / "checkpoints" / "step=3.ckpt")


def test_deepspeeds_fp16_loss_scaler_giving_up_stops_the_fit_in_one_line_naming_the_step():
    # DeepSpeed's dynamic loss scaler raises a bare Exception at an overflow with its scale at the minimum
    # (DynamicLossScaler.update_scale): raised here by the installed DeepSpeed, so a changed message fails this test
    from types import SimpleNamespace

    from mgmlora.errors import RUNTIME, classify
    from mgmlora.training.finite import NonFiniteError
    from mgmlora.training.strategies import loss_scale_exhausted
    from tests.training.test_module import _module

    loss_scaler = pytest.importorskip("deepspeed.runtime.fp16.loss_scaler")
    scaler = loss_scaler.DynamicLossScaler(init_scale=1, scale_window=1000, min_scale=1, delayed_shift=1,
                                           consecutive_hysteresis=False, raise_error_at_min_scale=True)

    class EngineOptimizer:  # what Lightning's DeepSpeed step reaches: the engine's step, which updates the scale
        def step(self, closure=None):
            scaler.update_scale(True)

    with pytest.raises(Exception) as raised:
        EngineOptimizer().step()
    assert loss_scale_exhausted(raised.value) and not loss_scale_exhausted(Exception("something else"))
    module = _module()
    module.finite.scaler_skipped = 17
    module._trainer = SimpleNamespace(global_step=4, checkpoint_callback=SimpleNamespace(last_model_path="ck/last"))
    with pytest.raises(NonFiniteError) as stopped:
        module.optimizer_step(0, 0, EngineOptimizer(), None)
    message = str(stopped.value)
    expected = ("optimizer step 5: its fp16 gradients overflowed with DeepSpeed's loss scale already at its minimum "
                "(17 overflowing step(s) skipped before); stopped before applying it")
    assert message.startswith(expected), message
    assert "the newest checkpoint is ck/last" in message and "bf16-mixed" in message and "\n" not in message
    assert classify(stopped.value) == ("user", RUNTIME)
    with pytest.raises(ValueError, match="other"):  # any other error of the step is left as it is

        class Broken:
            def step(self, closure=None):
                raise ValueError("other")

        module.optimizer_step(0, 0, Broken(), None)

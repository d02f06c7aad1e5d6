"""LoraLitModule: the one LightningModule for every model family.

Family differences (how a model is built, which module is the language model, how a batch becomes hidden states)
are methods of the loaded model (mgmlora.models.loaded); strategy differences are questions answered by
mgmlora.training.strategies; the loss normalisation over the accumulation window is mgmlora.training.window's. What is
left here is the order of things: build, step, evaluate, optimise, save and restore what trains.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from transformers import PreTrainedTokenizerBase

from mgmlora.batch import IGNORE_INDEX, Batch
from mgmlora.errors import UsageError
from mgmlora.models import LoadedModel, ModelInfo, load_model, model_info, uses_moe
from mgmlora.models.args import ModelArgs
from mgmlora.models.attention import check_trains_on, describe_packed_attention
from mgmlora.models.causal_lm import check_vocab, describe_source, load_tokenizer
from mgmlora.models.identity import BASE_KEY, base_fingerprint, check_base
from mgmlora.models.loaded import Forward
from mgmlora.models.quantization import DEEPSPEED_MOE_REFUSAL
from mgmlora.training.adapter_check import check_adapter_tensors, lora_config_from
from mgmlora.training.fastpath import CompileWatch, apply_fast_path
from mgmlora.training.finite import FINITE_KEY, FiniteGuard, drop_gradients
from mgmlora.training.lightning_private import attached_trainer, estimated_stepping_batches
from mgmlora.training.lora import LoraArgs, LoraPlan, count_parameters, lora_report
from mgmlora.training.loss import LossOut, SpeedArgs, check_available, lm_loss
from mgmlora.training.optim import OptimArgs, build_optimizer, decays_matrices, reapply
from mgmlora.training.resume import RUN_KEY as RESUME_KEY
from mgmlora.training.resume import check_resume_math, optimizer_settings, run_math, saved_optimizer_settings
from mgmlora.training.rng import RNG_KEY, TrainingRng
from mgmlora.training.strategies import (
    engine_grad_norm,
    engine_step_applied,
    gathered,
    holds_whole_gradients,
    input_cast_needed,
    is_deepspeed,
    loss_scale_exhausted,
    mark_moe_leaves,
    scaler_skipped_step,
    scales_loss,
    steps_itself,
    zero3_build,
)
from mgmlora.training.trainable import (
    Trainability,
    apply_trainability,
    check_resume,
    component_report,
    load_trainables,
    trains_language_model,
)
from mgmlora.training.window import AccumulationWindow, window_offset

# LoRA settings that change what a saved adapter computes: a checkpoint and the config must agree on all of them
LORA_MATH = ("r", "lora_alpha", "target_modules", "target_parameters", "rank_pattern", "alpha_pattern", "use_dora",
             "use_rslora", "exclude_modules", "modules_to_save", "bias")


def _norm(value):
    """Config values compare equal whether a JSON round trip made them lists or they are still sets."""
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


class LoraLitModule(L.LightningModule):
    """LoRA fine-tuning of a causal LM or of MGM.

    Args:
        model: which model and how to load it.
        lora: LoRA preset and overrides (PEFT field names).
        optim: AdamW and learning-rate schedule.
        trainable: which components train (LLM LoRA / frozen / full, MGM projector, towers).
        speed: loss implementation and padding-free micro-batches (mgmlora.training.loss); none changes what is learned.
        allow_resume_changes: resume a checkpoint although dropout, accumulation, micro-batch size, ranks, precision,
            or the optimizer's lr, betas, eps or weight decay differ from the run that wrote it (otherwise refused,
            listing the differences: mgmlora.training.resume); the new values take effect.
    """

    def __init__(self, model: ModelArgs, lora: LoraArgs = LoraArgs(), optim: OptimArgs = OptimArgs(),
                 trainable: Trainability = Trainability(), speed: SpeedArgs = SpeedArgs(),
                 allow_resume_changes: bool = False):
        super().__init__()
        self.model_args, self.lora_args, self.optim_args, self.trainable = model, lora, optim, trainable
        self.speed = speed
        self.allow_resume_changes = allow_resume_changes
        check_available(speed)
        self.save_hyperparameters({"model": asdict(self.model_args), "lora": asdict(self.lora_args),
                                   "optim": asdict(self.optim_args), "trainable": asdict(self.trainable),
                                   "speed": asdict(self.speed)})
        # what the DataModule needs from the model, handed over by its connect(tokenizer, info) (MgmCLI does it)
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(self.model_args)
        self.info: ModelInfo = model_info(self.model_args)  # family and image geometry; callbacks read it too
        self.vocab_size = self.info.vocab_size
        self.model = None  # built in configure_model, so strategies (DeepSpeed ZeRO-3) control where weights land
        self.loaded: LoadedModel | None = None  # the base model and its family's behaviour (set in configure_model)
        self.base_id: str | None = None  # mgmlora.models.identity's fingerprint of the base (set in configure_model)
        self.plan: LoraPlan | None = None  # set in configure_model; None means no LoRA (callbacks read it)
        self.strict_loading = False  # checkpoints hold the adapter only; the frozen base comes from model_path
        self.checkpoint_step: int | None = None  # optimizer steps of the loaded checkpoint (callbacks.run_step)
        self.val_loss = MeanMetric()
        self.val_token_acc = MulticlassAccuracy(num_classes=self.vocab_size, ignore_index=IGNORE_INDEX,
                                                average="micro")
        self.window = AccumulationWindow()  # loss normalisation and window end; callbacks read window.ended
        self._rng = TrainingRng()  # dropout's random numbers, saved in checkpoints (mgmlora.training.rng)
        self.finite = FiniteGuard(optim.skip_nonfinite_steps)  # NaN/inf stops the run (mgmlora.training.finite)
        self.compile_watch: CompileWatch | None = None  # with speed.compile, read after the first micro-batch
        self._reapply_optim = False  # a resumed fit's allowed optimizer change, applied in on_train_start
        self._trains_text = True  # a trainable parameter lies in the language model (set in configure_model)
        self._reached = False  # this window could send a gradient to a trainable parameter (FiniteGuard's stall check)

    # -- model -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Loads the base model and wraps it with LoRA (once; Lightning calls this for every stage)."""
        if self.model is not None:
            return
        trainer = attached_trainer(self)
        if self.model_args.quantization is not None and is_deepspeed(trainer) and uses_moe(self.model_args):
            raise UsageError(DEEPSPEED_MOE_REFUSAL)  # from config files, before the model loads
        if trainer is not None and trainer.state.fn == "fit":
            check_trains_on(self.model_args.attn_implementation, trainer.strategy.root_device)
        with zero3_build(trainer) as peft_context:
            loaded = load_model(self.model_args, packing=self.speed.packing)
            check_vocab(loaded.language_model(), self.tokenizer, "model")
            with peft_context():
                self.model, self.plan = apply_trainability(loaded, self.lora_args, self.trainable)
            self._trains_text = trains_language_model(self.model, loaded.components)
            mark_moe_leaves(self.model, trainer)  # before deepspeed.initialize installs its fetch hooks
        self.loaded = loaded
        self.base_id = base_fingerprint(self.model_args)  # recorded with every save, compared on every load
        same_dtype = not input_cast_needed(trainer, self.model_args.dtype)
        fast = apply_fast_path(loaded, self.speed, same_dtype)
        self.compile_watch = CompileWatch() if self.speed.compile else None  # read after the first step
        if self.speed.packing:
            fast.append(f"packed micro-batches, attention: {describe_packed_attention(self.model_args)}")
        if self.plan is not None:
            # Provenance in adapter_config.json (PEFT would write None for a randomly initialised base).
            source = self.model_args.model_path or self.model_args.preset
            self.model.peft_config["default"].base_model_name_or_path = source
        rank_zero_info(f"mgmlora: {describe_source(self.model_args)}\n{self.report()}"
                       + "".join(f"\nspeed: {line}" for line in fast))

    def report(self) -> str:
        """What trains: the LoRA report (when LoRA is on) and trainable parameters per component."""
        head = lora_report(self.model, self.plan) if self.plan is not None else f"LoRA off (trainable.llm=" \
            f"{self.trainable.llm})"
        return f"{head}\ntrainable parameters per component:\n" \
            f"{component_report(self.model, self.loaded.components)}"

    def non_lora_trainables(self) -> dict[str, torch.Tensor]:
        """Trainable parameters PEFT's adapter does not hold (MGM projector/mining, a fully trained LLM)."""
        return {n: p.detach() for n, p in self.loaded.model.named_parameters()
                if p.requires_grad and "lora_" not in n and "modules_to_save" not in n}

    def on_fit_start(self) -> None:
        """Logs parameter counts and the LoRA report next to the run, at the step the fit starts from."""
        trainable, total = count_parameters(self.model)
        if self.logger is not None:
            step = self.trainer.global_step  # where this fit starts (a resumed run's step)
            self.logger.log_metrics({"params/trainable": trainable, "params/total": total}, step=step)
            experiment = getattr(self.logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("lora", "```\n" + self.report() + "\n```", step)

    def on_train_start(self) -> None:
        """An allowed change of lr, betas, eps or weight decay on resume takes effect (mgmlora.training.resume).

        Lightning restores the checkpoint's optimizer and schedule states whole, after `on_load_checkpoint`; here,
        once both are restored, the configured values are put back onto them (mgmlora.training.optim.reapply).
        """
        if not self._reapply_optim:
            return
        self._reapply_optim = False
        schedulers = self.trainer.lr_scheduler_configs
        for optimizer in self.trainer.optimizers:
            reapply(optimizer, schedulers[0].scheduler if schedulers else None, self.optim_args,
                    decays_matrices(self.model))

    # -- loss --------------------------------------------------------------------------------------------------
    def _loss_sum(self, batch: Batch, with_preds: bool = False) -> LossOut:
        """Summed next-token cross-entropy over supervised positions and their count (mgmlora.training.loss)."""
        # a family may return a plain (hidden, labels, head): its labels are then read on the device
        fwd = Forward(*self.loaded.forward_hidden(batch, self.speed.packing, self.speed.pad_to_multiple))
        return lm_loss(fwd.hidden, fwd.labels, fwd.head, self.speed.loss, self.speed.loss_chunk_size, with_preds,
                       fwd.host_labels)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """One micro-batch, scaled for its accumulation window (mgmlora.training.window)."""
        out = self._loss_sum(batch)
        self._reached = self._reached or self._trains_text or self.loaded.reaches_components(batch)
        trainer = self.trainer
        loss = self.window.scaled(batch, out.loss_sum, out.n_tokens, batch_idx, trainer.accumulate_grad_batches,
                                  trainer.world_size, trainer.num_training_batches)
        self._rng.leave()  # the forward drew this micro-batch's dropout masks; backward recomputes under a forked RNG
        return loss

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Continues training's random-number stream where the previous micro-batch (or the checkpoint) left it."""
        self._rng.enter(starts_window=batch_idx % self.trainer.accumulate_grad_batches == 0)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Checks and logs the window's token-mean loss and the (pre-clipping) gradient norm, once per optimizer step.

        A NaN/inf loss or gradient norm stops the run here, before the update, or drops this step's gradients when
        `optim.skip_nonfinite_steps` allows (mgmlora.training.finite). Under DeepSpeed, Lightning calls the optimizer
        step after every micro-batch and DeepSpeed's engine steps only at the window's end, so this hook returns until
        the window has ended. DeepSpeed's gradient norm is read from its engine after the step (`optimizer_step`) and
        only the loss is checked here: from ZeRO-2 on the gradients live in its own (partitioned) buffers, and at
        stages 0 and 1 `p.grad` holds gradients that DeepSpeed's step may still reduce or unscale (fp16).
        """
        if not self.window.ended:
            return
        loss = self.window.close()
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        norm = None
        if grads and not steps_itself(self.trainer):
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        scaled = scales_loss(self.trainer)  # 16-mixed: the loss scaler skips overflowing gradients itself
        checked = {"train/loss": loss, "train/grad_norm": None if scaled else norm}
        step = self.trainer.global_step + 1
        if self._check_finite(step, checked, can_skip=not steps_itself(self.trainer) and not scaled,
                              reached=self._reached):
            drop_gradients(optimizer)
            rank_zero_info(f"mgmlora: optimizer step {step} skipped (non-finite loss or "
                           f"gradient norm; {self.finite.skipped} of optim.skip_nonfinite_steps="
                           f"{self.finite.max_skipped} used)")
            return
        if norm is not None:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)

    def _newest_checkpoint(self) -> str | None:
        callback = self.trainer.checkpoint_callback
        return getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "") or None

    def _check_finite(self, step: int, values: dict, can_skip: bool, applied: bool = False,
                      reached: bool = True) -> bool:
        trainer = self.trainer
        agree = (lambda bad: trainer.strategy.reduce_boolean_decision(bad, all=False)) if trainer.world_size > 1 \
            else None
        return self.finite.check(step, values, agree, can_skip, self._newest_checkpoint(), applied, reached)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Steps as Lightning does; under DeepSpeed, then checks and logs the gradient norm of the step that just ran.

        DeepSpeed's norm (the engine's pre-clipping one) is known only after its engine stepped. It is checked here,
        inside the step, because every callback's `on_train_batch_end` (ModelCheckpoint's periodic save, a preemption
        save) runs before this module's: checked there, a non-finite step would already be in a checkpoint, which the
        error would then name as the one to resume from.

        DeepSpeed's fp16 loss scaler, once its scale is at the minimum, raises a bare exception at the next overflow
        (`loss_scale_exhausted`): that stops the fit as a divergence does, in one line naming the step and the newest
        checkpoint, with the update not applied.
        """
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        except Exception as error:
            if not loss_scale_exhausted(error):
                raise
            skipped = f" ({self.finite.scaler_skipped} overflowing step(s) skipped before)" \
                if self.finite.scaler_skipped else ""
            self.finite.stop(self.trainer.global_step + 1, "its fp16 gradients overflowed with DeepSpeed's loss "
                             f"scale already at its minimum{skipped}", self._newest_checkpoint(), applied=False,
                             fix="Train in bf16 (trainer.precision: bf16-mixed) where the GPU supports it, or lower "
                                 "model.optim.lr, set trainer.gradient_clip_val, or check the data.")
        if not (self.window.ended and steps_itself(self.trainer)):
            return  # not DeepSpeed: checked in on_before_optimizer_step
        if scaler_skipped_step(self.trainer):
            self.finite.scaler_skipped += 1  # the same on every rank: DeepSpeed agrees on an overflow across them
            return
        norm = engine_grad_norm(self.trainer)
        if norm is not None:
            # the engine stepped already: a non-finite norm stops the run before any checkpoint or adapter holds it
            self._check_finite(self.trainer.global_step + 1, {"train/grad_norm": norm}, can_skip=False,
                               applied=engine_step_applied(self.trainer), reached=self._reached)
            self.log("train/grad_norm", torch.as_tensor(norm, dtype=torch.float32), on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Says, after the first micro-batch, whether `speed.compile` compiled anything; a window's end resets reach."""
        if self.compile_watch is not None:
            compiled, line = self.compile_watch.outcome()
            self.compile_watch = None
            if line:
                (rank_zero_info if compiled else rank_zero_warn)(f"mgmlora: {line}")
        if self.window.ended:
            self._reached = False  # the next micro-batch starts a window

    # -- evaluation --------------------------------------------------------------------------------------------
    def _eval_step(self, batch: Batch) -> None:
        out = self._loss_sum(batch, with_preds=True)
        if out.n_tokens > 0:
            self.val_loss.update(out.loss_sum / out.n_tokens, weight=out.n_tokens)  # token-weighted epoch mean
            self.val_token_acc.update(out.preds, out.targets)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Accumulates token-weighted loss and token accuracy."""
        self._eval_step(batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Same metrics as validation, logged under test/."""
        self._eval_step(batch)

    def _log_eval(self, prefix: str) -> None:
        loss = self.val_loss.compute()
        self.log_dict({f"{prefix}/loss": loss, f"{prefix}/ppl": torch.exp(loss.clamp(max=50)),
                       f"{prefix}/token_acc": self.val_token_acc.compute()}, prog_bar=prefix == "val")
        self.val_loss.reset()
        self.val_token_acc.reset()

    def on_validation_epoch_end(self) -> None:
        """Logs val/loss, val/ppl (exp of the token-mean loss) and val/token_acc."""
        if self.val_loss.update_count:
            self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        """Logs test/loss, test/ppl and test/token_acc."""
        if self.val_loss.update_count:
            self._log_eval("test")

    # -- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        """AdamW over trainable parameters with warmup + decay over the run's optimizer steps."""
        total = estimated_stepping_batches(self.trainer)  # leaves a resumed fit's loader to be built after the restore
        total = int(total) if math.isfinite(total) else 1
        if self.optim_args.fused and scales_loss(self.trainer) and self.trainer.gradient_clip_val:
            raise ValueError("optim.fused: true with gradient clipping under 16-mixed: the fused optimizer unscales "
                             "inside its step, after clipping, so the clip would see scaled gradients; use "
                             "precision bf16-mixed, drop trainer.gradient_clip_val, or set optim.fused: false.")
        return build_optimizer(self.model, self.optim_args, total)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        """Clips as Lightning does, and also for a fused AdamW under bf16 (`optim.fused`).

        Lightning refuses to clip for optimizers that unscale gradients themselves (fused AdamW says it does) under
        mixed precision. bf16 has no loss scaler, so the gradients are already true gradients and are clipped here.
        """
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        whole = holds_whole_gradients(self.trainer)  # sharded strategies clip their own way
        if not (fused and gradient_clip_val and whole and str(self.trainer.precision).startswith("bf16")):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def trained_on_host(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(LoRA adapter, other trainables): whole tensors, copied to the CPU; the adapter is {} without LoRA.

        A collective under ZeRO-3 (every rank must call it): the partitions are gathered first. Copies go straight to
        host memory (a checkpoint writer puts them there anyway): cloning on the GPU would add the size of everything
        trainable to peak memory at each save (gigabytes for a full MGM fine-tune). Copies, not views, because ZeRO-3
        frees the gathered tensors when the context exits.
        """
        to_host = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
        with gathered(self.model, attached_trainer(self)):
            adapter = get_peft_model_state_dict(self.model, save_embedding_layers=False) if self.plan is not None \
                else {}
            return ({k: to_host(v) for k, v in adapter.items()},
                    {k: to_host(v) for k, v in self.non_lora_trainables().items()})

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Replaces the full state dict with what trains (never the frozen base); adds every rank's RNG state."""
        checkpoint["state_dict"] = {}
        trainer = attached_trainer(self)
        mid_window = trainer is not None and trainer.state.fn == "fit" and window_offset(trainer) > 0
        # a collective, like the gather below: every rank runs this hook; a checkpoint taken inside an accumulation
        # window describes the window's start (mgmlora.training.preemption), its random-number state too
        checkpoint[RNG_KEY] = self._rng.save(at_window_start=mid_window)
        checkpoint[BASE_KEY] = self.base_id
        checkpoint[FINITE_KEY] = self.finite.state_dict()  # changes only at optimizer steps: also the window start's
        if trainer is not None:
            checkpoint[RESUME_KEY] = run_math(trainer, self._dropout())
        adapter, checkpoint["trainables"] = self.trained_on_host()
        if self.plan is not None:
            # the config as plain JSON types, so every checkpoint format (DeepSpeed's too) loads with weights_only
            config = json.loads(json.dumps(self.model.peft_config["default"].to_dict(), default=sorted))
            checkpoint["peft"] = {"config": config, "adapter": adapter}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restores the adapter and trainables saved by `on_save_checkpoint`, after checking they fit the config.

        Also takes this rank's random-number state, which the first resumed training micro-batch continues from.
        """
        trainer = attached_trainer(self)
        self.checkpoint_step = checkpoint.get("global_step")
        self.configure_model()
        check_base(checkpoint.get(BASE_KEY), self.base_id, "the checkpoint",
                   self.model_args.model_path or self.model_args.preset)
        if trainer is not None and trainer.state.fn == "fit":  # evaluation restores no optimizer state
            check_resume((checkpoint.get("hyper_parameters") or {}).get("trainable"), self.trainable,
                         self.loaded.components)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if trainer is not None and trainer.state.fn == "fit":
            self.finite.load_state_dict(checkpoint.get(FINITE_KEY))
        why_not = self._rng.load(checkpoint.get(RNG_KEY), rank, world)
        if why_not is not None:
            rank_zero_info(f"mgmlora: {why_not}; dropout continues from fresh random numbers, so the resumed run is "
                           "not bit-identical to an unbroken one.")
        # Under ZeRO-3 the local parameters are empty partitions: gather them, let rank 0 write, re-partition.
        with gathered(self.model, trainer, modifier_rank=0):
            self._load_checkpoint_tensors(checkpoint)
        if trainer is not None and trainer.state.fn == "fit":  # after the LoRA shape check: that one names more
            a = self.optim_args
            now = optimizer_settings(a.lr, a.betas, a.eps, a.weight_decay if decays_matrices(self.model) else 0.0)
            # under DeepSpeed the engine restored its optimizer from its own files before this hook (Lightning's
            # restore_checkpoint_after_setup); its param groups are the checkpoint's then
            restored = trainer.optimizers[0].param_groups if is_deepspeed(trainer) and trainer.optimizers else None
            saved_optim = saved_optimizer_settings(checkpoint, restored)
            saved = {**(checkpoint.get(RESUME_KEY) or {}), **saved_optim}
            check_resume_math(saved, {**run_math(trainer, self._dropout()), **now}, self.allow_resume_changes,
                              rank_zero_info)
            # allowed (or none): the restored optimizer gets the configured values back in on_train_start
            self._reapply_optim = any(saved_optim[k] != now[k] for k in saved_optim)

    def _dropout(self) -> float | None:
        """The LoRA dropout the adapter runs with (None without LoRA)."""
        return self.model.peft_config["default"].lora_dropout if self.plan is not None else None

    def _load_checkpoint_tensors(self, checkpoint: dict) -> None:
        self._load_trainables(checkpoint.get("trainables"))
        peft = checkpoint.get("peft")
        if self.plan is None:
            if peft is not None:
                raise ValueError("the checkpoint holds a LoRA adapter but trainable.llm is not `lora`.")
            return
        if peft is None:
            raise ValueError("this checkpoint has no adapter (it was not written by mgmlora's AdapterCheckpointIO).")
        saved, current = peft["config"], self.model.peft_config["default"]
        saved = lora_config_from(saved, "the checkpoint's adapter_config")  # fields mgmlora does not implement
        diffs = [f"model.lora.{k}: checkpoint {_norm(getattr(saved, k))!r} vs config {_norm(getattr(current, k))!r}"
                 for k in LORA_MATH if _norm(getattr(saved, k)) != _norm(getattr(current, k))]
        if diffs:
            raise ValueError("the checkpoint's adapter does not match the configured LoRA (" + "; ".join(diffs) +
                             "): set these keys to the checkpoint's values (its run's config.yaml holds them).")
        # missing, extra, base-weight, mis-shaped or non-float tensors are refused before any is applied
        check_adapter_tensors("the checkpoint's adapter", get_peft_model_state_dict(self.model,
                              save_embedding_layers=False), peft["adapter"])
        set_peft_model_state_dict(self.model, peft["adapter"])

    def _load_trainables(self, tensors: dict[str, torch.Tensor] | None) -> None:
        missing = [k for k in self.non_lora_trainables() if k not in (tensors or {})]
        if missing and tensors is None:  # mgmlora.training.checkpoint reads them from non_lora_trainables.safetensors
            raise ValueError(f"the checkpoint holds no non-LoRA trainables, but model.trainable trains {len(missing)} "
                             f"tensors here ({missing[0]}, ...): its non_lora_trainables.safetensors is missing (copy "
                             "it from the run), or the run trained with other model.trainable.* settings (set them "
                             "back).")
        if missing:
            raise ValueError(f"checkpoint trainables do not match the configured model: missing {missing[:5]} "
                             "(check trainable.* against the run that saved it).")
        load_trainables(self.loaded.model, tensors or {}, "checkpoint")

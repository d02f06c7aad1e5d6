"""Non-finite training: a NaN or inf loss or gradient norm stops the run at that optimizer step, before the update.

A run that goes on after its loss turned NaN writes NaN into every later checkpoint and into the final adapter, and
still ends with exit 0. `FiniteGuard` is asked once per optimizer step, after the window's backward and before the
optimizer updates the weights (LoraLitModule.on_before_optimizer_step). By default the first non-finite quantity
raises `NonFiniteError`: the update is not applied, no checkpoint or adapter is written after it (the last
finite checkpoint stays the newest), and the command exits 1 with one line naming the step and the quantity.

`optim.skip_nonfinite_steps: N` allows up to N such steps to be skipped instead (the gradients are dropped, so the
weights and the optimizer's moments stay as they were; the learning-rate schedule still advances); the N+1-th stops
the run as above. Skipping needs the gradients in PyTorch's hands, so DeepSpeed runs (whose engine owns them) always
stop. Under `16-mixed` the loss scaler already skips steps whose gradients overflow, so only the loss is checked
(DeepSpeed's dynamic fp16 scaler likewise: a step it skipped has no norm to check, `engine_grad_norm`, and is
counted, `scaler_skipped`; a fit of only such steps trained nothing).
All ranks agree on the decision (one boolean all-reduce per optimizer step), so no rank waits on a stopped one.

A run can also stop learning without a NaN: a learning rate far too high saturates the model within a few steps,
after which every gradient is exactly zero and the loss stays flat, and the fit would end with exit 0 and an adapter
that does nothing useful. `FiniteGuard` notes where the gradient norm became exactly 0 and stayed there;
`stalled()` names that stretch when it runs to the fit's end (at least two steps), and RunOutcome then fails the
fit (`StalledError`, exit 1). The gradient norm is a global quantity, the same on every rank. A window that could not
reach any trainable parameter (text-only samples when only MGM's image path trains) is left out of that stretch.

The guard's counters are part of every checkpoint (`state_dict`), so a resumed fit goes on with the skips already
used, a stall that began before the checkpoint, and the steps that trained before it, as an unbroken fit would.
"""

from __future__ import annotations

import math

import torch

from mgmlora.errors import MgmloraError

FINITE_KEY = "mgmlora_finite_guard"  # the checkpoint entry holding FiniteGuard.state_dict()
_COUNTERS = ("skipped", "zero_since", "last_step", "counted", "unreached", "scaler_skipped")


class NonFiniteError(MgmloraError):
    """The loss or the gradient norm of an optimizer step is NaN or inf; the step's update was not applied."""


class StalledError(MgmloraError):
    """Every optimizer step from some step to the end of the fit had a gradient norm of exactly zero."""


class FiniteGuard:
    """Counts skipped non-finite steps and decides, per optimizer step, between go on, skip and stop.

    Args:
        max_skipped: how many non-finite steps may be skipped in the run (a resumed fit counts its checkpoint's skips)
            before the next one stops it (0: none).
    """

    def __init__(self, max_skipped: int = 0) -> None:
        if max_skipped < 0:
            raise ValueError(f"optim.skip_nonfinite_steps must be >= 0 (got {max_skipped})")
        self.max_skipped = max_skipped
        self.skipped = 0
        self.zero_since: int | None = None  # first step of the current run of exactly-zero gradient norms
        self.last_step = 0
        self.counted = 0  # optimizer steps whose norm was read and whose window reached a trainable parameter
        self.unreached = 0  # optimizer steps whose window reached no trainable parameter on any rank
        self.scaler_skipped = 0  # optimizer steps DeepSpeed's fp16 loss scaler skipped (overflow: no update applied)
        self.partial = False  # resumed from a checkpoint without these counters: they cover this fit's steps only

    def state_dict(self) -> dict[str, int | None]:
        """The counters, for a checkpoint (the same on every rank: each decision is agreed by all of them).

        `partial` goes with them: counts that began at a checkpoint without counters stay partial in every later one.
        """
        return {**{name: getattr(self, name) for name in _COUNTERS}, "partial": self.partial}

    def load_state_dict(self, state: dict[str, int | None] | None) -> None:
        """Continues from a checkpoint's counters.

        None (a checkpoint written before they were saved) marks the counts as this fit's only: `untrained()` then
        gives no verdict on them.
        """
        if state is None:
            self.partial = True
            return
        for name in _COUNTERS:
            setattr(self, name, state.get(name, 0) if name == "scaler_skipped" else state[name])  # newer than the rest
        self.partial = bool(state.get("partial", False))

    def check(self, step: int, values: dict[str, torch.Tensor | float | None], agree=None,
              can_skip: bool = True, newest: str | None = None, applied: bool = False, reached: bool = True) -> bool:
        """Whether to skip this optimizer step; raises NonFiniteError when the run must stop.

        Args:
            step: the optimizer step about to run (1-based: `global_step + 1`).
            values: the quantities to check, in the order they are named (e.g. loss, then grad norm); None is skipped.
            agree: `f(local_bad) -> any rank bad` (the strategy's boolean all-reduce); None on a single process.
            can_skip: False where the gradients cannot be dropped (DeepSpeed, or after the optimizer stepped).
            newest: the newest checkpoint on disk, named in the message so the user knows where to resume from.
            applied: the step's update was applied (DeepSpeed's norm is known only after its engine stepped, which
                drops a non-finite step itself, `engine_step_applied`); no checkpoint follows.
            reached: this rank's window could send a gradient to a trainable parameter (False: a window of text-only
                samples for a run that trains only MGM's image path). A zero norm of a window that no rank's window
                reached says nothing about learning: such a step neither starts nor extends a stall.
        """
        first = next((f"{name} = {float(v)}" for name, v in values.items()
                      if v is not None and not math.isfinite(float(v))), None)
        bad = agree(first is not None) if agree is not None else first is not None
        if not bad:
            norm = values.get("train/grad_norm")
            if norm is not None:  # already on the host: float() above synchronised it
                if float(norm) == 0.0 and not (agree(reached) if agree is not None else reached):
                    self.unreached += 1  # the norm is global: every rank takes this branch and joins the agreement
                    return False
                if float(norm) != 0.0:
                    self.zero_since = None
                elif self.zero_since is None:
                    self.zero_since = step
                self.last_step = step
                self.counted += 1
            return False
        if can_skip and self.skipped < self.max_skipped:
            self.skipped += 1
            return True
        self.stop(step, first or "a non-finite loss or gradient norm on another rank", newest, applied)

    def stop(self, step: int, what: str, newest: str | None, applied: bool, fix: str | None = None) -> None:
        """Raises the one-line NonFiniteError that stops the fit at `step` because of `what`.

        Args:
            step: the optimizer step (1-based) that stops the fit.
            what: what went wrong in it, for the message.
            newest: the newest checkpoint this run wrote (the state to resume from), or None.
            applied: whether the optimizer had already applied the step's update.
            fix: what to change; by default the remedies for a diverging loss, skipping included.
        """
        where = f"the newest checkpoint is {newest}" if newest else "no checkpoint was written by this run"
        allowance = (f"{self.skipped} non-finite step(s) already skipped (model.optim.skip_nonfinite_steps="
                     f"{self.max_skipped}); " if self.skipped else "")
        raise NonFiniteError(
            f"optimizer step {step}: {what}; stopped {'after' if applied else 'before'} applying it, "
            f"{allowance}{where}; no adapter was written. " + (fix or (
                "Lower model.optim.lr, set trainer.gradient_clip_val, check the data, or set "
                "model.optim.skip_nonfinite_steps N to skip up to N such steps.")))

    def untrained(self) -> str | None:
        """Why the fit trained nothing although it stepped, or None.

        No step's window reached a trainable parameter, or the loss scaler skipped every step that did.
        """
        if self.counted or self.partial or not (self.unreached or self.scaler_skipped):
            return None
        why = []
        if self.unreached:
            why.append(f"{self.unreached} optimizer step(s) had no sample that reaches a trainable parameter (only "
                       "components besides the language model train, model.trainable, and no sample had what they "
                       "take, such as an image)")
        if self.scaler_skipped:
            why.append(f"DeepSpeed's fp16 loss scaler skipped {self.scaler_skipped} optimizer step(s) for overflowing "
                       "gradients (no update applied; trainer.precision bf16-mixed avoids the scaler)")
        return f"none of its {self.unreached + self.scaler_skipped} optimizer step(s) trained: " + "; ".join(why)

    def stalled(self) -> str | None:
        """Why the fit stopped learning (its last steps' gradient norms are exactly 0), or None."""
        if self.zero_since is None or self.last_step - self.zero_since < 1:
            return None
        return (f"the gradient norm was exactly 0 at every optimizer step from step {self.zero_since} to the last, "
                f"step {self.last_step}: the run stopped learning (the model saturated, typically from a learning "
                "rate far too high)")


def drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Removes every gradient the optimizer would use, so its step leaves those parameters and their state as they are.

    PyTorch's optimizers skip parameters whose `.grad` is None (AdamW's moments and step count included).
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


__all__ = ["FINITE_KEY", "FiniteGuard", "NonFiniteError", "StalledError", "drop_gradients"]

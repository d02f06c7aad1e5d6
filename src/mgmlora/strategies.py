"""Training strategies: Lightning's DeepSpeedStrategy with the gradient-accumulation scaling fixed.

Lightning 2.6 divides the training-step loss by `accumulate_grad_batches` before backward, and DeepSpeed's
`engine.backward(loss, scale_wrt_gas=True)` divides it by `gradient_accumulation_steps` again, so every gradient
(and with it gradient clipping and the logged grad norm) is `accumulate_grad_batches` times too small: 128x with the
MGM-2B recipe (reported as Lightning-AI/pytorch-lightning#6170, verified in ../shared/docs/stack.md section 0.1).
mgmlora keeps Lightning's division (its loss normalisation relies on it) and turns DeepSpeed's off.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy


class MgmDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy whose backward does not scale the loss by the accumulation steps a second time.

    Takes exactly DeepSpeedStrategy's arguments (stage, offload_optimizer, bucket sizes, ...).
    """

    def backward(self, closure_loss: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        """Runs DeepSpeed's backward with `scale_wrt_gas=False` (Lightning already divided the loss)."""
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

"""The LM head as the fast losses must call it: the head module plus any logit transform the family applies after it.

The chunked and Liger losses (mgmlora.training.loss) call the head themselves on the supervised positions only, so a
family that transforms its logits inside `forward` (Gemma-2/3 soft-capping, Cohere's scale, Granite's divisor) needs
the same transform here, or the loss would differ from the model's own.
"""

from __future__ import annotations

import torch
from torch import nn


class PostProcessedHead(nn.Module):
    """The LM head followed by the logit transforms some families apply after it in their `forward`.

    Gemma-2/3 soft-cap the logits (`final_logit_softcapping`), Cohere multiplies them (`logit_scale`), Granite divides
    them (`logits_scaling`). The fast losses call the head themselves, so they must apply the same transforms.
    """

    def __init__(self, head: nn.Module, scale: float, softcap: float | None):
        super().__init__()
        self.head, self.scale, self.softcap = head, scale, softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # noqa: D102
        logits = self.head(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def output_head(model: nn.Module) -> nn.Module:
    """The module that maps final hidden states to the logits `model.forward` returns."""
    head, config = model.get_output_embeddings(), model.config
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    return head if scale == 1.0 and softcap is None else PostProcessedHead(head, scale, softcap)


__all__ = ["PostProcessedHead", "output_head"]

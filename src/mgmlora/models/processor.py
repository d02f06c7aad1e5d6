"""The family's processor: what the data side asks a model family, as transformers' processors answer it.

A family that takes chat-formatted image-text data (LLaVA-style records) owns three things the family-neutral data
code must not know: its conversation template (where the question, the answer and the image go, and which characters
are supervised), its image preprocessing, and the names and shapes of the tensors its forward takes per image. The
data side reads records, tokenises the rendered text with the image placeholder as `IMAGE_TOKEN_INDEX`, loads images
with `mgmlora.data.images.load_rgb` and stacks whatever `image_inputs` returns into `Batch.model_inputs`; the family's
`LoadedModel.forward_hidden` takes those tensors by name.

A new family subclasses `Processor`, returns it from its `ModelInfo`, and nothing under data/, training/ or tools/
changes (docs/design/architecture.md, "Adding a model family").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
from PIL import Image

IMAGE_PLACEHOLDER = "<image>"  # where the image goes in rendered text; tokenised as one IMAGE_TOKEN_INDEX
AspectRatio = Literal["pad", "square"]  # pad to a square, or centre-crop to one, before resizing
Rounds = list[tuple[str, str]]  # (question, answer) per round, image tags already removed


class Processor(ABC):
    """A family's conversation template and image transform.

    Attributes:
        image_tokens: embeddings one image placeholder expands to in the model (0 for a text-only family).
        max_length: the family's length limit after image expansion (truncation target of the data side).
    """

    image_tokens: int
    max_length: int

    @abstractmethod
    def render(self, rounds: Rounds, has_image: bool) -> tuple[str, list[tuple[int, int]]]:
        """The template text of `rounds` and the character spans that are supervised.

        With `has_image` the text holds `IMAGE_PLACEHOLDER` once, where the family puts the image.
        """

    def prompt(self, question: str, has_image: bool) -> str:
        """A one-question prompt in the training template, ending where the model's answer starts."""
        text, spans = self.render([(question, "")], has_image)
        return text[:spans[-1][0]]

    @abstractmethod
    def image_inputs(self, image: Image.Image | None, aspect: AspectRatio) -> dict[str, torch.Tensor]:
        """One sample's image tensors by the name its model's forward takes them (the family's blank ones for None).

        Every sample of a family returns the same names and shapes, so that a micro-batch stacks them.
        """


def stack_inputs(per_sample: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-sample image tensors -> one (B, ...) tensor per name (the family's model inputs of a micro-batch)."""
    if not per_sample:
        return {}
    return {name: torch.stack([inputs[name] for inputs in per_sample]) for name in per_sample[0]}


__all__ = ["IMAGE_PLACEHOLDER", "AspectRatio", "Processor", "Rounds", "stack_inputs"]

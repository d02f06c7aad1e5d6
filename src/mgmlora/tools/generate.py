"""Batched generation with the training prompts; the code is mgmlora.models.generation's (validation uses it too)."""

from mgmlora.models.generation import END_OF_TURN, GenerationArgs, generate_batch, left_pad, stop_token_ids

__all__ = ["END_OF_TURN", "GenerationArgs", "generate_batch", "left_pad", "stop_token_ids"]

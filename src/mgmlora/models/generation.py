"""Batched generation with the training prompts: left padding, KV cache, stopping on the model's end-of-turn tokens.

Prompts come from the same builders as training (`PersonaEncoder.generation_prompt` for Chameleons, the chat template
for chat data, `llava.generation_prompt` + the family's `Processor.image_inputs` for MGM), so the model is asked
exactly what it was trained on, which the original Chameleons inference script did not do
(docs/design/chameleons.md). Sampling settings are plain `transformers.generate` arguments; `seed` makes sampled
outputs reproducible for a given batch composition.

It lives with the models, below training, because validation generates too (mgmlora.training.generation_eval) and
training may not import tools; `LoadedModel.generate` is the family-neutral entry point.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import nn

from mgmlora.errors import SettingsError

# End-of-turn markers of the chat templates mgmlora trains with (Qwen's, Gemma's); generation stops at any of them.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|endoftext|>")
T = TypeVar("T")


@dataclass
class GenerationArgs:
    """Sampling settings (transformers.generate's names).

    Attributes:
        max_new_tokens: longest reply in tokens.
        do_sample: sample (true) or greedy decoding (false; temperature/top_p/top_k are then ignored).
        temperature: softmax temperature when sampling.
        top_p: nucleus sampling mass.
        top_k: keep the k most likely tokens (0 disables).
        repetition_penalty: >1 discourages repeats.
        num_return_sequences: replies per prompt.
        seed: torch seed set before each batch.
        batch_size: prompts per generate call (each expands to num_return_sequences rows).
    """

    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        counts = {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                  "num_return_sequences": self.num_return_sequences}
        bad = {k: v for k, v in counts.items() if v < 1}
        if bad:
            raise SettingsError(f"generation settings {bad} must be >= 1.")
        if self.top_k < 0 or not self.temperature > 0 or not 0 < self.top_p <= 1 or not self.repetition_penalty > 0:
            raise SettingsError(f"generation settings out of range (top_k={self.top_k} must be >= 0, temperature="
                                f"{self.temperature} > 0, top_p={self.top_p} in (0, 1], repetition_penalty="
                                f"{self.repetition_penalty} > 0).")
        if not self.do_sample and self.num_return_sequences > 1:
            raise SettingsError(f"greedy decoding (do_sample false) gives one reply per prompt, not "
                                f"{self.num_return_sequences}: set do_sample true for several replies (or ask for 1).")

    def kwargs(self) -> dict:
        """Keyword arguments for `generate`."""
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
              "num_return_sequences": self.num_return_sequences, "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kw


def seeded_batches(items: Sequence[T], args: GenerationArgs) -> Iterator[tuple[Sequence[T], GenerationArgs]]:
    """`items` in generate calls of `args.batch_size`, each with the seed `args.seed` + its first item's offset.

    Every caller that generates for a list of items (validation, scoring, the leaderboard) batches and seeds this way,
    so the same items and settings give the same replies whichever of them asks.
    """
    for start in range(0, len(items), args.batch_size):
        yield items[start:start + args.batch_size], replace(args, seed=args.seed + start)


def stop_token_ids(tokenizer) -> list[int]:
    """The eos id and every end-of-turn token the tokenizer knows."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left so every prompt ends where generation starts."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, longest - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[b, longest - len(row):] = 1
    return ids, mask


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer, rows: list[list[int]], args: GenerationArgs,
                   model_inputs: dict[str, torch.Tensor] | None = None) -> list[list[str]]:
    """Generates `num_return_sequences` replies for each prompt (token id lists); returns decoded texts per prompt.

    `model_inputs` are the family's tensors beyond the prompt ids, each (B, ...) (MGM: `images`, `images_aux`); a
    model that takes them generates from its own input embeddings and returns the new tokens only (MGM's `generate`).
    Special tokens are removed from the decoded text; generation stops at eos or an end-of-turn token.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad(rows, pad_id)
    torch.manual_seed(args.seed)
    kw = dict(args.kwargs(), eos_token_id=stop_token_ids(tokenizer), pad_token_id=pad_id)
    if model_inputs:  # MGM: returns only the new tokens (it generates from input embeddings)
        extra = {name: value.to(device, _dtype(model)) for name, value in model_inputs.items()}
        new = model.generate(ids.to(device), mask.to(device), **extra, **kw)
    else:  # the training config turns the KV cache off (use_cache=False); generation wants it on
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, **kw)
        new = out[:, ids.shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    n = args.num_return_sequences
    return [[t.strip() for t in texts[i * n:(i + 1) * n]] for i in range(len(rows))]


def _dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())

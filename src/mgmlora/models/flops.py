"""FLOPs of one LoRA training step: what the math needs (MFU) and what the hardware runs (HFU).

Model FLOPs count what one optimizer step of LoRA over a frozen base needs, whatever the implementation:
- each frozen weight of the language model: its forward and the gradient with respect to its input (no weight
  gradient: it is frozen), 2 + 2 FLOPs per weight and position; MoE experts count `top_k / num_experts` of their size,
  the share each position runs;
- each LoRA weight: forward, input gradient and weight gradient, 6 FLOPs per weight and position (experts likewise
  scaled);
- the LM head only where a loss is taken (supervised positions), forward and input gradient;
- attention scores and their weighted sum (QK^T and AV) per sample, causal (each position attends to itself and
  the positions before it, never across packed samples): forward, and a backward of twice the forward;
- a multimodal model's frozen image encoding, forward only (measured once with `measure_forward_flops`).
Hardware FLOPs add what gradient checkpointing recomputes: the decoder's forward once more, less the frozen expert
GEMMs whose outputs the forward keeps (`speed.keep_expert_outputs`, mgmlora.models.recompute), and less the attention
kernel where its output is kept (`speed.keep_attention_outputs`). Compiled layers
that hold their own checkpoint (transformers releases after 5.17) recompute less: the compiler skips what the
backward does not read, such as the experts' down projection, which this count includes. Element-wise work (norms,
activations, softmax, rotary) is in neither count, as is usual for MFU.

`measure_forward_flops` (PyTorch's `FlopCounterMode`) counts the matrix products a callable runs: the tests check
the formula here against it on tiny models, so the two are independent derivations of the same number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from mgmlora.models.causal_lm import head_dim
from mgmlora.models.recompute import KeptOutputs


@dataclass(frozen=True)
class StepFlops:
    """The FLOPs of one step: `model` (MFU's numerator) and `hardware` (HFU's: recompute included)."""

    model: float
    hardware: float


@dataclass(frozen=True)
class FlopModel:
    """The per-position and per-sample costs of one language model with its LoRA adapter.

    Attributes:
        frozen: frozen decoder parameters one position runs through (experts scaled by top_k / num_experts; neither
            the embedding table nor the LM head).
        lora: LoRA parameters one position runs through (expert LoRA scaled alike).
        head: parameters of the LM head (hidden x vocabulary).
        attention: layers x query heads x head dimension: the cost factor of QK^T and AV.
        image: forward FLOPs of encoding one image (frozen towers and projector), 0 for text models.
        gate_up, down: the part of `frozen` in fused MoE experts' gate/up and down projections (what the recompute
            skips when their outputs are kept).
    """

    frozen: int
    lora: int
    head: int
    attention: int
    image: float = 0.0
    gate_up: int = 0
    down: int = 0

    @classmethod
    def of(cls, language_model: nn.Module, image_flops: float = 0.0) -> FlopModel:
        """Counts the costs of an (adapted) causal language model from its parameters and config."""
        cfg = language_model.config.get_text_config()
        k, e = getattr(cfg, "num_experts_per_tok", 1), getattr(cfg, "num_experts", 1) or 1
        frozen = lora = 0.0
        experts = {"gate_up_proj": 0.0, "down_proj": 0.0}  # fused expert weights by projection
        head = language_model.get_output_embeddings()
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        embed_ids = {id(p) for p in language_model.get_input_embeddings().parameters()}
        seen: set[int] = set()
        for module_name, module in language_model.named_modules():
            for param_name, p in module.named_parameters(recurse=False):
                name = f"{module_name}.{param_name}"
                if id(p) in seen or id(p) in head_ids or id(p) in embed_ids and "lora_" not in name:
                    continue
                seen.add(id(p))
                if isinstance(module, nn.Linear) and param_name == "weight":
                    size = module.in_features * module.out_features  # quantised layers store the codes flat
                elif p.ndim >= 2:
                    size = p.numel()
                else:  # norms and biases: element-wise work
                    continue
                share = k / e if ".experts." in name else 1.0
                if "lora_" in name:
                    lora += size * share
                else:
                    frozen += size * share
                    if share != 1.0 and p.ndim == 3 and param_name in experts:
                        experts[param_name] += size * share
        return cls(frozen=int(frozen), lora=int(lora), head=cfg.hidden_size * cfg.vocab_size,
                   attention=cfg.num_hidden_layers * cfg.num_attention_heads * head_dim(cfg), image=image_flops,
                   gate_up=int(experts["gate_up_proj"]), down=int(experts["down_proj"]))

    def attention_forward(self, lengths: Sequence[int], causal: bool = True) -> float:
        """QK^T and AV of every sample, forward: 2 products x 2 FLOPs per multiply-add per attended pair."""
        pairs = sum(n * (n + 1) / 2 if causal else n * n for n in lengths)
        return 4.0 * self.attention * pairs

    def step(self, lengths: Sequence[int], supervised: int, images: int = 0, recompute: bool = True,
             kept: KeptOutputs = "none", kept_attention: bool = False) -> StepFlops:
        """The FLOPs of one step over samples of `lengths` positions with `supervised` loss positions in all.

        Args:
            lengths: positions per sample, as the decoder runs them (image embeddings included).
            supervised: positions whose next token is scored (the LM head runs there).
            images: images encoded in the step.
            recompute: whether gradient checkpointing recomputes the decoder's forward (hardware FLOPs only).
            kept: which frozen expert GEMMs the recompute skips (`speed.keep_expert_outputs`).
            kept_attention: whether the recompute skips the attention kernel (`speed.keep_attention_outputs`).
        """
        positions = sum(lengths)
        skipped = {"none": 0, "gate_up": self.gate_up, "all": self.gate_up + self.down}[kept]
        attention = 0.0 if kept_attention else self.attention_forward(lengths)
        decoder_forward = 2.0 * (self.frozen - skipped + self.lora) * positions + attention
        model = (4.0 * self.frozen + 6.0 * self.lora) * positions + 3 * self.attention_forward(lengths) \
            + 4.0 * self.head * supervised + self.image * images
        return StepFlops(model=model, hardware=model + (decoder_forward if recompute else 0.0))


def measure_forward_flops(fn: Callable[[], object]) -> float:
    """The matrix-product FLOPs `fn()` runs (PyTorch's FlopCounterMode: matmuls, convolutions, attention kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())

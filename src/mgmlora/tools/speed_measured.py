"""Measured training speed per (model, setting): the figures `mgmlora.tools.speed_plan` ranks settings by.

Each row is one committed measurement under `bench/results/` (one H200, random init at real shapes), named beside it
with the variant inside the file where the file holds several; tests/tools/test_speed_measured.py reads each file
and checks the row's figures against it. A row describes a setting by what changes the step's work and memory: the
model preset, a 4-bit or bf16 base, what the LLM trains (`lora`, `frozen`, `full`), expert LoRA, the loss, gradient
checkpointing, samples per micro-batch and the row length (`max_length`, the longest sample). It does not record the
LoRA rank or targets beyond expert LoRA, compile, fused AdamW, packing or the GPU count: a row stands for every
config that matches it on the fields it records.

Rows of one model may come from different runs (an isolated step in `bench/train_step.py`, or the real `fit` loop
through `bench/fit_smoke.py`): the figure is the file's own tokens/s, so rows from the same run compare best.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mgmlora.models.args import ModelArgs
from mgmlora.training.lora import LoraArgs
from mgmlora.training.loss import SpeedArgs
from mgmlora.training.trainable import Trainability


@dataclass(frozen=True)
class Measured:
    """One measured setting: its key fields, tokens/s, peak allocated GiB, and where the figures come from."""

    model: str  # registry preset
    quantized: bool  # 4-bit NF4 base (model.model.quantization)
    llm: Literal["lora", "frozen", "full"]
    target_experts: bool
    loss: Literal["full", "chunked", "liger"]
    gradient_checkpointing: bool
    batch_size: int  # samples per micro-batch
    max_length: int
    tokens_per_s: float
    peak_gib: float  # torch.cuda.max_memory_allocated
    source: str  # file under bench/results/
    variant: str | None = None  # the variant inside `source` (bench/train_step.py); None: the file's own figures
    recipe: str | None = None  # the shipped config the run launched, where it launched one

    def cite(self) -> str:
        """The file, and the variant inside it, the figures come from."""
        return f"bench/results/{self.source}" + (f" [{self.variant}]" if self.variant else "")


_MGM_BUDGET = "2026-11-30-train_step_budget-mgm2b-h200.json"  # 2048-position rows, compile, fused AdamW
_QWEN_BUDGET = "2026-11-30-train_step_budget_fastexperts-qwen3-30b-a3b-h200.json"  # Chameleons lengths <= 1024

MEASURED: tuple[Measured, ...] = (
    Measured("mgm-2b", False, "lora", False, "chunked", True, 1, 2048, 14156.3, 11.35, _MGM_BUDGET,
             "chunked+nocast+fused+compile"),
    Measured("mgm-2b", False, "lora", False, "chunked", False, 1, 2048, 19875.3, 15.50, _MGM_BUDGET,
             "chunked+nocast+fused+compile+nockpt"),
    Measured("mgm-2b", False, "lora", False, "chunked", False, 2, 2048, 25861.5, 23.71, _MGM_BUDGET,
             "chunked+packing+nocast+fused+compile+nockptx2"),
    Measured("mgm-2b", False, "lora", False, "chunked", True, 8, 2048, 24641.9, 26.98, _MGM_BUDGET,
             "chunked+packing+nocast+fused+compilex8"),
    Measured("mgm-2b", False, "lora", False, "liger", False, 2, 2048, 23097.0, 18.44, _MGM_BUDGET,
             "liger+packing+nocast+fused+compile+nockptx2"),
    Measured("mgm-2b", False, "lora", False, "liger", False, 3, 2048, 24426.2, 24.62, _MGM_BUDGET,
             "liger+packing+nocast+fused+compile+nockptx3"),
    Measured("mgm-2b", False, "lora", False, "liger", True, 8, 2048, 26308.5, 26.98, _MGM_BUDGET,
             "liger+packing+nocast+fused+compilex8"),
    Measured("mgm-2b", True, "lora", False, "liger", True, 1, 2048, 3608.5, 5.94,
             "2026-11-30-mgm2b_qlora_8gib-h200.json", recipe="configs/mgm2b_qlora.yaml"),
    Measured("mgm-2b", False, "frozen", False, "chunked", True, 4, 2048, 13898.8, 15.41,
             "2026-11-23-mgm2b_stage1_zero2-h200.json", recipe="configs/mgm2b_stage1.yaml"),
    Measured("qwen3-30b-a3b", False, "lora", False, "liger", True, 8, 1024, 6430.5, 60.13, _QWEN_BUDGET,
             "liger+packing+nocast+fused+fastexpertsx8"),
    Measured("qwen3-30b-a3b", False, "lora", False, "liger", True, 48, 1024, 10669.6, 70.26, _QWEN_BUDGET,
             "liger+packing+nocast+fused+fastexpertsx48"),
    Measured("qwen3-30b-a3b", False, "lora", False, "liger", True, 64, 1024, 16933.4, 72.05,
             "2026-12-04-qwen3-30b-a3b_lora_chameleons_1gpu_x64_compile-h200.json",
             recipe="configs/qwen3-30b-a3b_lora_chameleons.yaml"),
    Measured("qwen3-30b-a3b", True, "lora", False, "liger", True, 8, 1024, 4672.0, 19.82,
             "2026-11-30-qwen3-30b-a3b_qlora_chameleons_24gib-h200.json",
             recipe="configs/qwen3-30b-a3b_qlora_chameleons.yaml"),
    Measured("qwen3-8b", False, "lora", False, "chunked", True, 2, 1024, 1979.6, 19.34,
             "2026-11-23-qwen3-8b_lora_chameleons_1gpu-h200.json", recipe="configs/qwen3-8b_lora_chameleons.yaml"),
)


def lookup(model_args: ModelArgs, lora: LoraArgs, trainable: Trainability, speed: SpeedArgs, batch_size: int,
           max_length: int) -> Measured | None:
    """The measured row for this setting, or None when it was not measured."""
    key = (model_args.preset, model_args.quantization is not None, trainable.llm, bool(lora.target_experts),
           speed.loss, model_args.gradient_checkpointing, batch_size, max_length)
    for row in MEASURED:
        if (row.model, row.quantized, row.llm, row.target_experts, row.loss, row.gradient_checkpointing,
                row.batch_size, row.max_length) == key:
            return row
    return None


def shipped_4bit_recipe(preset: str | None) -> str | None:
    """The shipped config that trains `preset` on a 4-bit base, where one was measured."""
    return next((row.recipe for row in MEASURED if row.model == preset and row.quantized and row.recipe), None)

"""The fastest setting that fits a memory budget: base (bf16 or 4-bit), gradient checkpointing, samples per micro-batch.

`bin/estimate.py --gpu_memory_gib N` prints it. The ranking rests on measurements, not on a model of the GPU:

- Candidates: checkpointing off and on (a 4-bit mixture-of-experts base, PEFT's expert LoRA on an FP8 one, and a
  config that keeps expert or attention outputs (`speed.keep_expert_outputs`, `speed.keep_attention_outputs`) train
  with checkpointing only), and every micro-batch
  that divides the run's samples per GPU per optimizer step (`data.batch_size` x `accumulate_grad_batches`), so the
  global batch and the GPU count stay as the user gave them. The base is the config's; when the bf16 base does not fit
  at one sample with checkpointing, the 4-bit NF4 base (QLoRA, no DeepSpeed) joins the candidates on the same GPUs.
- Fit: a setting fits when its memory estimate (mgmlora.tools.memory) and, where it was measured, its measured peak
  stay `HEADROOM_GIB` below the budget (the CUDA context and the allocator's fragmentation are not in
  `torch.cuda.max_memory_allocated`): `mgmlora.tools.memory.within_budget`, the estimate's own verdict's rule.
- A config that spreads a fixed number of samples per step over balanced micro-batches (`data.window_samples`)
  keeps that setting first: its figure is a real `fit` loop at real lengths (a `MEASURED` row with
  `window_samples`), which no isolated-step figure of a fixed micro-batch compares with. The fixed micro-batches
  follow, ranked as below, on the same samples per step.
- Rank: measured settings first, fastest first by their measured tokens/s (`MEASURED` below names the result file
  of each); then the config's own setting if it was not measured (no measurement says another is faster); then, for
  each base and checkpointing choice, the largest fitting micro-batch that was not measured, without checkpointing
  before with it (it recomputes each layer's forward). Ties go to the smaller estimate.

`MEASURED`: each row is one committed measurement under `bench/results/` (one H200, or one H100 where its file name says
so; random init at real shapes), named beside it with the variant inside the file where the file holds several;
tests/tools/test_speed_plan.py reads each file and checks the row's figures against it. A row describes a setting by
what changes the step's work and memory: the model preset, the base (bf16, or NF4 or FP8: `quant_type`), what the LLM
trains (`lora`, `frozen`, `full`), expert LoRA, the loss, gradient checkpointing and the expert and attention outputs it
keeps, samples per micro-batch and the row length (`max_length`, the longest sample). It does not record the LoRA rank
or targets beyond expert LoRA, LoRA dropout, compile, fused AdamW, packing or the GPU count: a row stands for every
config that matches it on the fields it records. bench/train_step.py's rows ran at LoRA dropout 0, while the recipes
train with 0.05 or 0.1, which costs time and memory such a row does not show (configs/README.md measures it on the FP8
Chameleons overlay's loop; the memory estimate counts it under checkpointing). Rows of one model may come from
different runs (an isolated step in `bench/train_step.py`, or the real `fit` loop through `bench/fit_smoke.py`): the
figure is the file's own tokens/s, so rows from the same run compare best.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from mgmlora.models.args import ModelArgs
from mgmlora.models.quantization import QuantizationArgs
from mgmlora.models.recompute import KeptOutputs
from mgmlora.tools.memory import RunShape, checkpointing_refusal, estimate, within_budget
from mgmlora.training.lora import LoraArgs
from mgmlora.training.loss import SpeedArgs
from mgmlora.training.trainable import Trainability


@dataclass(frozen=True)
class Measured:
    """One measured setting: its key fields, tokens/s, peak allocated GiB, and where the figures come from."""

    model: str  # registry preset
    quantized: bool  # a quantized base (model.model.quantization): NF4 unless `quant_type` says FP8
    trainable_llm: Literal["lora", "frozen", "full"]  # what the LLM trains (Trainability)
    target_experts: bool
    loss: Literal["full", "chunked", "compiled", "liger"]
    gradient_checkpointing: bool
    batch_size: int  # samples per micro-batch
    max_length: int
    tokens_per_s: float
    peak_gib: float  # torch.cuda.max_memory_allocated
    source: str  # file under bench/results/
    variant: str | None = None  # the variant inside `source` (bench/train_step.py); None: the file's own figures
    recipe: str | None = None  # the shipped config the run launched, where it launched one
    window_samples: int | None = None  # data.window_samples of the run (`batch_size` is then the micro-batches)
    loss_chunk_size: int | None = None  # speed.loss_chunk_size where the row depends on it; None: any
    keep_expert_outputs: KeptOutputs = "none"  # speed.keep_expert_outputs: what the recompute skips
    keep_attention_outputs: bool = False  # speed.keep_attention_outputs
    quant_type: Literal["nf4", "fp8"] = "nf4"  # the quantized base's format (model.model.quantization.quant_type)

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
    # the fit loop at real lengths (576 image + 100-1500 text positions): 128 samples per step over 56 micro-batches,
    # the packed overlay's settings until 394c9b7 (Liger's loss; only the decoder layers compiled) given as overrides
    # of configs/mgm2b_lora.yaml
    Measured("mgm-2b", False, "lora", False, "liger", False, 56, 2048, 17336.7, 22.07,
             "2026-12-04-mgm2b_lora_recipe_loop_24gib_window128_acc56_liger-h200.json", window_samples=128),
    # the same with the image path compiled (speed.compile) and the chunked loss in 1,024-position chunks: the
    # shipped configs/mgm2b_lora_packed.yaml
    Measured("mgm-2b", False, "lora", False, "chunked", False, 56, 2048, 21655.6, 22.64,
             "2026-12-04-mgm2b_lora_recipe_loop_24gib_window128_acc56_chunked1024_imagecompile-h200.json",
             window_samples=128, loss_chunk_size=1024, recipe="configs/mgm2b_lora_packed.yaml"),
    # the same overlay on the FP8 base in 48 micro-batches, given as overrides: what configs/mgm2b_lora_packed_fp8.yaml
    # writes (the run's 6,144-position cap only checked: its largest micro-batch held 4,444,
    # 2026-12-06-mgm2b_packed_largest_micro_batch-cpu.json); the slower of its two rounds
    # (2026-12-06-mgm2b_lora_packed_fp8_loop_acc48_rounds-h200.json)
    Measured("mgm-2b", True, "lora", False, "chunked", False, 48, 2048, 26042.0, 22.28,
             "2026-12-06-mgm2b_lora_packed_fp8_loop_24gib_acc48_round2-h200.json", window_samples=128,
             loss_chunk_size=1024, quant_type="fp8"),
    # that overlay as shipped since session 44, with the compiled chunk loss (speed.loss: compiled): the slower of the
    # two rounds interleaved with two of the row above's settings on one H200
    # (2026-12-06-mgm2b_lora_packed_fp8_{compiled,chunked}_loss_loop{,_b}-h200.json)
    Measured("mgm-2b", True, "lora", False, "compiled", False, 48, 2048, 28813.2, 20.41,
             "2026-12-06-mgm2b_lora_packed_fp8_compiled_loss_loop-h200.json", window_samples=128,
             loss_chunk_size=1024, quant_type="fp8", recipe="configs/mgm2b_lora_packed_fp8.yaml"),
    Measured("qwen3-30b-a3b", False, "lora", False, "liger", True, 8, 1024, 6430.5, 60.13, _QWEN_BUDGET,
             "liger+packing+nocast+fused+fastexpertsx8"),
    Measured("qwen3-30b-a3b", False, "lora", False, "liger", True, 48, 1024, 10669.6, 70.26, _QWEN_BUDGET,
             "liger+packing+nocast+fused+fastexpertsx48"),
    Measured("qwen3-30b-a3b", False, "lora", False, "liger", True, 64, 1024, 16933.4, 72.05,
             "2026-12-04-qwen3-30b-a3b_lora_chameleons_1gpu_x64_compile-h200.json",
             recipe="configs/qwen3-30b-a3b_lora_chameleons.yaml"),
    # the same on the FP8 base, one GPU without DeepSpeed, given as overrides: what
    # configs/qwen3-30b-a3b_lora_chameleons_fp8.yaml writes, less its kept attention outputs (H100)
    Measured("qwen3-30b-a3b", True, "lora", False, "liger", True, 64, 1024, 17392.2, 42.95,
             "2026-12-06-qwen3-30b-a3b_lora_chameleons_1gpu_x64_compile_fp8-h100.json", quant_type="fp8"),
    # the same keeping the attention kernel's outputs: the shipped overlay (H100)
    Measured("qwen3-30b-a3b", True, "lora", False, "liger", True, 64, 1024, 17854.3, 56.38,
             "2026-12-06-qwen3-30b-a3b_lora_chameleons_1gpu_x64_compile_fp8_keepattn-h100.json",
             recipe="configs/qwen3-30b-a3b_lora_chameleons_fp8.yaml", keep_attention_outputs=True, quant_type="fp8"),
    Measured("qwen3-30b-a3b", True, "lora", False, "liger", True, 8, 1024, 4672.0, 19.82,
             "2026-11-30-qwen3-30b-a3b_qlora_chameleons_24gib-h200.json",
             recipe="configs/qwen3-30b-a3b_qlora_chameleons.yaml"),
    Measured("qwen3-8b", False, "lora", False, "chunked", True, 2, 1024, 1979.6, 19.34,
             "2026-11-23-qwen3-8b_lora_chameleons_1gpu-h200.json", recipe="configs/qwen3-8b_lora_chameleons.yaml"),
)


def lookup(model_args: ModelArgs, lora: LoraArgs, trainable: Trainability, speed: SpeedArgs, batch_size: int,
           max_length: int, window_samples: int | None = None) -> Measured | None:
    """The measured row for this setting, or None when it was not measured.

    `batch_size` is the samples per micro-batch, or with `window_samples` the micro-batches per window.
    """
    quant = model_args.quantization
    key = (model_args.preset, "dtype" if quant is None else quant.quant_type, trainable.llm, bool(lora.target_experts),
           speed.loss, model_args.gradient_checkpointing, batch_size, max_length, window_samples)
    for row in MEASURED:
        base = row.quant_type if row.quantized else "dtype"
        if (row.model, base, row.trainable_llm, row.target_experts, row.loss, row.gradient_checkpointing,
                row.batch_size, row.max_length, row.window_samples) == key and (
                row.loss_chunk_size in (None, speed.loss_chunk_size)) and \
                row.keep_expert_outputs == speed.keep_expert_outputs and \
                row.keep_attention_outputs == speed.keep_attention_outputs:
            return row
    return None


def shipped_4bit_recipe(preset: str | None) -> str | None:
    """The shipped config that trains `preset` on a 4-bit base, where one was measured."""
    return next((row.recipe for row in MEASURED if row.model == preset and row.quantized and row.quant_type == "nf4"
                 and row.recipe), None)


@dataclass
class Setting:
    """One candidate: base, checkpointing, micro-batch, its estimated (and measured) peak, and its speed's source."""

    quantized: bool
    gradient_checkpointing: bool
    batch_size: int
    accumulate: int  # accumulate_grad_batches that keeps the samples per GPU per optimizer step
    total_gib: float  # the memory estimate
    measured_gib: float | None
    tokens_per_s: float | None  # measured; None when not measured
    source: str  # where the rank comes from
    base_change: str = ""  # the change to the config's base, when the setting has another one
    window_samples: int | None = None  # data.window_samples spread over `accumulate` balanced micro-batches

    def keys(self) -> tuple[bool, bool, int]:
        """The setting itself: 4-bit base, checkpointing, samples per micro-batch."""
        return self.quantized, self.gradient_checkpointing, self.batch_size

    def describe(self) -> str:
        """The config keys to set, the peak, and where the rank comes from."""
        base = f"{self.base_change}, " if self.base_change else ""
        peak = f"{self.total_gib:.2f} GiB estimated" + (
            f", {self.measured_gib:.2f} GiB measured" if self.measured_gib is not None else "")
        speed = (f"{self.tokens_per_s:,.0f} tokens/s measured ({self.source})" if self.tokens_per_s is not None
                 else f"not measured: {self.source}")
        batches = (f"data.window_samples {self.window_samples} over accumulate_grad_batches {self.accumulate} "
                   "balanced micro-batches" if self.window_samples else
                   f"data.batch_size {self.batch_size} x accumulate_grad_batches {self.accumulate}")
        return (f"{base}model.model.gradient_checkpointing {str(self.gradient_checkpointing).lower()}, "
                f"{batches}: {peak}; {speed}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(model_args: ModelArgs, lora: LoraArgs, trainable: Trainability, speed: SpeedArgs, shape: RunShape,
               budget_gib: float) -> list[Setting]:
    """Every kept setting that fits `budget_gib`, in the order of the module docstring (best first)."""
    windowed = _window_setting(model_args, lora, trainable, speed, shape, budget_gib)
    per_gpu = shape.window_samples or shape.batch_size * max(shape.accumulate, 1)
    own = (model_args.quantization is not None, model_args.gradient_checkpointing, shape.batch_size)
    if shape.window_samples is not None:
        own = (None, None, None)  # the config's own setting is the window (listed first when it fits)
        shape = replace(shape, window_samples=None)
    bases = [(model_args, shape, "")]
    smallest = estimate(replace(model_args, gradient_checkpointing=True), lora, trainable, speed,
                        replace(shape, batch_size=1))
    # the bf16 base fits no setting: the 4-bit base, which trains the language model through LoRA only
    if model_args.quantization is None and trainable.llm == "lora" and not smallest.fits(budget_gib):
        shipped = shipped_4bit_recipe(model_args.preset)
        change = ("4-bit NF4 base (model.model.quantization, trainer.strategy auto"
                  + (f"; shipped as {shipped})" if shipped else ")"))
        four_bit = replace(model_args, quantization=QuantizationArgs())
        bases.append((four_bit, replace(shape, zero_stage=0, offload_optimizer=False, offload_parameters=False),
                      change))
    measured: list[Setting] = []
    rule: list[Setting] = []
    for base, base_shape, change in bases:
        quantized = base.quantization is not None
        # kept expert or attention outputs choose what checkpointing recomputes: training refuses them without it
        only_ckpt = checkpointing_refusal(base, lora, speed) or speed.keep_expert_outputs != "none" or \
            speed.keep_attention_outputs
        for ckpt in (True,) if only_ckpt else (False, True):
            args = replace(base, gradient_checkpointing=ckpt)
            fitting: list[Setting] = []
            for batch in _divisors(per_gpu):
                total = estimate(args, lora, trainable, speed, replace(base_shape, batch_size=batch)).total_gib
                row = lookup(args, lora, trainable, speed, batch, shape.seq_len)
                if not within_budget(max(total, row.peak_gib if row else 0.0), budget_gib):
                    break  # memory grows with the micro-batch: no larger one fits either
                fitting.append(_setting(quantized, ckpt, batch, per_gpu // batch, total, row, change,
                                        own=(quantized, ckpt, batch) == own))
            measured += [s for s in fitting if s.tokens_per_s is not None]
            rule += [s for s in fitting if s.tokens_per_s is None and s.keys() == own]
            if fitting and fitting[-1].tokens_per_s is None and fitting[-1].keys() != own:
                rule.append(fitting[-1])
    measured.sort(key=lambda s: (-s.tokens_per_s, s.total_gib))
    rule.sort(key=lambda s: (s.keys() != own, s.gradient_checkpointing, -s.batch_size, s.total_gib))
    return windowed + measured + rule


def _window_setting(model_args: ModelArgs, lora: LoraArgs, trainable: Trainability, speed: SpeedArgs,
                    shape: RunShape, budget_gib: float) -> list[Setting]:
    """The config's window setting (data.window_samples), when it has one and it fits; else nothing."""
    if shape.window_samples is None or checkpointing_refusal(model_args, lora, speed) and \
            not model_args.gradient_checkpointing:
        return []  # training refuses it
    total = estimate(model_args, lora, trainable, speed, shape).total_gib
    row = lookup(model_args, lora, trainable, speed, shape.accumulate, shape.seq_len, shape.window_samples)
    if not within_budget(max(total, row.peak_gib if row else 0.0), budget_gib):
        return []
    source = (row.cite() if row else "the config as written (nothing measured compares with a window of balanced "
              "micro-batches)")
    return [Setting(model_args.quantization is not None, model_args.gradient_checkpointing, shape.batch_size,
                    shape.accumulate, total, row.peak_gib if row else None, row.tokens_per_s if row else None, source,
                    window_samples=shape.window_samples)]


def _setting(quantized: bool, ckpt: bool, batch: int, accumulate: int, total: float, row: Measured | None,
             change: str, own: bool) -> Setting:
    if row is not None:
        source = row.cite()
    elif own:
        source = "the config as written (nothing measured says another setting is faster)"
    else:
        source = ("rule: the largest micro-batch that fits, without checkpointing before with it"
                  + ("; 4-bit base because the bf16 base does not fit" if change else ""))
    return Setting(quantized, ckpt, batch, accumulate, total, row.peak_gib if row else None,
                   row.tokens_per_s if row else None, source, change)

"""Peak GPU memory per device, estimated from a config before any weight is loaded.

The model is built on PyTorch's meta device (shapes and dtypes, no storage), LoRA and trainability are applied exactly
as in training, and each block of memory is computed from the parameter counts and the run's settings:

- frozen weights (vision towers on their own line) in the model dtype; divided by the data-parallel size under ZeRO-3,
  gone from the GPU with parameter offload. With `model.quantization` the decoder linears and fused experts count at
  NF4's 4.13 (double quantisation) or 4.5 bits per weight, plus one layer's weights dequantised to the compute dtype
  (one layer's experts, x3 with expert LoRA through PEFT: weight + delta and its gradient); or at FP8's 8 bits plus a
  4-byte scale per row, plus one layer's dequantised experts as for NF4, or with `expert_products: fp8` the one
  layer's expert codes the backward reads transposed (one byte each) unless PEFT's expert LoRA joins the weight;
- trainable weights, gradients and AdamW states. Plain Lightning (bf16-mixed) keeps LoRA adapters in fp32 and fully
  trained weights in the model dtype, with two AdamW states of the same dtype. DeepSpeed casts the module to bf16 and
  keeps an fp32 master copy plus two fp32 states per trainable parameter (12 bytes, partitioned over ranks from ZeRO-1
  on, on the CPU with optimizer offload), bf16 gradients (partitioned from ZeRO-2 on) and a reduce bucket;
- activations: with gradient checkpointing the input of every decoder layer (in the weights' dtype) plus one layer's
  recomputed internals, counted at half (an empirical factor, see `RECOMPUTE_LIVE`), and for an MoE model a fitted
  allowance per routed row (`MOE_BACKWARD_ROWS`), plus with `speed.keep_expert_outputs`
  every MoE layer's kept expert GEMM outputs (top_k rows per token), and with
  `speed.keep_attention_outputs` every layer's attention output and log-sum-exp, plus with LoRA dropout each
  adapter's dropped copy of its input and its mask in the recomputed layer; without checkpointing every layer's
  internals (per token: about 8 hidden-size and 4 MLP-width bf16 tensors; MoE layers use top_k x the expert width);
- with packing under `eager` attention, the (T, T) mask of the packed row (none for mgmlora's packed SDPA, flash-attn
  and FlexAttention);
- the LM head and loss (Gemma's 256k vocabulary makes this its own line): `full` holds bf16 logits, their fp32 copy
  and the fp32 gradient for every position; `chunked` the same for one chunk of supervised positions, and `compiled`
  as `chunked` (a bound: its fused kernels hold less, not modelled apart); `liger` almost nothing;
- a fixed allowance for CUDA workspaces and allocator rounding (GPU only).

Activations and logits are counted in the compute dtype: bf16/fp16 under mixed or half precision, the model's dtype
under `32-true` (the CPU runs). On the CPU the peak is measured with torch.profiler's allocation events
(`cpu_peak_bytes`), the counterpart of `torch.cuda.max_memory_allocated`, which bench/train_step.py reports for CPU
runs; the tests do not hold the estimate to it (`RECOMPUTE_LIVE` was set on those models, and the peak varies with the
machine's CPU kernels).

The coefficients are physics first, then checked against the committed GPU measurements they were not fitted on
(tests/tools/test_memory.py keeps the estimate within 15% of each held-out peak); the estimate is of
`torch.cuda.max_memory_allocated`, not of reserved memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from mgmlora.data.datamodule import count_refusals
from mgmlora.errors import UsageError
from mgmlora.models import build_on_meta, model_info, uses_moe
from mgmlora.models.args import ModelArgs
from mgmlora.models.causal_lm import expert_width, head_dim
from mgmlora.models.dtypes import DTYPES
from mgmlora.models.fp8 import supports as fp8_supports
from mgmlora.models.quantization import QuantizationArgs, checkpointing_required, quantized_bytes
from mgmlora.models.recompute import effective_keep, recompute_refusal
from mgmlora.models.torch_private import allocation_events
from mgmlora.training.fastpath import has_dropout, lora_layers
from mgmlora.training.lora import LoraArgs
from mgmlora.training.loss import SpeedArgs
from mgmlora.training.trainable import Trainability, apply_trainability, component_counts

GIB = 2**30
# Where each constant comes from, with the measurements behind it: docs/design/memory.md.
ACT_HIDDEN, ACT_MLP = 8, 4  # bf16 tensors per token per decoder layer kept for backward (hidden-size, MLP-width)
RECOMPUTE_LIVE = 0.5  # share of one checkpointed layer's internals counted at the backward peak (fitted)
HEADROOM_GIB = 1.0  # kept free below a budget for what max_memory_allocated does not count (CUDA context, fragments)
MOE_BACKWARD_ROWS = 2  # hidden-size values per routed row more at a checkpointed MoE layer's backward peak (fitted)
WORKSPACE_GIB = 0.35  # cuBLAS/cuDNN workspaces and allocator rounding, seen as the floor of small runs


@dataclass
class RunShape:
    """What the estimate needs from a config besides the model: batch geometry and the training strategy."""

    batch_size: int = 1
    seq_len: int = 2048
    accumulate: int = 1  # accumulate_grad_batches: no effect on memory; the speed plan keeps batch x accumulate
    window_samples: int | None = None  # data.window_samples: samples per step per GPU over `accumulate` micro-batches
    window_positions: int = 0  # positions a window's micro-batch is sized for (data.max_tokens, else the worst case)
    precision: str = "bf16-mixed"
    world_size: int = 1
    zero_stage: int = 0  # 0 = no DeepSpeed
    offload_optimizer: bool = False
    offload_parameters: bool = False
    reduce_bucket_size: float = 5e8
    device: Literal["cuda", "cpu"] = "cuda"


@dataclass
class Estimate:
    """An itemised peak-memory estimate (GiB per device) and the trainable parameters per component."""

    items: dict[str, float]
    total_gib: float
    trainable: dict[str, list[int]]
    settings: dict = field(default_factory=dict)

    def fits(self, budget_gib: float) -> bool:
        """Whether the estimate is within `budget_gib` (`within_budget`)."""
        return within_budget(self.total_gib, budget_gib)


def within_budget(gib: float, budget_gib: float) -> bool:
    """Whether `gib` of allocations (estimated or measured) stay `HEADROOM_GIB` below `budget_gib`.

    The one rule every fit judgement uses: the verdict, the largest micro-batch, the cheapest fix and the speed plan.
    """
    return gib <= budget_gib - HEADROOM_GIB


@dataclass
class _ModelFacts:
    """What the estimate reads from the (meta) model: counts per component and the text model's dimensions."""

    info: object
    counts: dict[str, tuple[int, int]]
    hidden: int
    layers: int
    vocab: int
    mlp: int  # MLP width per token (MoE: top_k x expert width)
    mining: tuple[int, int] | None  # MGM: (aux channels, CLIP hidden size)
    quantizable: int = 0  # weights quantisation stores in fewer bits: decoder linears and fused experts
    quantizable_rows: int = 0  # their output rows (FP8 keeps a scale per row)
    experts_layer: int = 0  # one decoder layer's fused expert weights (dequantised one layer at a time)
    largest_linear: int = 0  # the largest decoder linear (dequantised one matrix product at a time)
    top_k: int = 1  # experts per token (MoE)
    moe_layers: int = 0  # decoder layers with fused experts
    query_heads: int = 1  # attention query heads per layer
    head_dim: int = 0  # their dimension
    dropout_inputs: int = 0  # the most input features a decoder layer's LoRA layers with dropout take, summed


_FACTS: dict[str, _ModelFacts] = {}  # one meta build per (model, LoRA, trainability): the searches below re-estimate


def _model_facts(model_args: ModelArgs, lora: LoraArgs, trainable: Trainability) -> _ModelFacts:
    model_args = replace(model_args, gradient_checkpointing=False)  # does not change any parameter
    key = repr((model_args, lora, trainable))
    if key not in _FACTS:
        loaded = build_on_meta(model_args)  # config files only, never weights
        fp8_only = model_args.quantization is not None and model_args.quantization.quant_type == "fp8"
        linears, experts, rows = _quantizable(loaded.quantizable_modules(), fp8_only)  # before PEFT wraps them
        with torch.device("meta"):
            model, _ = apply_trainability(loaded, lora, trainable)
        dropout_inputs = max((_dropout_inputs(layer) for layer in loaded.quantizable_modules()), default=0)
        cfg = loaded.language_model().config
        top_k = getattr(cfg, "num_experts_per_tok", 1) if loaded.moe else 1
        mlp = expert_width(cfg) * top_k if loaded.moe else cfg.intermediate_size
        moe_layers = sum(any(p.ndim == 3 for p in layer.parameters()) for layer in loaded.quantizable_modules())
        _FACTS[key] = _ModelFacts(loaded.info, component_counts(model, loaded.components), cfg.hidden_size,
                                  cfg.num_hidden_layers, cfg.vocab_size, mlp, loaded.mining_dims(),
                                  sum(linears) + sum(experts), rows, max(experts, default=0), max(linears, default=0),
                                  top_k, moe_layers, cfg.num_attention_heads, head_dim(cfg), dropout_inputs)
    return _FACTS[key]


def _dropout_inputs(layer: torch.nn.Module) -> int:
    """Input features of a decoder layer's LoRA layers with dropout, summed: each multiplies its own dropped copy."""
    return sum(module.in_features for module in lora_layers(layer) if has_dropout(module))


def _quantizable(layers: torch.nn.Module, fp8_only: bool) -> tuple[list[int], list[int], int]:
    """Sizes of what `model.quantization` stores: each decoder linear, each layer's fused experts, all their rows.

    The same selection as mgmlora.models.quantization.quantize_layers: with `fp8_only` the weights whose dimensions
    the FP8 kernels cannot take stay in the model dtype (a fused experts module whole). A row is an output row, the
    last dimension of experts the model keeps transposed ((E, in, out), `is_transposed`).
    """
    fits = fp8_supports if fp8_only else (lambda shape: True)
    linears = [m.weight for m in layers.modules() if type(m) is torch.nn.Linear and fits(m.weight.shape)]
    fused = []  # per layer: (weight, output rows per expert) of each fused parameter stored quantised
    for layer in layers:
        fused.append([])
        for module in layer.modules():
            params = [p for p in module.parameters(recurse=False) if p.ndim == 3]
            if params and all(fits(p.shape) for p in params):
                out_dim = 2 if getattr(module, "is_transposed", False) else 1
                fused[-1] += [(p, p.shape[out_dim]) for p in params]
    rows = sum(w.shape[0] for w in linears) + sum(p.shape[0] * out for ps in fused for p, out in ps)
    return [w.numel() for w in linears], [sum(p.numel() for p, _ in ps) for ps in fused], rows


def checkpointing_refusal(model_args: ModelArgs, lora: LoraArgs, speed: SpeedArgs) -> str | None:
    """Why training refuses this config without gradient checkpointing, or None (`checkpointing_required`).

    From the config alone: expert LoRA counts as PEFT's path where `speed.expert_lora` says peft.
    """
    quant = model_args.quantization
    return checkpointing_required(quant and quant.quant_type, uses_moe(model_args), _peft_expert_lora(lora, speed))


def _peft_expert_lora(lora: LoraArgs, speed: SpeedArgs) -> bool:
    return bool(lora.target_experts) and speed.expert_lora == "peft"


def estimate(model_args: ModelArgs, lora: LoraArgs, trainable: Trainability, speed: SpeedArgs,
             shape: RunShape) -> Estimate:
    """The itemised estimate for one device (see the module docstring).

    Raises:
        UsageError: for a config training refuses: without gradient checkpointing (`checkpointing_refusal`), or with
            expert outputs kept where there are none to keep, or attention outputs where nothing recomputes them
            (mgmlora.models.recompute.recompute_refusal).

    A config with `data.window_samples` runs micro-batches of balanced position counts: its micro-batch is estimated
    as one packed row of `shape.window_positions` positions.
    """
    refusal = (checkpointing_refusal(model_args, lora, speed) if not model_args.gradient_checkpointing else None) or \
        recompute_refusal(speed.keep_expert_outputs, speed.keep_attention_outputs, uses_moe(model_args),
                          model_args.gradient_checkpointing, model_args.experts_implementation,
                          model_args.attn_implementation, _peft_expert_lora(lora, speed))
    if refusal:
        raise UsageError(refusal)  # training refuses it: no figure for a run that cannot start
    if shape.window_samples is not None:
        shape = replace(shape, batch_size=1, seq_len=shape.window_positions, window_samples=None)
    facts = _model_facts(model_args, lora, trainable)
    info = facts.info
    dtype_bytes = torch.finfo(DTYPES[model_args.dtype]).bits // 8
    half = shape.precision.startswith(("bf16", "16"))  # mixed or half precision, DeepSpeed's bf16 too
    act_bytes = 2 if half else dtype_bytes  # activations and logits in the compute dtype
    deepspeed = shape.zero_stage > 0
    # the residual stream (what checkpointing keeps per layer) stays in the weights' dtype under autocast: fp32
    # weights with bf16-mixed keep fp32 layer inputs; DeepSpeed casts the module itself to bf16
    resid_bytes = act_bytes if deepspeed or dtype_bytes < 4 else dtype_bytes
    w = max(shape.world_size, 1)

    lora_params = facts.counts.get("lora adapters", (0, 0))[0]
    n_train = sum(t for t, _ in facts.counts.values())
    full_params = n_train - lora_params
    towers = facts.counts.get("vision towers", (0, 0))[1] - facts.counts.get("vision towers", (0, 0))[0]
    frozen = sum(n for _, n in facts.counts.values()) - n_train - towers
    items: dict[str, float] = {}
    shard = w if shape.zero_stage == 3 else 1
    on_gpu = 0.0 if shape.offload_parameters else 1.0
    quant = model_args.quantization
    if quant is None:
        items["base weights (frozen)"] = frozen * dtype_bytes / shard * on_gpu
    else:
        compute_bytes = torch.finfo(quant.resolved(model_args.dtype, "cuda").dtype).bits // 8  # a GPU's run
        items["base weights (frozen, not quantised)"] = (frozen - facts.quantizable) * dtype_bytes
        name = "4-bit NF4" if quant.quant_type == "nf4" else "FP8"
        items[f"base weights ({name})"] = quantized_bytes(facts.quantizable, facts.quantizable_rows, quant)
        # one layer's weights at a time: dequantised experts (a layer's, kept until the recompute frees them; one
        # product's at a time for frozen FP8 experts without checkpointing, still counted as the layer's; with
        # expert LoRA through PEFT also the weight + delta and its gradient) or a dequantised NF4 linear, in the
        # compute dtype; FP8 codes the backward reads transposed (its linears', its FP8 experts'), one byte each
        peft_experts = _peft_expert_lora(lora, speed)
        fp8 = quant.quant_type == "fp8"
        fp8_experts = fp8 and quant.expert_products == "fp8" and not peft_experts
        expert_bytes = 1 if fp8_experts else compute_bytes * (3 if peft_experts else 1)
        transient = max(facts.experts_layer * expert_bytes, facts.largest_linear * (1 if fp8 else compute_bytes))
        transposed = fp8 and (fp8_experts or not facts.experts_layer)
        items["FP8 codes read transposed (one layer, transient)" if transposed
              else "dequantised weights (one layer, transient)"] = transient
    if towers:
        items["vision towers (frozen)"] = towers * dtype_bytes / shard * on_gpu
    if deepspeed:
        items["trainable weights"] = n_train * 2 / shard * on_gpu  # DeepSpeed runs the module in bf16
        # with optimizer offload, gradients leave for the CPU bucket by bucket (the bucket line below)
        items["gradients"] = 0.0 if shape.offload_optimizer else n_train * 2 / (w if shape.zero_stage >= 2 else 1)
        items["optimizer states (fp32 master + AdamW)"] = 0.0 if shape.offload_optimizer else n_train * 12 / w
        items["DeepSpeed buffers (reduce bucket)"] = min(shape.reduce_bucket_size, n_train) * 2
    else:
        train_bytes = lora_params * 4 + full_params * dtype_bytes
        items["trainable weights"] = train_bytes
        items["gradients"] = train_bytes
        items["optimizer states (AdamW)"] = 2 * train_bytes

    hidden, layers, vocab, mlp = facts.hidden, facts.layers, facts.vocab, facts.mlp
    tokens = shape.batch_size * shape.seq_len
    per_layer = tokens * (ACT_HIDDEN * hidden + ACT_MLP * mlp) * act_bytes
    if model_args.gradient_checkpointing:
        # every layer's input, plus one layer's recomputed internals at RECOMPUTE_LIVE (docs/design/memory.md)
        items["activations (checkpointed)"] = layers * tokens * hidden * resid_bytes + per_layer * RECOMPUTE_LIVE
        if facts.moe_layers:
            # what the measured peaks of a checkpointed MoE model grow by beyond the terms above, per routed row:
            # fitted, not attributed to particular tensors (docs/design/memory.md)
            items["MoE layer's backward (fitted)"] = tokens * MOE_BACKWARD_ROWS * facts.top_k * hidden * act_bytes
        # (effective_keep reads the transformers installed here: the estimate is of a run on this machine's stack)
        if (keep := effective_keep(speed.keep_expert_outputs, speed.compile)) != "none":
            # per token and MoE layer, top_k rows of the gate/up output (2 x expert width), and of the down
            # projection's (hidden) with `all`, kept from the forward to the backward (mgmlora.models.recompute)
            width = 2 * mlp + (facts.top_k * hidden if keep == "all" else 0)
            items["kept expert outputs (speed.keep_expert_outputs)"] = facts.moe_layers * tokens * width * act_bytes
        if speed.keep_attention_outputs:
            # per token and layer, the attention kernel's output (query heads x head dimension, compute dtype) and its
            # log-sum-exp (one float32 per query head), kept from the forward to the backward (mgmlora.models.recompute)
            per_token = facts.query_heads * (facts.head_dim * act_bytes + 4)
            items["kept attention outputs (speed.keep_attention_outputs)"] = layers * tokens * per_token
    else:
        items["activations"] = layers * per_layer
    if facts.dropout_inputs and model_args.gradient_checkpointing:
        # LoRA dropout under checkpointing: per token, each adapter's dropped copy of its input (compute dtype) and
        # the mask its backward keeps (one byte), for the layer being recomputed. Runs without checkpointing (MGM-2B's,
        # dropout 0.1) are within 15% of the estimate without such a term, and what their backward keeps of the
        # dropout is not measured apart, so none is counted there (docs/design/memory.md)
        items["LoRA dropout (dropped inputs and masks)"] = tokens * facts.dropout_inputs * (act_bytes + 1)
    if speed.packing and model_args.attn_implementation == "eager":
        # one row of all the micro-batch's samples: under `eager` transformers builds a (T, T) boolean block-diagonal
        # mask and an additive copy of it in the compute dtype. `sdpa` runs mgmlora's packed attention and
        # flash-attn its varlen kernel (no mask); FlexAttention's block mask is (T / 128)^2. Grows as T^2: 0.05 GiB
        # at 4k packed tokens, 0.75 GiB at 16k.
        items["attention mask (packed row, T x T)"] = tokens ** 2 * (1 + act_bytes)
    if facts.mining is not None:
        # ConvNeXt stage maps upsampled to the first stage (H_aux / 4)^2 and concatenated, windowed for the mining
        # attention, layer-normed and projected to keys/values; kept for backward when the projector trains.
        aux_channels, clip_hidden = facts.mining
        aux_positions = (info.image_size_aux // 4) ** 2
        per_position = 4 * aux_channels + 4 * clip_hidden
        if not trainable.projector == "full":
            per_position = 2 * aux_channels  # transient: no graph through frozen towers and mining
        items["vision path (aux maps, mining)"] = shape.batch_size * aux_positions * per_position * act_bytes
    head_bytes = act_bytes + (4 if act_bytes != 4 else 0) + 4  # logits, their fp32 copy (if not fp32), fp32 gradient
    supervisable = shape.batch_size * max(shape.seq_len - info.image_tokens, 1)  # image positions carry no loss
    if speed.loss == "full":
        items[f"LM head + loss (full logits, vocab {vocab:,})"] = tokens * vocab * head_bytes
    elif speed.loss in ("chunked", "compiled"):  # compiled: bounded by the eager chunk's copies, not measured apart
        rows = min(supervisable, speed.loss_chunk_size)
        items[f"LM head + loss ({speed.loss}, vocab {vocab:,})"] = rows * vocab * head_bytes
    else:
        items["LM head + loss (liger)"] = tokens * hidden * 4 * 2
    if shape.device == "cuda":
        items["CUDA workspace"] = WORKSPACE_GIB * GIB
    items = {k: v / GIB for k, v in items.items()}
    counts = {k: list(v) for k, v in facts.counts.items()}
    settings = {"model": asdict(model_args), "lora": asdict(lora), "trainable": asdict(trainable),
                "speed": asdict(speed), "shape": asdict(shape), "family": info.family}
    return Estimate(items, sum(items.values()), counts, settings)


def cpu_peak_bytes(fn: Callable[[], object], resident_bytes: int) -> int:
    """The CPU allocator's peak while `fn` runs: `resident_bytes` (what already lives) + the largest net allocation.

    Reads torch.profiler's allocation events (`profile_memory=True`): each allocation and free with its size, in time
    order, so the running sum is the live memory `fn` added and its maximum the peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(allocation_events(prof))
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return resident_bytes + peak


def resident_bytes(*tensor_sources) -> int:
    """Bytes of the distinct storages among modules' parameters and buffers and optimizers' states."""
    seen, total = set(), 0
    for source in tensor_sources:
        if isinstance(source, torch.nn.Module):
            tensors = [*source.parameters(), *source.buffers()]
        else:  # an optimizer
            tensors = [t for state in source.state.values() for t in state.values() if torch.is_tensor(t)]
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen and t.device.type == "cpu":
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def cheapest_fix(model_args: ModelArgs, lora: LoraArgs, trainable: Trainability, speed: SpeedArgs,
                 shape: RunShape, budget_gib: float) -> tuple[str, Estimate] | None:
    """The first change, in order of what it costs the run, that brings the estimate under `budget_gib`."""
    candidates = []
    if not model_args.gradient_checkpointing:
        candidates.append(("model.model.gradient_checkpointing: true (about 30% more compute)",
                           (replace(model_args, gradient_checkpointing=True), lora, speed, shape)))
    if speed.loss == "full":
        candidates.append(("model.speed.loss: chunked (same result, no full-vocabulary logits)",
                           (model_args, lora, replace(speed, loss="chunked"), shape)))
    if shape.batch_size > 1:
        candidates.append((f"data.batch_size: 1 with accumulate_grad_batches x{shape.batch_size} (same global batch)",
                           (model_args, lora, speed, replace(shape, batch_size=1))))
    if not shape.offload_optimizer and not (model_args.quantization is not None and uses_moe(model_args)):
        stage = max(shape.zero_stage, 2)  # a 4-bit MoE base does not run under DeepSpeed (DEEPSPEED_MOE_REFUSAL)
        candidates.append((f"--config configs/strategy/zero{stage}_offload.yaml (optimizer states on the CPU)",
                           (model_args, lora, speed, replace(shape, zero_stage=stage, offload_optimizer=True))))
    if model_args.quantization is None:  # before more GPUs: it runs on the GPUs the user has
        four_bit = replace(model_args, quantization=QuantizationArgs())
        four_bit = replace(four_bit, gradient_checkpointing=four_bit.gradient_checkpointing
                           or checkpointing_refusal(four_bit, lora, speed) is not None)
        candidates.append(("model.model.quantization: {} (4-bit NF4 base, trainer.strategy auto; the settings list "
                           "above names a shipped 4-bit recipe where one was measured)",
                           (four_bit, lora, speed, replace(shape, zero_stage=0, offload_optimizer=False,
                                                           offload_parameters=False))))
    if shape.zero_stage < 3 and shape.world_size > 1 and model_args.quantization is None:  # 4-bit: no ZeRO-3
        candidates.append(("--config configs/strategy/zero3.yaml (weights partitioned over the GPUs)",
                           (model_args, lora, speed, replace(shape, zero_stage=3))))
    if trainable.llm == "lora" and (lora.r or 16) > 8:
        candidates.append(("model.lora.r: 8", (model_args, replace(lora, r=8, lora_alpha=16), speed, shape)))
    for seq in (shape.seq_len // 2, shape.seq_len // 4):
        if seq >= 256:
            candidates.append((f"data max_length {seq}", (model_args, lora, speed, replace(shape, seq_len=seq))))
    for what, (m, lo, sp, sh) in candidates:
        est = estimate(m, lo, trainable, sp, sh)
        if est.fits(budget_gib):
            return what, est
    return None


def largest_batch_size(model_args: ModelArgs, lora: LoraArgs, trainable: Trainability, speed: SpeedArgs,
                       shape: RunShape, budget_gib: float, limit: int = 256) -> int:
    """The largest micro-batch (samples of `shape.seq_len`) whose estimate fits `budget_gib`; 0 if none does.

    With `speed.packing` the padding costs nothing, so this is the number of samples to pack per micro-batch; keep
    the global batch by dividing `accumulate_grad_batches` accordingly.
    """
    shape = replace(shape, window_samples=None)  # micro-batches of whole samples, whatever the config's window
    lo, hi = 0, limit
    while lo < hi:  # the estimate grows with the batch size
        mid = (lo + hi + 1) // 2
        if estimate(model_args, lora, trainable, speed, replace(shape, batch_size=mid)).fits(budget_gib):
            lo = mid
        else:
            hi = mid - 1
    return lo


def format_estimate(est: Estimate, budget_gib: float | None = None) -> str:
    """The itemised table, trainable counts per component, and the verdict."""
    width = max(len(k) for k in est.items) + 2
    lines = [f"{k:<{width}}{v:>9.2f} GiB" for k, v in est.items.items()]
    lines.append(f"{'total (peak, per device)':<{width}}{est.total_gib:>9.2f} GiB")
    lines.append("trainable parameters per component:")
    lines += [f"  {k}: {t:,} trainable / {n:,}" for k, (t, n) in est.trainable.items()]
    if budget_gib is not None:
        verdict = "fits" if est.fits(budget_gib) else "does NOT fit"
        lines.append(f"verdict: {verdict} in {budget_gib:g} GiB (with {HEADROOM_GIB:g} GiB kept free for the CUDA "
                     "context and fragmentation)")
    return "\n".join(lines)


def _world_size(devices, num_nodes) -> int:
    """Data-parallel ranks from trainer.devices (an int, a list of ids, "auto"/-1 = every visible GPU) and nodes."""
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        per_node = int(devices)
    else:
        per_node = devices if isinstance(devices, int) else -1
    if per_node < 1:  # "auto" or -1: the GPUs of this machine
        per_node = max(torch.cuda.device_count(), 1)
    return per_node * int(num_nodes or 1)


def run_from_tree(tree: dict) -> tuple[ModelArgs, LoraArgs, Trainability, SpeedArgs, RunShape]:
    """The estimate's inputs from a run's parsed config (`mgmlora.cli.parse_files`: composed YAML plus overrides).

    The caller parses with LightningCLI's own parser (the same composition, short forms, defaults and validation as
    `bin/main.py fit`, nothing instantiated); the library never imports the CLI. Sequence length: the data's
    max_length (for MGM, null means the checkpoint's limit after image expansion).
    """
    model = tree.get("model", {})
    model_args = ModelArgs(**model.get("model", {}))
    path = model_args.model_path
    if path and not (Path(path) / "config.json").is_file():
        if not model_args.preset:
            raise FileNotFoundError(f"model.model.model_path {path!r} has no config.json here; the estimate needs "
                                    "only that file (or a registry preset).")
        model_args = replace(model_args, model_path=None)  # same architecture from the registry preset
    lora = LoraArgs(**model.get("lora", {}))
    trainable = Trainability(**model.get("trainable", {}))
    speed = SpeedArgs(**model.get("speed", {}))
    data = (tree.get("data") or {}).get("init_args", {})
    trainer = tree.get("trainer", {})
    strategy = trainer.get("strategy")
    init = dict(strategy.get("init_args", {})) if isinstance(strategy, dict) else {}
    is_ds = isinstance(strategy, dict) and "DeepSpeed" in strategy.get("class_path", "")
    if isinstance(strategy, str) and strategy.startswith("deepspeed"):  # Lightning's names: deepspeed_stage_2_offload
        is_ds = True
        init = {"stage": int(strategy.split("_")[2]) if strategy.count("_") >= 2 else 2,
                "offload_optimizer": "offload" in strategy, "offload_parameters": strategy.endswith("3_offload")}
    # the counts `fit` refuses: an estimate of them would be of no run at all
    bad = count_refusals(data, trainer.get("accumulate_grad_batches"))
    if bad:
        raise UsageError("; ".join(bad) + ".")
    seq = data.get("max_length") or model_info(model_args).max_length or 2048
    world = _world_size(trainer.get("devices", 1), trainer.get("num_nodes", 1))
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    window = data.get("window_samples")
    # a window's micro-batch: at most data.max_tokens positions when set (the sampler flags larger ones), else its
    # share of the window's samples at the longest length
    window_positions = int(data.get("max_tokens") or -(-int(window) // accumulate) * int(seq)) if window else 0
    shape = RunShape(batch_size=int(data.get("batch_size", 1)), seq_len=int(seq), accumulate=accumulate,
                     window_samples=int(window) if window else None, window_positions=window_positions,
                     precision=str(trainer.get("precision") or "32-true"), world_size=world,
                     zero_stage=int(init.get("stage", 2)) if is_ds else 0,
                     offload_optimizer=bool(init.get("offload_optimizer", False)),
                     offload_parameters=bool(init.get("offload_parameters", False)),
                     reduce_bucket_size=float(init.get("reduce_bucket_size", 2e8)),  # DeepSpeedStrategy default
                     device="cpu" if trainer.get("accelerator") == "cpu" else "cuda")
    return model_args, lora, trainable, speed, shape

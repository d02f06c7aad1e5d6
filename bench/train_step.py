"""One LoRA training step, the plain transformers + PEFT way and mgmlora's way, on the same model and batches.

    python bench/train_step.py --model mgm-2b --out bench/results/<date>-train_step-mgm2b-h100.json
    python bench/train_step.py --model qwen3-30b-a3b --out ...      # Chameleons-like lengths, micro-batch 2
    python bench/train_step.py --model tiny-qwen3 --steps 2 --warmup 1 --out /tmp/x.json   # CPU smoke run

The model is built once through mgmlora's own builders (random init at the real shapes, bf16, gradient checkpointing,
LoRA from the preset the configs use) and every variant trains that same PEFT model:

- `plain`: what a transformers + PEFT script does: `peft_model(input_ids, attention_mask, labels)`, i.e. the LM head
  on every position and transformers' loss over fp32-upcast full-vocabulary logits (for MGM, the original's
  cross-entropy over its full logits), padded micro-batches.
- `chunked`: mgmlora's loss (`speed.loss: chunked`): head + cross-entropy only on supervised positions, chunked.
- `compiled`: `chunked` with each chunk's head + cross-entropy compiled (`speed.loss: compiled`).
- `liger`: the same with Liger-Kernel's fused linear cross-entropy (CUDA, when liger-kernel is installed).
- `chunked+packing`: plus `speed.packing: true` (no padding compute inside the micro-batch), with the attention a
  packed run loads (`sdpa` becomes mgmlora's packed SDPA: per-sample attention, PyTorch's varlen flash kernel on CUDA;
  mgmlora.models.attention). `+flex`: FlexAttention's block mask instead; `+dense`: transformers' `sdpa` with its
  dense (N x N) mask over the packed row (what packing did before; quadratic in the pack).
- `...xN`: the same with N samples per micro-batch (micro-batch sizing; padding no longer costs compute);
  `plainxN` is the plain path at N samples per micro-batch.
- `+nocast`: `speed.peft_input_cast: false` (PEFT's fp32 copies of LoRA inputs skipped; exact under autocast).
- `+fused`: `optim.fused: true` (torch's fused AdamW instead of the multi-tensor default).
- `+compile`: `speed.compile: true` (the family's regions torch.compile'd: each decoder layer, and MGM's image path;
  compiled in the warm-up steps).
- `+nockpt`: gradient checkpointing off (speed for memory: no recompute).
- `+eagerexperts`: MoE experts as transformers' per-expert loop instead of its default grouped GEMM;
  `+fastexperts`: mgmlora's grouped GEMM (`model.experts_implementation: mgmlora_grouped_mm`, mgmlora.models.experts).
- `+splitexperts`: expert LoRA (`--target_experts`) split beside the frozen expert GEMM (`speed.expert_lora: split`,
  mgmlora.training.expert_lora); without it expert LoRA runs PEFT's path (W + B A formed per call), as in a plain
  transformers + PEFT script.
- `+keepgateup` / `+keepexperts`: under checkpointing, the forward keeps the frozen expert GEMMs' outputs (gate/up
  only, or down too) and the recompute reads them (`speed.keep_expert_outputs: gate_up` / `all`,
  mgmlora.models.recompute); HFU then counts the recompute without those GEMMs.
- `+keepattn`: under checkpointing, the forward keeps each layer's attention kernel output and the recompute reads it
  (`speed.keep_attention_outputs: true`, mgmlora.models.recompute); HFU then counts the recompute without attention.

`--quant nf4|fp8` (`--expert_products dequantized|fp8` with fp8) builds the model with its frozen decoder weights
quantised (`model.model.quantization`, layer by
layer on the device; mgmlora.models.quantization): every variant then runs on that base, the plain path included.
With `fp8` the frozen linears' products run in FP8 (mgmlora.models.fp8), the MoE experts' too with
`--expert_products fp8`; MFU and HFU still divide by the bf16 ceiling.

Every variant starts from the same LoRA weights on the same batches, so `--warmup 0 --steps 50 --lr 1e-4` doubles as
the learning-parity check at real shapes: `loss_max_rel_diff_vs_plain` compares the per-step losses with the plain
path's (same micro-batch size only).

`--budget_gib X` picks, for the plain path and for mgmlora's, the fastest variant whose peak stays within X GiB, and
records their ratio, MFU and HFU (`best_within_budget`): the speed a user gets from a GPU of that size.

Each variant: a fresh AdamW over the LoRA (and projector) parameters, `--warmup` untimed steps, then the median of
`--steps` timed steps (forward, backward, optimizer step; CUDA synchronised), peak memory after a reset (weights
included; on the CPU, one extra step's allocator peak read from torch.profiler), tokens/s over real
positions (MGM: image embeddings included), and MFU / HFU from the FLOPs of each step
(`flops_per_step_model` / `flops_per_step_hardware`, mgmlora.models.flops: forward + input-gradient backward of the
frozen weights, LoRA's weight gradients, the LM head on supervised positions only, causal attention per sample, MGM's
image encoding; hardware FLOPs add the checkpointed recompute) over the measured bf16 ceiling.
Writes one JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from mgmlora.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Batch  # noqa: E402
from mgmlora.data.chat import TokenizedSample  # noqa: E402
from mgmlora.data.collate import pad_collate  # noqa: E402
from mgmlora.models import load_model  # noqa: E402
from mgmlora.models.args import ModelArgs  # noqa: E402
from mgmlora.models.attention import packed_attention  # noqa: E402
from mgmlora.models.causal_lm import (  # noqa: E402
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    gradient_checkpointing_on,
)
from mgmlora.models.experts import FAST_EXPERTS  # noqa: E402
from mgmlora.models.flops import FlopModel, measure_forward_flops  # noqa: E402
from mgmlora.models.loaded import outer_param_wrappers  # noqa: E402
from mgmlora.models.quantization import QuantizationArgs, checkpointing_required, set_expert_backward  # noqa: E402
from mgmlora.models.recompute import effective_keep, set_recompute  # noqa: E402
from mgmlora.models.torch_private import dynamo_counts  # noqa: E402
from mgmlora.models.transformers_private import attn_implementation, experts_implementation  # noqa: E402
from mgmlora.tools.memory import cpu_peak_bytes, resident_bytes  # noqa: E402
from mgmlora.training.callbacks import batch_positions  # noqa: E402
from mgmlora.training.expert_lora import set_expert_lora  # noqa: E402
from mgmlora.training.fastpath import apply_recompute, set_peft_input_cast  # noqa: E402
from mgmlora.training.lora import LoraArgs, count_parameters  # noqa: E402
from mgmlora.training.loss import SpeedArgs, lm_loss  # noqa: E402
from mgmlora.training.trainable import Trainability, apply_trainability  # noqa: E402

PEAK_TFLOPS = 800.0  # H100/H200 bf16 dense ceiling measured on these machines (docs/design/gpu.md)
DEFAULTS = {  # model -> (LoRA preset, default variants, default micro-batch)
    "mgm-2b": ("balanced", "plain,chunked", 1),
    "tiny-mgm": ("balanced", "plain,chunked,chunked+packing", 2),
    "qwen3-30b-a3b": ("chameleons", "plain,chunked,chunked+packing,chunked+packingx8", 2),
    "qwen3-8b": ("chameleons", "plain,chunked,chunked+packing,chunked+packingx8", 2),
    "tiny-qwen3": ("chameleons", "plain,chunked,chunked+packing,chunked+packingx4", 2),
    "tiny-qwen3-moe": ("chameleons", "plain,chunked,chunked+packing", 2),
}


def chameleons_lengths(n: int, gen: torch.Generator, lo: int = 200, hi: int = 1024) -> list[int]:
    """Lengths like Chameleons prompts (bench/make_chameleons.py measured p10 388, median 532, p90 789, max 1024)."""
    z = torch.randn(n, generator=gen)
    return [int(min(hi, max(lo, math.exp(math.log(530) + 0.35 * float(v))))) for v in z]


def text_sample(length: int, vocab: int, gen: torch.Generator, answer_frac: float = 0.15) -> tuple[list, list]:
    """Random token ids; the last `answer_frac` of the positions are supervised (the character's line)."""
    ids = torch.randint(10, vocab, (length,), generator=gen).tolist()
    n_answer = max(2, int(length * answer_frac))
    return ids, [IGNORE_INDEX] * (length - n_answer) + ids[length - n_answer :]


def pad(samples: list[tuple[list, list]]) -> Batch:
    """Right-padded micro-batch (B, T) through the training collate, padded to the longest sample only."""
    return pad_collate([TokenizedSample(ids, labels) for ids, labels in samples], pad_id=0, pad_to_multiple_of=1)


def make_batches(args, info, vocab: int, batch_size: int, n_batches: int) -> list[Batch]:
    """The same deterministic samples for every variant (a variant with a bigger micro-batch groups more of them)."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        if info.family == "mgm":
            text = args.seq - info.image_tokens  # rows of exactly --seq positions after the image is spliced in
            samples = []
            for _ in range(batch_size):
                ids, labels = text_sample(text, vocab, gen, answer_frac=0.9)
                ids[1], labels[1] = IMAGE_TOKEN_INDEX, IGNORE_INDEX
                samples.append((ids, labels))
            batch = pad(samples)
            batch.model_inputs = {
                "images": torch.randn(batch_size, 3, info.image_size, info.image_size, generator=gen),
                "images_aux": torch.randn(batch_size, 3, info.image_size_aux, info.image_size_aux, generator=gen)}
        elif args.lengths == "fixed":
            batch = pad([text_sample(args.seq, vocab, gen) for _ in range(batch_size)])
        else:
            batch = pad([text_sample(n, vocab, gen) for n in chameleons_lengths(batch_size, gen)])
        batches.append(batch)
    return batches


def plain_loss(model, family: str, batch: Batch) -> torch.Tensor:
    """The plain transformers + PEFT step's loss."""
    if family == "mgm":
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                    **batch.model_inputs)  # full (B, T', V) logits, expanded sequence
        logits, labels = out.logits[:, :-1], out.labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss


def fast_loss(loaded, batch: Batch, impl: str, packed: bool, chunk: int) -> torch.Tensor:
    """The loss of mgmlora's step (what LoraLitModule._loss_sum computes), as a token mean for comparability."""
    fwd = loaded.forward_hidden(batch, packed)
    out = lm_loss(fwd.hidden, fwd.labels, fwd.head, impl, chunk, host_labels=fwd.host_labels)
    return out.loss_sum / out.n_tokens.clamp(min=1)


def positions(batch: dict[str, torch.Tensor], info) -> int:
    """Real (non-pad) positions the model computes on, image embeddings included (the training loop's count)."""
    return int(batch_positions(batch, info.image_tokens))


def image_flops(model, loaded, batches, device) -> float:
    """FLOPs of encoding one image: the frozen towers' forward and the trainable projectors' forward and backward."""
    with_images = next((b for b in batches if b.model_inputs), None)
    if with_images is None or not hasattr(loaded.model, "encode_images"):
        return 0.0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    one = {k: v[:1].to(device, dtype) for k, v in with_images.model_inputs.items()}  # MGM: images, images_aux

    def encode():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loaded.model.encode_images(**one).float().sum().backward()

    flops = measure_forward_flops(encode)
    for p in model.parameters():
        p.grad = None
    return flops


def step_flops(flop_model: FlopModel, batches, info, recompute: bool, kept: str = "none",
               kept_attention: bool = False) -> tuple[float, float]:
    """Mean model and hardware FLOPs per step over `batches` (the counts of mgmlora.models.flops)."""
    model = hardware = 0.0
    for b in batches:
        lengths = [int(n) for n in b.attention_mask.sum(-1)]
        n_images = 0
        if b.model_inputs:
            n_images = int(b.image_count())
            per_row = (b.input_ids == IMAGE_TOKEN_INDEX).sum(-1).tolist()
            lengths = [n + k * (info.image_tokens - 1) for n, k in zip(lengths, per_row)]
        supervised = int((b.labels[:, 1:] != IGNORE_INDEX).sum())
        f = flop_model.step(lengths, supervised, n_images, recompute, kept, kept_attention)
        model, hardware = model + f.model, hardware + f.hardware
    return model / len(batches), hardware / len(batches)


FLAGS = {"packing", "nocast", "fused", "compile", "nockpt", "eagerexperts", "fastexperts", "splitexperts", "flex",
         "dense", "keepgateup", "keepexperts", "keepattn"}
KEEP_FLAGS = {"keepgateup": "gate_up", "keepexperts": "all"}  # speed.keep_expert_outputs


def kept_outputs(flags: set[str]) -> str:
    """The `speed.keep_expert_outputs` a variant's flags ask for (`none` without a keep flag)."""
    return next((KEEP_FLAGS[f] for f in flags & KEEP_FLAGS.keys()), "none")


def parse_variant(variant: str) -> tuple[str, set[str], int | None]:
    """`impl[+flag...][xN]` -> (loss implementation or `plain`, flags, samples per micro-batch or None)."""
    parts = variant.split("+")
    match = re.fullmatch(r"(.*?)x(\d+)", parts[-1])
    per_batch = None
    if match:
        parts[-1], per_batch = match[1], int(match[2])
    impl, flags = parts[0], set(parts[1:])
    if impl not in ("plain", "full", "chunked", "compiled", "liger") or flags - FLAGS:
        raise SystemExit(f"unknown variant {variant!r}: impl plain|full|chunked|compiled|liger, flags {sorted(FLAGS)}, "
                         "xN")
    if len(flags & KEEP_FLAGS.keys()) > 1 or flags & (KEEP_FLAGS.keys() | {"keepattn"}) and "nockpt" in flags:
        raise SystemExit(f"variant {variant!r}: +keepgateup or +keepexperts (one of them) and +keepattn choose what "
                         "checkpointing recomputes (without +nockpt)")
    if {"keepattn", "flex"} <= flags:
        raise SystemExit(f"variant {variant!r}: +keepattn keeps SDPA's attention kernel, and +flex runs FlexAttention")
    if flags & {"flex", "dense"} and "packing" not in flags or {"flex", "dense"} <= flags:
        raise SystemExit(f"variant {variant!r}: +flex or +dense choose the attention of packed rows (one of them, "
                         "with +packing)")
    return impl, flags, per_batch


def switch_on(model, loaded, flags: set[str]) -> list:
    """Switches a variant's model-level flags on; returns the undo actions, most recent last.

    Each flag's undo restores the state it found (checkpointing on or off, the experts implementation in use), and is
    registered as soon as the flag is on; a failure half-way runs the undo actions registered so far before it
    propagates, so the next variant gets the model as it was.
    """
    undo: list = []
    try:
        _switch_on(model, loaded, flags, undo)
    except BaseException:
        switch_off(undo)
        raise
    return undo


def _switch_on(model, loaded, flags: set[str], undo: list) -> None:
    llm = loaded.language_model()
    experts = {"eagerexperts": "eager", "fastexperts": FAST_EXPERTS}
    if flags & experts.keys() and not loaded.moe or {"eagerexperts", "fastexperts"} <= flags:
        raise ValueError("+eagerexperts / +fastexperts (one of them) need a mixture-of-experts model")
    peft_experts = bool(outer_param_wrappers(model)) and "splitexperts" not in flags
    if "nockpt" in flags and loaded.quantized is not None and \
            (refusal := checkpointing_required(loaded.quantized.quant_type, loaded.moe, peft_experts)):
        raise ValueError(f"+nockpt: {refusal} (+splitexperts: LoRA beside the frozen experts)")  # as training does
    if "eagerexperts" in flags and loaded.quantized is not None:  # qlora_parity.py's quantised model too
        raise ValueError("+eagerexperts: transformers' experts forward reads the quantised experts' empty placeholders")
    if "packing" in flags:
        previous_attn = attn_implementation(llm.config)
        attn = "flex_attention" if "flex" in flags else "sdpa" if "dense" in flags else packed_attention("sdpa", True)
        llm.set_attn_implementation(attn)
        undo.append(lambda: llm.set_attn_implementation(previous_attn))
    if "nocast" in flags:
        set_peft_input_cast(model, False)
        undo.append(lambda: set_peft_input_cast(model, True))
    if "nockpt" in flags and gradient_checkpointing_on(llm):
        disable_gradient_checkpointing(llm)
        undo.append(lambda: enable_gradient_checkpointing(llm))
    if set_expert_backward(model, gradient_checkpointing_on(llm)):  # as training sets it (mgmlora.training.fastpath)
        undo.append(lambda: set_expert_backward(model, True))
    if chosen := [experts[f] for f in flags & experts.keys()]:
        previous_experts = experts_implementation(llm.config)
        llm.set_experts_implementation(chosen[0])
        undo.append(lambda: llm.set_experts_implementation(previous_experts or "grouped_mm"))
    if "splitexperts" in flags:  # after the experts implementation (split needs mgmlora's), before the compile
        split, kept = set_expert_lora(model, "split")
        undo.append(lambda: set_expert_lora(model, "peft"))
        if not split or kept:
            raise ValueError(f"+splitexperts: {split} expert modules split, {kept} not (needs --target_experts and "
                             f"mgmlora's experts, +fastexperts)")
    if (keep := kept_outputs(flags)) != "none" or "keepattn" in flags:  # after the split, before the compile
        # refuses a model without checkpointing, which stays so
        apply_recompute(loaded, SpeedArgs(keep_expert_outputs=keep, keep_attention_outputs="keepattn" in flags,
                                          compile="compile" in flags))
        undo.append(lambda: set_recompute(llm, "none"))
    if "compile" in flags:
        undo.append(lambda: (loaded.uncompile(), torch.compiler.reset()))
        loaded.compile(packed="packing" in flags)


def switch_off(undo: list) -> None:
    """Runs the undo actions in reverse order; every one runs even if another fails (the first error is raised)."""
    errors = []
    for action in reversed(undo):
        try:
            action()
        except Exception as error:  # noqa: BLE001
            errors.append(error)
    if errors:
        raise errors[0]


def run_variant(model, loaded, batches, variant, chunk, warmup, steps, device, lr, measure_cpu_peak=True,
                on_step=None) -> dict:
    """Times one variant; returns its record (`measure_cpu_peak=False` inside another profiler session).

    `on_step(i)` runs after each step's optimizer step (the profile's step marker).
    """
    impl, flags, _ = parse_variant(variant)
    family = loaded.info.family
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, fused=True if "fused" in flags else None)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses, losses_all = [], [], []

    def step(i: int) -> torch.Tensor:
        batch = batches[i % len(batches)].to(device, non_blocking=True)
        if batch.model_inputs and cuda:
            batch.model_inputs = {k: v.bfloat16() for k, v in batch.model_inputs.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = plain_loss(model, family, batch) if impl == "plain" else \
                fast_loss(loaded, batch, impl, "packing" in flags, chunk)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    peak, undo = None, []
    try:
        undo = switch_on(model, loaded, flags)
        for i in range(warmup + steps):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = step(i)
            if cuda:
                torch.cuda.synchronize()
            losses_all.append(loss.item())
            if on_step is not None:
                on_step(i)
            if i >= warmup:
                times.append(time.perf_counter() - start)
                losses.append(losses_all[-1])
        if cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
        elif measure_cpu_peak:  # one more step, its allocations read from the profiler: the CPU allocator's peak
            peak = cpu_peak_bytes(lambda: step(warmup + steps), resident_bytes(model, optimizer)) / 2**30
    finally:
        switch_off(undo)
    return {"step_s_median": statistics.median(times), "step_s_all": times, "peak_alloc_gib": peak,
            "loss_first_last": [losses[0], losses[-1]], "losses": losses, "loss_first_step": losses_all[0]}


PROFILE_AFTER = 2  # unprofiled steps first: a compiled variant compiles (and tunes kernels) in its first steps


def profile_step(model, loaded, batches, variant, chunk, device, top: int = 15) -> tuple[list[dict], dict | None, int]:
    """One step under torch.profiler, after `PROFILE_AFTER` unprofiled steps and a profiler warm-up step.

    The variant is switched on anew, as when it was timed. Returns the step's top operators, on a GPU its device time
    by kernel kind, and the graphs dynamo compiled while it ran (0 for a profile of the steady state; kernel tuning at
    a kernel's first launch is not counted there). The first step of a compiled variant holds its compilation, which a
    profile of that step would count as the step's own work. The operators are those that took the most device (or
    CPU) time, annotations left out (loop_timing `annotation`); aten operators and their kernels both appear, so their
    shares overlap. The kernel kinds (bench/loop_timing.py `device_breakdown`: busy, idle, GEMMs, attention, compiled
    kernels, ...) count each kernel once.
    """
    from loop_timing import annotation, device_breakdown  # bench/, this script's folder (only when profiling)
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    graphs = []  # compiled graphs so far, after each step

    def on_step(i: int) -> None:
        graphs.append(dynamo_counts()[0])
        prof.step()

    # steps 0 .. PROFILE_AFTER - 1 unprofiled, one profiler warm-up step, then the active one
    with profile(activities=activities, schedule=schedule(wait=PROFILE_AFTER, warmup=1, active=1)) as prof:
        run_variant(model, loaded, batches[:1], variant, chunk, PROFILE_AFTER + 1, 1, device, 0.0,
                    measure_cpu_peak=False, on_step=on_step)
    compiled = graphs[-1] - graphs[-2]
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = [e for e in prof.key_averages() if not annotation(e)]
    events = sorted(averages, key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    total = sum(getattr(e, key, 0) for e in averages) or 1
    ops = [{"op": e.key, "ms": round(getattr(e, key, 0) / 1000, 2), "share": round(getattr(e, key, 0) / total, 3),
            "calls": e.count} for e in events]
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and not annotation(e)]
    return ops, device_breakdown(kernels) if kernels else None, compiled


def best_within_budget(records: dict[str, dict], budget_gib: float) -> dict:
    """Each path's fastest variant whose peak fits `budget_gib`, and the ratio of their tokens/s (same run).

    The plain path is every `plain...` variant; mgmlora's path every other one. A path with no fitting variant
    gets None (and so does the ratio).
    """
    def best(names):
        fits = [n for n in names if records[n].get("tokens_per_s") and records[n].get("peak_alloc_gib") is not None
                and records[n]["peak_alloc_gib"] <= budget_gib]
        return max(fits, key=lambda n: records[n]["tokens_per_s"], default=None)

    plain = best([n for n in records if n.startswith("plain")])
    ours = best([n for n in records if not n.startswith("plain")])
    pick = lambda n: None if n is None else {k: records[n].get(k) for k in  # noqa: E731
                                             ("tokens_per_s", "peak_alloc_gib", "mfu", "hfu",
                                                                              "samples_per_step")}
    ratio = records[ours]["tokens_per_s"] / records[plain]["tokens_per_s"] if plain and ours else None
    return {"budget_gib": budget_gib, "plain": plain, "ours": ours, "plain_record": pick(plain),
            "ours_record": pick(ours), "ratio": round(ratio, 3) if ratio else None}


def main() -> None:
    """Builds the model, runs every variant, writes the JSON, prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(DEFAULTS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=None, help="comma-separated; default depends on --model")
    parser.add_argument("--batch_size", type=int, default=None, help="plain path's micro-batch (samples)")
    parser.add_argument("--seq", type=int, default=2048, help="MGM row length / fixed text length")
    parser.add_argument("--lengths", choices=["chameleons", "fixed"], default="chameleons")
    parser.add_argument("--lora_preset", default=None)
    parser.add_argument("--target_experts", action="store_true")
    parser.add_argument("--quant", choices=["none", "nf4", "fp8"], default="none",
                        help="the frozen decoder weights quantised (model.model.quantization.quant_type)")
    parser.add_argument("--expert_products", choices=["dequantized", "fp8"], default="dequantized",
                        help="--quant fp8: how the MoE experts multiply (model.model.quantization.expert_products)")
    parser.add_argument("--r", type=int, default=None, help="LoRA rank override (lora_alpha = 2r)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile one more step of each variant (top operators by device time; "
                             "on a GPU also the device time by kernel kind)")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--budget_gib", type=float, default=None,
                        help="also report each path's fastest variant within this peak memory, and their ratio")
    args = parser.parse_args()
    preset, variants, batch_size = DEFAULTS[args.model]
    variants = (args.variants or variants).split(",")
    for variant in variants:  # every name checked before any GPU minute is spent
        flags = parse_variant(variant)[1]
        if args.quant != "none" and "eagerexperts" in flags:
            raise SystemExit(f"{variant}: transformers' experts forward reads the quantised experts' empty "
                             "placeholders; with --quant only mgmlora's experts forward runs them")
    batch_size = args.batch_size or batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"

    quant = None if args.quant == "none" else QuantizationArgs(quant_type=args.quant, compute_dtype=dtype,
                                                               expert_products=args.expert_products)
    model_args = ModelArgs(preset=args.model, dtype=dtype, gradient_checkpointing=True, quantization=quant)
    start = time.perf_counter()
    with device:  # random init directly on the GPU, in bf16
        loaded = load_model(model_args)
    rank = {"r": args.r, "lora_alpha": 2 * args.r} if args.r else {}
    lora = LoraArgs(preset=args.lora_preset or preset, lora_dropout=0.0, target_experts=args.target_experts, **rank)
    model, _ = apply_trainability(loaded, lora, Trainability())
    model.to(device)
    build_s = time.perf_counter() - start
    info = loaded.info
    trainable, total = count_parameters(model)

    # Every variant starts from the same LoRA weights and sees the same batches in the same order, so with
    # --warmup 0 their per-step losses are a learning-parity check (plain vs fast path), not only a timing.
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    flop_model = FlopModel.of(loaded.language_model(), image_flops(model, loaded, make_batches(
        args, info, info.vocab_size, 1, 1), device))
    records = {}
    for variant in variants:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in initial:
                    p.copy_(initial[n])
        per_batch = parse_variant(variant)[2] or batch_size
        batches = make_batches(args, info, info.vocab_size, per_batch, n_batches=args.warmup + args.steps)
        n_pos = statistics.mean(positions(b, info) for b in batches)
        lengths = [int(x) for b in batches for x in b.attention_mask.sum(-1)]
        try:
            rec = run_variant(model, loaded, batches, variant, args.chunk, args.warmup, args.steps, device, args.lr)
            if args.profile:
                try:
                    rec["profile_top_ops"], rec["profile_device"], rec["profile_compiled_graphs"] = profile_step(
                        model, loaded, batches, variant, args.chunk, device)
                except Exception as error:  # noqa: BLE001  (keep the timing that succeeded)
                    rec["profile_error"] = f"{type(error).__name__}: {error}"
        except torch.cuda.OutOfMemoryError as error:
            rec = {"oom": str(error).splitlines()[0]}
            torch.cuda.empty_cache()
        except Exception as error:  # noqa: BLE001  (one broken variant must not cost the others' GPU minutes)
            rec = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
            torch.cuda.empty_cache()
        rec.update({"samples_per_step": per_batch, "positions_per_step": n_pos,
                    "padded_positions_per_step": statistics.mean(b.input_ids.numel() for b in batches)
                    + (0 if info.family != "mgm" else per_batch * (info.image_tokens - 1)),
                    "sample_lengths": [min(lengths), statistics.median(lengths), max(lengths)]})
        if "step_s_median" in rec:
            rec["tokens_per_s"] = n_pos / rec["step_s_median"]
            flags = parse_variant(variant)[1]
            kept = effective_keep(kept_outputs(flags), "compile" in flags)
            rec["flops_per_step_model"], rec["flops_per_step_hardware"] = step_flops(flop_model, batches, info,
                                                                                     "nockpt" not in flags, kept,
                                                                                     "keepattn" in flags)
            cuda = device.type == "cuda"
            rec["mfu"] = rec["flops_per_step_model"] / rec["step_s_median"] / (PEAK_TFLOPS * 1e12) if cuda else None
            rec["hfu"] = rec["flops_per_step_hardware"] / rec["step_s_median"] / (PEAK_TFLOPS * 1e12) if cuda else None
        records[variant] = rec
        print(variant, json.dumps({k: v for k, v in rec.items() if k not in ("step_s_all", "losses")}), flush=True)

    base = records.get("plain", {}).get("tokens_per_s")
    for rec in records.values():
        if base and "tokens_per_s" in rec:
            rec["speedup_vs_plain"] = rec["tokens_per_s"] / base
        # parity against the plain path at the same samples per micro-batch (`plain` or `plainxN`)
        ref = next((r for n, r in records.items() if n.startswith("plain") and r is not rec and "losses" in r
                    and r["samples_per_step"] == rec["samples_per_step"]), None)
        if "losses" in rec and ref is not None and len(rec["losses"]) == len(ref["losses"]):
            rec["loss_max_rel_diff_vs_plain"] = max(abs(a - b) / abs(b) for a, b in zip(rec["losses"], ref["losses"]))
    best = best_within_budget(records, args.budget_gib) if args.budget_gib else None
    result = {
        "command": "python bench/train_step.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "model": args.model, "lora": {"preset": lora.preset, "target_experts": args.target_experts, "r": args.r},
        "quantization": None if quant is None else {"quant_type": quant.quant_type,
                                                    "expert_products": quant.expert_products},
        "trainable_params": trainable, "total_params": total, "build_s": round(build_s, 1),
        "peak_tflops_assumed": PEAK_TFLOPS, "warmup": args.warmup, "steps": args.steps, "variants": records,
        "best_within_budget": best,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{'variant':28} {'samples':>7} {'tok/step':>9} {'step s':>8} {'tok/s':>9} {'x plain':>7} {'GiB':>6} "
          f"{'MFU':>6} {'HFU':>6}")
    for name, rec in records.items():
        if "oom" in rec or "error" in rec:
            print(f"{name:28} {rec['samples_per_step']:>7} {'OOM' if 'oom' in rec else rec['error'][:60]}")
            continue
        gib = f"{rec['peak_alloc_gib']:.2f}" if rec["peak_alloc_gib"] is not None else "-"
        mfu = f"{rec['mfu']:.1%}" if rec["mfu"] is not None else "-"
        hfu = f"{rec['hfu']:.1%}" if rec["hfu"] is not None else "-"
        speedup = f"{rec['speedup_vs_plain']:.2f}" if "speedup_vs_plain" in rec else "-"
        print(f"{name:28} {rec['samples_per_step']:>7} {rec['positions_per_step']:>9.0f} {rec['step_s_median']:>8.3f} "
              f"{rec['tokens_per_s']:>9.0f} {speedup:>7} {gib:>6} {mfu:>6} {hfu:>6}")
    if best:
        print(f"\nwithin {best['budget_gib']} GiB: plain {best['plain']} vs ours {best['ours']}: "
              f"{best['ratio'] if best['ratio'] is not None else '-'}x")


if __name__ == "__main__":
    main()

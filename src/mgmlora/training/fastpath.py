"""Model-level switches of the fast path: PEFT's wasted input casts, and regional torch.compile.

Both come from the profile of the MGM-2B LoRA step at micro-batch 1 (bench/results/*train_step_profile-mgm2b*, its
breakdown in configs/README.md): the matmuls are a minority of device time, while dtype casts and copies and small
element-wise kernels (norms, rotary, GeGLU, LoRA scaling), each launched once per layer, forward and recompute, take
a comparable share.

- PEFT casts the input of every LoRA layer to the adapter's dtype before `lora_A` (`_cast_input_dtype`): with fp32
  adapters under bf16 autocast that is a bf16 -> fp32 copy of the activations, which autocast then casts back to bf16
  for the matmul. Without dropout the result is bit-identical without both copies (bf16 -> fp32 is exact), so under
  autocast, and under DeepSpeed's bf16 (where input and adapter already share a dtype), `speed.peft_input_cast: false`
  turns the cast off with PEFT's own per-layer switch (`cast_input_dtype_enabled`, the flag behind
  `peft.helpers.disable_input_dtype_casting`). Layers with LoRA dropout keep it: dropout on a bf16 tensor rounds its
  1/(1-p) rescale to bf16 (1.1094 instead of 1.1111 for p = 0.1), a small but systematic change (seen in
  tests/training/test_fastpath.py). Where the cast matters (fp32 adapters over a bf16 base without autocast) it is kept
  too.
- `speed.compile: true` compiles the regions the model's family names (`LoadedModel.compile`): each decoder layer
  (regional compilation, as PyTorch's tutorial on it recommends), and for MGM also its image path. Inductor then fuses
  the element-wise chains. Gradient checkpointing keeps working: the checkpoint wraps the layer's call, which runs the
  compiled forward, again in the recompute. Layers whose MoE experts carry LoRA through PEFT's own path are compiled
  around their experts, which run eagerly (that path recompiles on every call; `eager_regions` in
  mgmlora.models.loaded says why); split expert LoRA compiles with the rest of its layer.
- `speed.expert_lora` chooses how LoRA on fused MoE experts runs (mgmlora.training.expert_lora). It is set before the
  compile, which depends on it.
- A quantised MoE base that needs gradient checkpointing is refused without it (`checkpointing_required`), and frozen
  FP8 experts learn whether they dequantise again in the backward (`set_expert_backward`).
- `speed.keep_expert_outputs` and `speed.keep_attention_outputs` set what checkpointing recomputes
  (mgmlora.models.recompute), after the split and before the compile.
"""

from __future__ import annotations

from torch import nn

from mgmlora.errors import UsageError
from mgmlora.models.causal_lm import gradient_checkpointing_on
from mgmlora.models.experts import FAST_EXPERTS, supports_lora
from mgmlora.models.loaded import LoadedModel, outer_param_wrappers
from mgmlora.models.quantization import checkpointing_required, set_expert_backward
from mgmlora.models.recompute import effective_keep, recompute_refusal, set_recompute
from mgmlora.models.torch_private import dynamo_counts
from mgmlora.models.transformers_private import attn_implementation, experts_implementation
from mgmlora.training.expert_lora import SplitLoraExperts, set_expert_lora
from mgmlora.training.loss import SpeedArgs, compiled_loss_counts, dynamo_counts_added


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """PEFT's tuner layers (anything carrying the `cast_input_dtype_enabled` switch)."""
    return [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]


def has_dropout(layer: nn.Module) -> bool:
    """Whether a PEFT LoRA layer applies dropout to its input (a `Dropout` of p > 0 instead of an `Identity`)."""
    dropouts = getattr(layer, "lora_dropout", {})
    return any(isinstance(d, nn.Dropout) and d.p > 0 for d in dropouts.values())


def set_peft_input_cast(model: nn.Module, enabled: bool) -> int:
    """Turns PEFT's cast of LoRA inputs to the adapter dtype on or off; returns how many layers were set.

    Turning it off skips layers with LoRA dropout (see the module docstring): the cast keeps their result exact.
    """
    layers = [m for m in lora_layers(model) if enabled or not has_dropout(m)]
    for layer in layers:
        layer.cast_input_dtype_enabled = enabled
    return len(layers)


def apply_fast_path(loaded: LoadedModel, speed: SpeedArgs, same_compute_dtype: bool) -> list[str]:
    """Applies `speed.peft_input_cast`, `speed.expert_lora`, what checkpointing keeps, and `speed.compile`.

    Args:
        loaded: the loaded model after LoRA was applied (PEFT injects its LoRA layers into `loaded.model` in place);
            its family decides what `speed.compile` compiles (`LoadedModel.compile`).
        speed: the run's switches.
        same_compute_dtype: whether LoRA matmuls run in the input's dtype anyway (autocast, DeepSpeed's bf16, or an
            fp32 model): only then is skipping PEFT's input cast exact.

    Returns:
        What was applied, for the run's log.

    Raises:
        UsageError: a setting training refuses (a quantised MoE base without the checkpointing it needs, expert
            outputs kept where there are none to keep, attention kept where nothing recomputes it), before any
            compute.
    """
    done = []
    if not speed.peft_input_cast and same_compute_dtype:
        n = set_peft_input_cast(loaded.model, False)
        if n:
            done.append(f"PEFT input casts off in {n} LoRA layers")
    split, kept = set_expert_lora(loaded.model, speed.expert_lora)
    if split:
        done.append(f"expert LoRA split (frozen expert GEMM + LoRA GEMMs) in {split} MoE layers")
    if kept:
        done.append(f"expert LoRA through PEFT (W + B A per call) in {kept} MoE layers: split needs "
                    f"model.model.experts_implementation: {FAST_EXPERTS} and experts that run it (gated, without "
                    "biases or a post-expert norm, not expert-parallel)")
    if loaded.quantized is not None and loaded.moe:
        _quantized_experts_backward(loaded, done)
    if speed.keep_expert_outputs != "none" or speed.keep_attention_outputs:
        done.append(apply_recompute(loaded, speed))
    if speed.compile:
        done.append(f"compiled (torch.compile): {', '.join(loaded.compile(packed=speed.packing))}")
    return done


def _peft_expert_lora(loaded: LoadedModel) -> bool:
    """Whether any expert LoRA runs through PEFT's path (W + B A per call) after `speed.expert_lora` was applied."""
    return any(type(w) is not SplitLoraExperts for w in outer_param_wrappers(loaded.model))


def _quantized_experts_backward(loaded: LoadedModel, done: list[str]) -> None:
    """Refuses a quantised MoE base that needs gradient checkpointing without it; else sets how FP8 experts backward.

    Which bases need it is `checkpointing_required`'s rule; here it knows which expert LoRA stayed on PEFT's path.
    """
    checkpointing = gradient_checkpointing_on(loaded.language_model())
    reason = checkpointing_required(loaded.quantized.quant_type, loaded.moe, _peft_expert_lora(loaded))
    if reason and not checkpointing:
        raise UsageError(reason)
    if set_expert_backward(loaded.model, checkpointing) and not checkpointing:
        done.append("frozen FP8 experts dequantised again in the backward (no checkpointing)")


def apply_recompute(loaded: LoadedModel, speed: SpeedArgs) -> str:
    """Applies `speed.keep_expert_outputs` and `speed.keep_attention_outputs` (one of them on); returns the log line.

    After `speed.expert_lora` (the split is what makes the expert products frozen) and before the compile.

    Raises:
        UsageError: `recompute_refusal`'s cases, or experts that mgmlora's experts forward hands
            to transformers'.
    """
    llm, keep = loaded.language_model(), speed.keep_expert_outputs
    refusal = recompute_refusal(keep, speed.keep_attention_outputs, loaded.moe, gradient_checkpointing_on(llm),
                                experts_implementation(llm.config), attn_implementation(llm.config),
                                _peft_expert_lora(loaded))
    handed_back = [name for name, m in llm.named_modules() if hasattr(m, "gate_up_proj") and not supports_lora(m)]
    if refusal or (handed_back and keep != "none"):
        raise UsageError(refusal or f"model.speed.keep_expert_outputs: {keep} keeps the products of mgmlora's experts "
                         f"forward, which hands {handed_back[0]} (expert-parallel, biased, gate-less or post-normed) "
                         "to transformers': set it to none.")
    effective = effective_keep(keep, speed.compile)
    set_recompute(llm, effective, speed.keep_attention_outputs)
    kept = []
    if keep != "none":
        why = "" if effective == keep else " (gate_up in effect: compiled layers never recompute the down projection)"
        kept.append(f"expert GEMM outputs ({keep}{why})")
    if speed.keep_attention_outputs:
        kept.append("attention outputs")
    return f"{' and '.join(kept)} kept for the backward; the recompute reads them"


class CompileWatch:
    """Says after the first training step whether `speed.compile` compiled anything (torch.compile falls back silently).

    A region dynamo cannot trace runs eagerly without an error: the run is then as slow as without `compile` while
    its config says otherwise (transformers 5.25's checkpointed layers did that before
    mgmlora.models.torch_private.trace_through_checkpoint_side_effects). Created before the first compiled call.
    """

    def __init__(self) -> None:
        self.graphs, self.breaks = self._counts()

    @staticmethod
    def _counts() -> tuple[int, dict[str, int]]:
        """Dynamo's process-wide counts less the compiled chunk loss's (`speed.loss: compiled` is not a region)."""
        graphs, breaks = dynamo_counts()
        loss_graphs, loss_breaks = compiled_loss_counts()
        return graphs - loss_graphs, {k: n - loss_breaks.get(k, 0) for k, n in breaks.items()}

    def outcome(self) -> tuple[bool, str | None]:
        """(whether anything compiled, a line for the log: why not, or the graph breaks that split what did)."""
        added, new = dynamo_counts_added((self.graphs, self.breaks), self._counts())
        first = next(iter(new), "").strip().splitlines()
        why = f"; {sum(new.values())} graph break(s), first: {first[0]}" if first else ""
        if added == 0:
            return False, (f"speed.compile is on, but torch.compile compiled nothing in the first step{why}: the model "
                           "runs eagerly. Set model.speed.compile: false, or run with TORCH_LOGS=graph_breaks to see "
                           "where tracing stops.")
        return True, f"speed.compile: {added} graph(s) compiled{why}" if why else None

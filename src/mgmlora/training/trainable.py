"""Trainability per component: language model, multimodal projector, vision towers.

The language model trains through LoRA, is frozen, or trains in full; the multimodal projector (MGM's `mm_projector`
+ patch-info-mining `vlm_uni_*`) trains in full or is frozen; the vision towers are always frozen, in eval mode,
under no_grad.

MGM's recipes in these terms: stage 1 = llm frozen + projector full; stage 2 LoRA = llm lora + projector full (the
original LoRA path, where the projector and mining modules stayed trainable); full fine-tune = llm full + projector
full.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mgmlora.errors import UsageError
from mgmlora.models import LoadedModel
from mgmlora.training.lora import LoraArgs, LoraPlan, apply_lora, plan_lora

# how each optional component (LoadedModel.components) is named in reports and the memory estimate
LABELS = {"projector": "projector + mining", "towers": "vision towers"}


@dataclass
class Trainability:
    """Which components train.

    Attributes:
        llm: lora (PEFT adapters on the decoder layers), frozen, or full (every LLM weight; needs the memory).
        projector: MGM's mm_projector and mining modules: full or frozen. Not applicable to text-only models.
        towers: vision towers; frozen is the only supported choice: their parameters are frozen here, and the MGM
            model runs them in eval mode under no_grad. The key stays so that configs state it (every shipped
            config writes it).
    """

    llm: Literal["lora", "frozen", "full"] = "lora"
    projector: Literal["full", "frozen"] = "full"
    towers: Literal["frozen"] = "frozen"


def apply_trainability(loaded: LoadedModel, lora: LoraArgs,
                       trainable: Trainability) -> tuple[nn.Module, LoraPlan | None]:
    """Freezes and unfreezes the components of `loaded.model`, wrapping it with LoRA when `trainable.llm` is lora.

    Raises:
        ValueError: when nothing would train.
        UsageError: a quantised base (NF4 or FP8) with anything but LoRA training the language model, with DoRA on
            mgmlora's own quantised layers (which quantised MoE bases need gradient checkpointing is
            mgmlora.training.fastpath's check, once LoRA is on).
    """
    model, plan = loaded.model, None
    if loaded.quantized is not None:
        if trainable.llm != "lora":
            raise UsageError(f"model.model.quantization keeps the language model frozen in {loaded.quantized.bits} "
                             f"bits: set model.trainable.llm: lora (it is {trainable.llm}) or "
                             "model.model.quantization: null.")
        if lora.use_dora and not getattr(model, "is_loaded_in_4bit", False):
            raise UsageError("model.lora.use_dora reads the base weight as a float matrix, which mgmlora's quantised "
                             "layers do not hold (bitsandbytes' 4-bit layers do, where installed): set "
                             "model.lora.use_dora: false or model.model.quantization: null.")
    if trainable.llm == "lora":
        plan = plan_lora(model, lora, decoder_layers=loaded.decoder_layers, moe=loaded.moe)
        model = apply_lora(model, plan)  # PEFT freezes every base weight
    else:
        model.requires_grad_(False)
        if trainable.llm == "full":
            loaded.language_model().requires_grad_(True)
    for component, prefixes in loaded.components.items():  # e.g. MGM's projector (full) and towers (frozen)
        train = getattr(trainable, component) == "full"  # towers: Literal["frozen"], never full
        for name, param in loaded.model.named_parameters():
            if name.startswith(prefixes):
                param.requires_grad_(train)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"nothing would train: trainable.llm={trainable.llm}, trainable.projector="
                         f"{trainable.projector} on a {loaded.info.family} model.")
    return model, plan


def check_resume(saved: dict | None, current: Trainability, components: Iterable[str]) -> None:
    """Refuses to resume a run whose checkpoint trained other components than this config does.

    The optimizer state in the checkpoint holds one entry per trainable parameter of the run that wrote it; with other
    `trainable.*` settings, Lightning fails deep inside the optimizer load ("different number of parameter groups")
    or, worse, when the counts happen to match, pairs Adam moments with the wrong parameters. `saved` is the
    checkpoint's `trainable` hyper-parameters (None for checkpoints without them: nothing to compare); `components`
    the optional components this model has (`LoadedModel.components`: a text model has no projector).

    Raises:
        ValueError: naming each `model.trainable.*` key that differs, both values and the fix.
    """
    keys = ("llm", *components)
    diffs = [f"model.trainable.{k}: checkpoint {saved[k]!r} vs config {getattr(current, k)!r}"
             for k in keys if saved and k in saved and saved[k] != getattr(current, k)]
    if diffs:
        raise ValueError(f"cannot resume: the checkpoint was trained with other trainable settings ("
                         f"{'; '.join(diffs)}), so its optimizer state belongs to other parameters. Set these keys "
                         "back to the checkpoint's values to resume, or start a new run without ckpt_path to train "
                         "with the new ones.")


def component_of(name: str, components: dict[str, tuple[str, ...]]) -> str | None:
    """The component (`components`' key) that owns the parameter `name` (PEFT-wrapped or not); None: the LLM's."""
    name = name.removeprefix("base_model.model.")
    return next((c for c, prefixes in components.items() if name.startswith(prefixes)), None)


def component_counts(model: nn.Module, components: dict[str, tuple[str, ...]]) -> dict[str, tuple[int, int]]:
    """(trainable, total) parameter counts per component: LLM, LoRA adapters, and `components` (LoadedModel's)."""
    groups: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        owner = component_of(name, components)
        key = "lora adapters" if "lora_" in name else LABELS.get(owner, owner) if owner else "language model"
        counts = groups.setdefault(key, [0, 0])
        counts[0] += param.numel() if param.requires_grad else 0
        counts[1] += param.numel()
    return {k: (t, n) for k, (t, n) in groups.items()}


def trains_language_model(model: nn.Module, components: dict[str, tuple[str, ...]]) -> bool:
    """Whether any trainable parameter (LoRA's included) lies outside `components`, i.e. in the language model."""
    return any(param.requires_grad and component_of(name, components) is None
               for name, param in model.named_parameters())


def component_report(model: nn.Module, components: dict[str, tuple[str, ...]]) -> str:
    """Trainable parameter counts per component, for the start-of-run report."""
    return "\n".join(f"  {k}: {t:,} trainable / {n:,}"
                     for k, (t, n) in component_counts(model, components).items())


def load_trainables(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copies saved trained weights (projector, mining, a fully trained LLM) into `model`'s parameters by name.

    Each tensor is cast to its parameter's dtype (a checkpoint written under DeepSpeed holds bf16 copies).

    Raises:
        ValueError: naming `source` and the saved names the model does not have (or whose shapes differ), before
            anything is copied.
    """
    params = dict(model.named_parameters())
    unknown = [k for k in tensors if k not in params]
    if unknown:
        raise ValueError(f"{source}: trained weights {unknown[:5]} do not exist in the model; was it saved from "
                         "another model or with other trainable.* settings?")
    shapes = [f"{k} {tuple(t.shape)} vs {tuple(params[k].shape)}" for k, t in tensors.items()
              if t.shape != params[k].shape]
    if shapes:
        raise ValueError(f"{source}: trained weights have other shapes than the model's: {shapes[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))

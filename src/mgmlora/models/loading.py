"""Loading any supported model behind one function: `load_model(ModelArgs) -> LoadedModel`.

The family is decided here, once: a registered family (`register_family`) that recognises the settings comes first;
then MGM, recognised by the `mm_*` keys of its config.json (or an MGM preset), never by `model_type` (original
checkpoints carry several names); everything else is a transformers causal LM.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from transformers import GenerationConfig

from mgmlora import offline
from mgmlora.errors import UsageError
from mgmlora.models.args import ModelArgs
from mgmlora.models.attention import packed_attention
from mgmlora.models.causal_lm import build_config, enable_gradient_checkpointing, is_moe, load_causal_lm, resolve_preset
from mgmlora.models.dtypes import DTYPES
from mgmlora.models.experts import FAST_EXPERTS
from mgmlora.models.experts import register as register_experts
from mgmlora.models.layerwise import CheckpointLayers, init_layer, init_rest
from mgmlora.models.loaded import LoadedCausalLM, LoadedMgm, LoadedModel, ModelInfo
from mgmlora.models.mgm_processor import MgmProcessor
from mgmlora.models.registry import MGM_PRESETS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """A model family beyond the built-in two (transformers causal LMs, MGM), added by `register_family`.

    Attributes:
        name: `ModelInfo.family` of its models (reports, errors).
        recognises: whether `ModelArgs` describe one of its models, from config files only.
        info: its `ModelInfo` (vocabulary, image tokens, `Processor`), from config files only.
        load: `(args, attn_implementation, weights) -> LoadedModel`; `weights=False` builds the architecture alone.
    """

    name: str
    recognises: Callable[[ModelArgs], bool]
    info: Callable[[ModelArgs], ModelInfo]
    load: Callable[[ModelArgs, str | None, bool], LoadedModel]


_FAMILIES: list[Family] = []


def register_family(family: Family) -> Callable[[], None]:
    """Makes `load_model` and `model_info` dispatch to `family`; returns the call that removes it again.

    An explicit call (in the code that defines the family, or a test), never an import-time side effect.
    """
    _FAMILIES.append(family)
    return lambda: _FAMILIES.remove(family)


def _registered(args: ModelArgs) -> Family | None:
    return next((family for family in _FAMILIES if family.recognises(args)), None)


def _mgm_config_dict(args: ModelArgs) -> dict | None:
    if args.model_path:
        path = Path(args.model_path) / "config.json"
        if path.is_file():
            raw = json.loads(path.read_text())
            return raw if "mm_vision_tower" in raw else None
        return None
    return MGM_PRESETS.get(args.preset)


def model_info(args: ModelArgs) -> ModelInfo:
    """Family, vocabulary and image geometry, from config files only."""
    offline.enforce()  # every loader is offline whoever calls it (mgmlora.offline)
    if (family := _registered(args)) is not None:
        return family.info(args)
    raw = _mgm_config_dict(args)
    if raw is None:
        return ModelInfo("causal_lm", build_config(args).vocab_size)
    from mgmlora.models.mgm import MGMConfig

    config = MGMConfig.from_dict(raw)
    clip = config.clip_config()
    image_tokens = (clip.image_size // clip.patch_size) ** 2
    processor = MgmProcessor(image_tokens, config.tokenizer_model_max_length, clip.image_size, config.image_size_aux)
    return ModelInfo("mgm", config.text["vocab_size"], image_tokens, clip.image_size, config.image_size_aux,
                     config.tokenizer_model_max_length, processor)


def load_model(args: ModelArgs, packing: bool = False, weights: bool = True, quantize: bool = True) -> LoadedModel:
    """Loads (or randomly initialises) the model `args` describes, with gradient checkpointing as configured.

    Args:
        args: the `model.model` config section.
        packing: the run's `speed.packing`; picks an attention implementation whose cost on packed rows is linear in
            the number of samples (mgmlora.models.attention): `sdpa` becomes mgmlora's packed SDPA.
        weights: False builds the architecture from config.json alone, even when `model_path` holds weights (the
            memory estimate builds it on the meta device).
        quantize: False, with `args.quantization` set, gives the quantised run's full-precision base instead: the
            same weights before quantisation (`export --merge` merges into it; bench/qlora_parity.py trains it).

    With `args.quantization` the decoder layers are quantised (NF4 or FP8) one at a time on the current default device
    (mgmlora.models.quantization); a text model is built on the meta device and each layer gets its values (from a
    safetensors checkpoint, or random init) on the device just before it is quantised (mgmlora.models.layerwise).
    """
    offline.enforce()
    register_experts()  # every path below may build fused experts with mgmlora_grouped_mm
    if args.quantization is not None and weights:
        device = torch.get_default_device()  # the run's device (Lightning's init context), meta for the estimate
        if device.type != "meta":
            return _load_quantized_base(args, packing, device, quantize)
    info = model_info(args)
    attn = packed_attention(args.attn_implementation, packing)
    if (family := _registered(args)) is not None:
        return family.load(args, attn, weights)
    if info.family == "causal_lm":
        model = load_causal_lm(args, attn, weights=weights)
        preset = resolve_preset(args)
        return LoadedCausalLM(model, info, preset.decoder_layers if preset else "model.layers", is_moe(model.config))
    from mgmlora.models.mgm import MGMConfig
    from mgmlora.models.mgm_checkpoint import build_mgm, load_mgm

    dtype = DTYPES[args.dtype]
    if args.model_path and weights:
        model = load_mgm(args.model_path, dtype, attn)
    else:
        model = build_mgm(MGMConfig.from_dict(_mgm_config_dict(args)), dtype, attn, seed=args.init_seed)
    model.llm.config.use_cache = False
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model.llm)
    return LoadedMgm(model, info, "llm.model.layers", moe=False)


def _load_quantized_base(args: ModelArgs, packing: bool, device: torch.device, quantize: bool) -> LoadedModel:
    """A quantised run's base on `device`: decoder layers in NF4 or FP8, or in the model dtype when not `quantize`.

    A text model is built on the meta device and each decoder layer gets its values on `device` just before it is
    quantised (mgmlora.models.layerwise): from a safetensors checkpoint that covers it exactly, or from the seeded
    initialiser. Anything else (MGM, another checkpoint layout, `.bin` files, the full-precision twin of real weights)
    is built whole in the model dtype first: from weight files on the CPU, so that the device never holds the whole
    model in the model dtype; from random init (benchmarks, tests) on `device` itself, where the seeded initialiser
    runs far faster than on the host (MGM-2B, about 6 GB in bf16, is then quantised layer by layer in place) and the
    quantised model and its full-precision twin (`quantize=False`, built on the caller's device) draw the same values.
    """
    plain = replace(args, quantization=None)
    loaded = prepare = finish = None
    if model_info(args).family == "causal_lm" and (quantize or not args.model_path):
        with torch.device("meta"):
            loaded = load_model(plain, packing, weights=False)
        if args.model_path:
            source = CheckpointLayers.plan(loaded.model, args.model_path)
            if isinstance(source, str):
                log.warning("mgmlora: %s, so it is read whole into host memory before it is quantised.", source)
                loaded = None
            else:
                prepare = partial(source.load_layer, loaded.model, device=device)
                finish = source.load_rest
                if (Path(args.model_path) / "generation_config.json").is_file():  # as from_pretrained reads it
                    loaded.model.generation_config = GenerationConfig.from_pretrained(args.model_path,
                                                                                      local_files_only=True)
        else:
            prepare, finish = partial(init_layer, loaded.model, device=device), init_rest
            torch.manual_seed(args.init_seed)  # one seed for every layer, drawn on the device
    if loaded is None:
        if not quantize:
            return load_model(plain, packing)
        with torch.device("cpu" if args.model_path else device):  # then quantised layer by layer on device
            loaded = load_model(plain, packing)
    if quantize and loaded.moe and args.experts_implementation != FAST_EXPERTS:
        raise UsageError(f"model.model.quantization on a MoE model needs model.model.experts_implementation: "
                         f"{FAST_EXPERTS} (the experts forward that runs quantised experts); it is "
                         f"{args.experts_implementation}.")
    layers = loaded.quantizable_modules()
    if quantize:
        loaded.quantize(args.quantization.resolved(args.dtype, device), device, prepare)
    else:
        for layer in layers:
            prepare(layer)
    if finish is not None:
        finish(loaded.model, layers, device)
    return loaded


def uses_moe(args: ModelArgs) -> bool:
    """Whether the language model's MLPs are fused mixture-of-experts, from config files only."""
    return model_info(args).family == "causal_lm" and is_moe(build_config(args))


def build_on_meta(args: ModelArgs) -> LoadedModel:
    """The model's architecture on the meta device, from config files only (no weights read, no memory used)."""
    with torch.device("meta"):
        return load_model(args, weights=False)


__all__ = ["Family", "build_on_meta", "load_model", "model_info", "register_family", "uses_moe"]

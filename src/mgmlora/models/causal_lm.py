"""Loading text causal LMs (Qwen3 dense and MoE, or any transformers causal LM) for LoRA training.

Weights come only from a local directory (`model_path`), or are randomly initialised from a registry preset (tiny
test models, or real shapes for benchmarks). Nothing is ever downloaded: every transformers call runs with
`local_files_only=True`, and remote code stays off unless the user turns it on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mgmlora import offline
from mgmlora.models import experts
from mgmlora.models.args import ModelArgs
from mgmlora.models.dtypes import DTYPES
from mgmlora.models.registry import MGM_PRESETS, MOE_MODEL_TYPES, ModelPreset, get_preset


def _check_model_dir(path: Path) -> None:
    """Fails early, naming what is missing, instead of letting transformers try the Hub."""
    if not path.is_dir():
        raise FileNotFoundError(f"model.model_path {str(path)!r} is not a directory. Point it at a local Hugging Face "
                                "model directory (with config.json and weight files); mgmlora never downloads.")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json is missing: model.model_path must be a Hugging Face model "
                                "directory (download it once with `hf download <repo> --local-dir <dir>`).")
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"{path} has config.json but no *.safetensors or *.bin weight files.")


def resolve_preset(args: ModelArgs) -> ModelPreset | None:
    """Returns the text-model registry preset for `args` (None for MGM presets or a bare `model_path`)."""
    return get_preset(args.preset) if args.preset and args.preset not in MGM_PRESETS else None


def is_moe(config) -> bool:
    """True when a text model's config describes mixture-of-experts MLPs with fused expert weights (the one test)."""
    return getattr(config, "model_type", None) in MOE_MODEL_TYPES


def expert_width(config) -> int:
    """One MoE expert's MLP width: `moe_intermediate_size` (Qwen's MoE), else `intermediate_size` (Mixtral, OLMoE)."""
    return getattr(config, "moe_intermediate_size", None) or config.intermediate_size


def head_dim(config) -> int:
    """One attention head's width: `head_dim` where the config sets it (Qwen3, Gemma), else hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def build_config(args: ModelArgs):
    """The transformers config of the model, without loading any weights."""
    offline.enforce()  # every loader is offline whoever calls it (mgmlora.offline)
    if args.model_path:
        _check_model_dir(Path(args.model_path))
        return AutoConfig.from_pretrained(
            args.model_path, local_files_only=True, trust_remote_code=args.trust_remote_code
        )
    preset = get_preset(args.preset)
    return AutoConfig.for_model(preset.model_type, **preset.architecture)


def load_causal_lm(args: ModelArgs, attn_implementation: str | None = None, weights: bool = True) -> PreTrainedModel:
    """Loads (or randomly initialises) the causal LM described by `args`, ready for LoRA.

    Safetensors are preferred over `.bin` files, and `.bin` files are read with `weights_only=True` (transformers'
    own behaviour, pinned here with `use_safetensors=None`). `attn_implementation` overrides the configured one
    (packed micro-batches load mgmlora's packed attention, mgmlora.models.attention). `weights=False` builds the
    architecture from the config alone (the memory estimate, on the meta device).
    """
    offline.enforce()
    dtype = DTYPES[args.dtype]
    common = dict(dtype=dtype, attn_implementation=attn_implementation or args.attn_implementation)
    if is_moe(build_config(args)):  # dense models refuse an experts implementation
        experts.register()  # mgmlora_grouped_mm, registered when a model may use it, never at import
        common["experts_implementation"] = args.experts_implementation
    if args.model_path and weights:
        _check_model_dir(Path(args.model_path))
        model = AutoModelForCausalLM.from_pretrained(
            args.model_path, local_files_only=True, trust_remote_code=args.trust_remote_code,
            use_safetensors=None, **common,
        )
    else:
        config = build_config(args)
        torch.manual_seed(args.init_seed)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code, **common)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: PreTrainedModel, context_fn: Callable | None = None) -> None:
    """Turns on non-reentrant activation checkpointing (again, replacing the settings, where it is on).

    Non-reentrant checkpointing works with frozen inputs (the embeddings of a LoRA model are frozen), so no input
    require-grad hook is needed. transformers 5.23 renamed the method to `activation_checkpointing_enable`; older 5.x
    releases (the GPU image runs 5.17) only have `gradient_checkpointing_enable`. `context_fn` is
    `torch.utils.checkpoint`'s: a selective-checkpointing policy (mgmlora.models.recompute).
    """
    kwargs = {"use_reentrant": False, **({"context_fn": context_fn} if context_fn else {})}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def gradient_checkpointing_on(model: PreTrainedModel) -> bool:
    """Whether activation checkpointing is on (transformers 5.23 renamed the flag; the GPU image's 5.17 has the old)."""
    new = hasattr(model, "is_activation_checkpointing")
    return bool(getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False))


def disable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Turns activation checkpointing off (the benchmark's no-recompute variant), under either method name."""
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer_dir(path: str | Path, key: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Loads the tokenizer in the local directory `path`, which the config key `key` set.

    Checked first because transformers takes a path that does not exist for a Hub repo id and fails with a chain of
    errors about repo names, and an empty directory with one about sentencepiece; neither names the key to fix.

    Raises:
        FileNotFoundError: naming `path`, what is missing and `key`.
    """
    offline.enforce()
    where = Path(path)
    if not where.is_dir():
        raise FileNotFoundError(f"{key}: tokenizer directory {str(path)!r} does not exist; set {key} to a local "
                                "directory with tokenizer.json (generate, score and export: --tokenizer_path; "
                                "mgmlora never downloads).")
    if not any((where / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{key}: {str(path)!r} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); set {key} "
                                "to the directory the model's tokenizer was saved in.")
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


def load_tokenizer(args: ModelArgs) -> PreTrainedTokenizerBase:
    """Loads the tokenizer from `tokenizer_path` or `model_path` and checks it can serve training.

    Raises:
        ValueError: when no tokenizer location is configured, or the tokenizer has no chat template.
        FileNotFoundError: when the configured directory does not exist or holds no tokenizer.
    """
    path = args.tokenizer_path or args.model_path
    if path is None:
        raise ValueError(f"model.preset={args.preset} has no bundled weights or tokenizer: set model.tokenizer_path "
                         "(tests/assets/tokenizer for the tiny presets) or model.model_path.")
    key = "model.model.tokenizer_path" if args.tokenizer_path else "model.model.model_path"
    return load_chat_tokenizer(path, key, args.trust_remote_code)


def load_chat_tokenizer(path: str | Path, key: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The one tokenizer loader (model side and data side): checks the chat template, falls back to eos for padding.

    `key` is the config key that named `path`, so an error says which setting to fix.

    Raises:
        ValueError: when the tokenizer has no chat template.
        FileNotFoundError: when the directory does not exist or holds no tokenizer.
    """
    tok = load_tokenizer_dir(path, key, trust_remote_code)
    if not tok.chat_template:
        raise ValueError(f"{key}: the tokenizer in {path} has no chat template; mgmlora builds prompts through it. Add "
                         "a chat_template.jinja to that directory.")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # only used for padding; padded positions are masked out of attention and loss
    return tok


def check_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Raises when the tokenizer can emit ids the embedding table does not have."""
    weight = model.get_input_embeddings().weight
    n_embed = (weight.ds_shape if hasattr(weight, "ds_shape") else weight.shape)[0]  # ZeRO-3 partitions are empty
    if len(tokenizer) > n_embed:
        raise ValueError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding table has "
                         f"{n_embed} rows; use the tokenizer that belongs to this model.")


def describe_source(args: ModelArgs) -> str:
    """One line saying where the weights come from, for the start-of-run report."""
    if args.model_path:
        cfg = json.loads((Path(args.model_path) / "config.json").read_text())
        return f"weights from {args.model_path} ({cfg.get('model_type', '?')})"
    return f"random init of preset {args.preset} (seed {args.init_seed})"

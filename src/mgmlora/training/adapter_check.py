"""Checks on an adapter read from disk, before any of it is applied: files, config fields, tensor names, shapes, dtypes.

Every path that puts a saved adapter on a model (resume, validate and test through LoraLitModule; export, merge,
generate, score and the leaderboard through mgmlora.tools.export) runs these first, so a wrong or damaged adapter is
refused with one line naming the file, the key and the fix instead of being half-applied:

- `read_lora_config` / `read_tensors`: a malformed `adapter_config.json` or a truncated / corrupt safetensors file is
  a one-line error naming the file, not a library traceback;
- `check_lora_config`: a field we do not implement (another `init_lora_weights` such as PiSSA, which rewrites the
  base weights; LoftQ; DoRA variants; layer replication; ...) set to anything but PEFT's default is refused: PEFT
  would apply it silently, and the result would not be the model that was trained;
- `check_adapter_tensors`: the saved tensors must be exactly the ones the configured LoRA creates on this base: a
  missing tensor (PEFT leaves it at its fresh initialisation and says nothing), an extra one, one that names a frozen
  base weight, a shape that differs, or a dtype that is not floating point is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import load_file

from mgmlora.errors import MgmloraError

# LoraConfig fields mgmlora trains, loads and merges as PEFT defines them (the rest must keep PEFT's default)
IMPLEMENTED = frozenset({
    "r", "lora_alpha", "lora_dropout", "bias", "target_modules", "target_parameters", "use_rslora", "use_dora",
    "init_lora_weights", "exclude_modules", "modules_to_save", "rank_pattern", "alpha_pattern", "task_type",
    "base_model_name_or_path", "revision", "inference_mode", "peft_type", "peft_version", "auto_mapping",
    "megatron_core",
})
INIT_VALUES = (True, False, "gaussian", "orthogonal")  # inits that leave the base weights as they are


class AdapterError(MgmloraError):
    """A saved adapter that cannot be applied as it is: damaged, of another shape, or using what mgmlora lacks."""


def read_lora_config(path: Path) -> LoraConfig:
    """`adapter_config.json` as a LoraConfig, refused in one line when it is not JSON or not a LoRA config."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"{path}: not a valid adapter_config.json ({error}); re-export the adapter from its "
                           "checkpoint.") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, found {type(data).__name__}; re-export the adapter.")
    return lora_config_from(data, path)


def lora_config_from(data: dict | LoraConfig, source: Path | str) -> LoraConfig:
    """A LoraConfig from saved fields, after `check_lora_config`; unknown field names are refused too."""
    if isinstance(data, LoraConfig):
        config = data
    else:
        known = set(LoraConfig().to_dict())
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(f"{source}: adapter config field(s) {unknown} are not LoRA settings this PEFT knows; "
                               "the adapter was written by another tool or version: re-export it with mgmlora.")
        if data.get("peft_type", "LORA") not in ("LORA", None):
            raise AdapterError(f"{source}: peft_type {data['peft_type']!r} is not LORA; mgmlora loads LoRA adapters.")
        check_lora_config(data, source)  # before PEFT's own validation, which names fewer of the causes
        try:
            config = LoraConfig(**data)
        except (TypeError, ValueError) as error:
            raise AdapterError(f"{source}: invalid adapter config: {error}") from None
    check_lora_config(config, source)
    return config


def check_lora_config(config: LoraConfig | dict, source: Path | str) -> None:
    """Refuses fields mgmlora does not implement set to anything but PEFT's default (module docstring)."""
    defaults = LoraConfig().to_dict()
    values = config.to_dict() if isinstance(config, LoraConfig) else config
    if values.get("init_lora_weights", True) not in INIT_VALUES:
        raise AdapterError(f"{source}: init_lora_weights {values['init_lora_weights']!r} is not supported (only "
                           f"{list(INIT_VALUES)}): such inits rewrite the base weights, so the adapter does not fit "
                           "the original base; merge it with the tool that trained it.")
    for key, value in values.items():
        if key in IMPLEMENTED or key not in defaults:
            continue
        default = defaults[key]
        if value != default and not (value in (None, {}, [], False) and default in (None, {}, [], False)):
            raise AdapterError(f"{source}: adapter config field {key} = {value!r} is not supported by mgmlora "
                               f"(only PEFT's default {default!r}); it would change the model silently.")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or a one-line error naming it when it is truncated or not safetensors."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise AdapterError(f"{path}: unreadable safetensors file ({error}); the file is truncated or damaged "
                           "(a copy cut short?): copy it again or use an earlier checkpoint.") from None


def check_adapter_tensors(source: Path | str, expected: dict[str, torch.Tensor],
                          given: dict[str, torch.Tensor]) -> None:
    """Refuses saved adapter tensors that are not exactly those the configured LoRA creates (module docstring).

    Args:
        source: the file or directory the tensors came from (named in the message).
        expected: the model's adapter state dict (`get_peft_model_state_dict`), for names, shapes and dtypes.
        given: the saved tensors, in the same naming.
    """
    for key, tensor in given.items():
        if key not in expected:
            if ".lora_" not in key and "modules_to_save" not in key:
                raise AdapterError(f"{source}: tensor {key} names a frozen base weight, which an adapter never "
                                   "holds; this file is not an adapter of this model (or was altered).")
            raise AdapterError(f"{source}: adapter tensor {key} does not exist in the configured LoRA on this base "
                               f"({len(given)} saved, {len(expected)} expected); check lora.target_modules and the "
                               "base model against the run that saved it.")
        want = expected[key]
        if not tensor.is_floating_point():
            raise AdapterError(f"{source}: adapter tensor {key} has dtype {tensor.dtype}, not a floating-point type; "
                               "the file is damaged or not an adapter.")
        if tuple(tensor.shape) != tuple(want.shape):
            raise AdapterError(f"{source}: adapter tensor {key} has shape {tuple(tensor.shape)}, the configured LoRA "
                               f"on this base needs {tuple(want.shape)}; check lora.r / rank_pattern and the base "
                               "model against the run that saved it.")
    missing = [k for k in expected if k not in given]
    if missing:
        raise AdapterError(f"{source}: {len(missing)} adapter tensor(s) missing, e.g. {missing[0]}; they would stay "
                           "at their fresh initialisation. The file is incomplete, or lora.target_modules differs "
                           "from the run that saved it.")


__all__ = ["AdapterError", "check_adapter_tensors", "check_lora_config", "lora_config_from", "read_lora_config",
           "read_tensors"]

"""QLoRA's base built one decoder layer at a time on the run's device, from a meta-device build.

Why: Qwen3-30B-A3B is 56.9 GiB in bf16 against a 24 GiB device and, for many of the people QLoRA serves, less host RAM
than that. Built whole first (what `from_config` and `from_pretrained` do), it needs the model's size in RAM, and for
random init minutes of CPU `normal_`; built whole on the device, it does not fit. Here a layer holds model-dtype memory
only from the moment it gets its values until it is quantised (`init_layer` or `CheckpointLayers.load_layer` is the
`prepare` step of mgmlora.models.quantization.quantize_layers), so the host never holds more than one layer's tensors
either. Every tensor is NaN until it gets a value, so a tensor that nothing filled is named in an error instead of
training on leftover memory.

Two sources of values:
- random init: the model's own initialiser (`mgmlora.models.transformers_private.init_module`), seeded once
  (mgmlora.models.loading), in a fixed order (layers first, then the rest), so the values depend only on the seed and
  the device type: a 4-bit run and its full-precision twin (the 4-bit vs bf16 comparison, `export --merge` of a
  random-init run) start from identical weights. They are not the values `from_config` draws for the same seed (it
  initialises every linear twice, torch's own init then transformers', in another order), so only QLoRA's random
  init takes this path: every other random init keeps its established values.
- a local safetensors checkpoint (`CheckpointLayers`): each layer's tensors are read from the shards when the layer
  is built (safetensors reads one tensor at a time). Checkpoints store MoE experts one module per expert (Qwen3-MoE
  on the Hub, and what transformers 5 writes); they are fused into the model's 3-D `gate_up_proj` (E, 2I, H) and
  `down_proj` (E, H, I) as transformers' own loader does (per expert, gate rows then up rows). A checkpoint this
  does not cover exactly (another layout, `.bin` files) is loaded by `from_pretrained` on the CPU instead
  (mgmlora.models.loading says why in the log).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from mgmlora.models.shards import safetensors_files
from mgmlora.models.transformers_private import init_module


def _empty(module: nn.Module, device: torch.device, recurse: bool) -> None:
    # NaN, not whatever memory held: a value the initialiser skips stays detectable (_check_initialised)
    module.to_empty(device=device, recurse=recurse)
    for tensor in [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]:
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))


def _check_initialised(named: list[tuple[str, torch.Tensor]]) -> None:
    missed = [name for name, tensor in named if tensor.is_floating_point() and tensor.isnan().any()]
    if missed:
        raise RuntimeError(f"the layer-by-layer build left {len(missed)} tensors without values, first {missed[0]}: "
                           "neither the model's initialiser (its _init_weights) nor the checkpoint covers them.")


@torch.no_grad()
def _build_layer(layer: nn.Module, device: torch.device, fill: Callable[[], None]) -> None:
    _empty(layer, device, recurse=True)
    fill()
    _check_initialised([*layer.named_parameters(), *layer.named_buffers()])


@torch.no_grad()
def _build_rest(model: nn.Module, done: Iterable[nn.Module], device: torch.device,
                fill: Callable[[str, nn.Module], None]) -> None:
    """Builds what lies outside the `done` layers (embeddings, final norm, rotary frequencies, LM head).

    Module by module: memory on `device`, then `fill(name, module)` gives the module's own tensors their values; tied
    weights are re-tied and every tensor checked at the end.
    """
    inside = {id(module) for layer in done for module in layer.modules()}
    rest = [(name, module) for name, module in model.named_modules() if id(module) not in inside]
    for prefix, module in rest:
        _empty(module, device, recurse=False)
        fill(prefix, module)
    model.tie_weights()  # a tied LM head pointed at the embedding's meta tensor
    _check_initialised([(f"{prefix}.{name}".lstrip("."), tensor) for prefix, module in rest
                        for name, tensor in [*module.named_parameters(recurse=False),
                                             *module.named_buffers(recurse=False)]])


def init_layer(model: nn.Module, layer: nn.Module, device: torch.device) -> None:
    """Gives every parameter and buffer of `layer` (a meta-device module of `model`) memory on `device`, initialised.

    Raises:
        RuntimeError: naming a tensor the model's initialiser left unset.
    """
    def fill() -> None:
        for module in layer.modules():
            init_module(model, module)

    _build_layer(layer, device, fill)


def init_rest(model: nn.Module, done: Iterable[nn.Module], device: torch.device) -> None:
    """Initialises what lies outside the `done` layers on `device` and re-ties tied weights.

    Raises:
        RuntimeError: naming a tensor the model's initialiser left unset.
    """
    _build_rest(model, done, device, lambda _, module: init_module(model, module))


EXPERT_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}  # fused <- per expert


@dataclass
class CheckpointLayers:
    """Where each tensor of a meta-device model lives in a local safetensors checkpoint, read layer by layer.

    Attributes:
        sources: the model's tensor name -> the checkpoint keys it is made of (one key, or E per fused expert part).
        files: checkpoint key -> shard file.
    """

    sources: dict[str, list[str]]
    files: dict[str, Path]

    @classmethod
    def plan(cls, model: nn.Module, model_dir: str | Path) -> CheckpointLayers | str:
        """The plan for `model` (on the meta device) from the checkpoint in `model_dir`, or why there is none.

        Reads only the shards' headers. Every persistent tensor of the model must come from the checkpoint with its
        exact shape (a tied LM head may be missing: it is tied after loading).
        """
        model_dir = Path(model_dir)
        files = safetensors_files(model_dir)
        if files is None:
            return f"{model_dir} has no safetensors checkpoint"
        shapes = {}
        for path in sorted(set(files.values())):
            with safe_open(str(path), framework="pt") as shard:
                shapes.update({key: tuple(shard.get_slice(key).get_shape()) for key in shard.keys()})
        tied = {name for name, param in model.named_parameters(remove_duplicate=False)} - \
            {name for name, param in model.named_parameters()}  # the second name of a tied parameter
        sources = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            keys = _expert_keys(name, tensor) if name not in shapes else [name]
            if keys is None or any(key not in shapes for key in keys):
                if name in tied:
                    continue
                return f"{name} is not in the checkpoint under that name"
            got = (len(keys), *shapes[keys[0]]) if keys != [name] else shapes[name]
            if name.endswith(".gate_up_proj"):  # (E, I, H) gate and (E, I, H) up -> (E, 2I, H)
                got = (got[0] // 2, 2 * got[1], *got[2:])
            if tuple(got) != tuple(tensor.shape):
                return f"{name} has shape {tuple(tensor.shape)} in the model but {tuple(got)} in the checkpoint"
            sources[name] = keys
        return cls(sources, files)

    def _read(self, name: str, like: torch.Tensor, shards: dict[Path, Any]) -> torch.Tensor:
        keys = self.sources[name]
        tensors = [shards[self.files[key]].get_tensor(key) for key in keys]  # one tensor read at a time
        if keys == [name]:
            value = tensors[0]
        else:  # per-expert parts -> (E, ...) each, joined along the output rows (transformers' own order)
            per_part = len(keys) // len(EXPERT_PARTS[name.rsplit(".", 1)[1]])
            parts = [torch.stack(tensors[i:i + per_part]) for i in range(0, len(keys), per_part)]
            value = torch.cat(parts, dim=1)  # (E, I, H) x2 -> (E, 2I, H), or (E, H, I) as is
        return value.to(device=like.device, dtype=like.dtype)

    def _fill(self, named: dict[str, torch.Tensor]) -> None:
        named = {name: tensor for name, tensor in named.items() if name in self.sources}
        with ExitStack() as stack:  # each shard this module needs opened once (its header parsed once)
            paths = {self.files[key] for name in named for key in self.sources[name]}
            shards = {path: stack.enter_context(safe_open(str(path), framework="pt")) for path in paths}
            for name, tensor in named.items():
                tensor.copy_(self._read(name, tensor, shards))

    def load_layer(self, model: nn.Module, layer: nn.Module, device: torch.device) -> None:
        """Gives `layer` (a meta-device decoder layer of `model`) memory on `device` and its checkpoint values.

        Raises:
            RuntimeError: naming a tensor left without a value.
        """
        prefix = _names(model)[id(layer)]
        _build_layer(layer, device, lambda: self._fill({f"{prefix}.{name}": tensor for name, tensor
                                                         in layer.state_dict(keep_vars=True).items()}))

    def load_rest(self, model: nn.Module, done: Iterable[nn.Module], device: torch.device) -> None:
        """Loads what lies outside the `done` layers, recomputes rotary frequencies, re-ties tied weights.

        Buffers a checkpoint never holds (non-persistent, e.g. rotary `inv_freq`) are recomputed by the model's
        initialiser, on modules that have nothing else of their own (so nothing loaded is overwritten).

        Raises:
            RuntimeError: naming a tensor left without a value.
        """
        def fill(prefix: str, module: nn.Module) -> None:
            own = {name: tensor for name, tensor in module.state_dict(keep_vars=True).items() if "." not in name}
            self._fill({f"{prefix}.{name}" if prefix else name: tensor for name, tensor in own.items()})
            if not own and list(module.buffers(recurse=False)):  # only non-persistent buffers
                init_module(model, module)

        _build_rest(model, done, device, fill)


def _expert_keys(name: str, tensor: torch.Tensor) -> list[str] | None:
    """The per-expert checkpoint keys a fused expert parameter is made of (None for any other tensor)."""
    prefix, _, part = name.rpartition(".")
    if part not in EXPERT_PARTS or tensor.ndim != 3 or not prefix.endswith(".experts"):
        return None
    return [f"{prefix}.{e}.{piece}.weight" for piece in EXPERT_PARTS[part] for e in range(tensor.shape[0])]


def _names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


__all__ = ["CheckpointLayers", "init_layer", "init_rest"]

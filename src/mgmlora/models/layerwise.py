"""Random init at real shapes, one decoder layer at a time on the run's device, from a meta-device build.

Why: QLoRA benchmarks and tests run random weights at real shapes, and Qwen3-30B-A3B is 56.9 GiB in bf16 against a
24 GiB device budget. Built whole on the CPU first (what `from_config` does), it needs the model's size in RAM and
minutes of CPU `normal_` (152 s for 6 of its 48 layers on the H200 host); built whole on the device, it does not fit.
Here a layer holds model-dtype memory only from its initialisation until it is quantised (`init_layer` is the
`prepare` step of mgmlora.models.quantization.quantize_layers), and the initialisation runs on the device, where it
is fast. The seed is set once before the first layer (mgmlora.models.loading).

The values come from the model's own initialiser (`mgmlora.models.transformers_private.init_module`), seeded once, in
a fixed order (layers first, then the rest), so they depend only on the seed and the device type: a 4-bit run and its
full-precision twin (the 4-bit vs bf16 comparison, `export --merge` of a random-init run) start from identical
weights. They are not the values `from_config` draws for the same seed (it initialises every linear twice, torch's
own init then transformers', in another order), so only QLoRA's random init takes this path: every other random init
keeps its established values.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

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
        raise RuntimeError(f"random init left {len(missed)} tensors uninitialised, first {missed[0]}: the model's "
                           "initialiser (its _init_weights) does not cover them; load real weights with "
                           "model.model.model_path instead.")


@torch.no_grad()
def init_layer(model: nn.Module, layer: nn.Module, device: torch.device) -> None:
    """Gives every parameter and buffer of `layer` (a meta-device module of `model`) memory on `device`, initialised.

    Raises:
        RuntimeError: naming a tensor the model's initialiser left unset.
    """
    _empty(layer, device, recurse=True)
    for module in layer.modules():
        init_module(model, module)
    _check_initialised([*layer.named_parameters(), *layer.named_buffers()])


@torch.no_grad()
def init_rest(model: nn.Module, done: Iterable[nn.Module], device: torch.device) -> None:
    """Initialises what lies outside the `done` layers on `device` and re-ties tied weights.

    Outside the layers: embeddings, final norm, rotary frequencies, LM head.

    Raises:
        RuntimeError: naming a tensor the model's initialiser left unset.
    """
    inside = {id(module) for layer in done for module in layer.modules()}
    rest = [(name, module) for name, module in model.named_modules() if id(module) not in inside]
    for _, module in rest:
        _empty(module, device, recurse=False)
        init_module(model, module)
    model.tie_weights()  # a tied LM head pointed at the embedding's meta tensor
    _check_initialised([(f"{prefix}.{name}".lstrip("."), tensor) for prefix, module in rest
                        for name, tensor in [*module.named_parameters(recurse=False),
                                             *module.named_buffers(recurse=False)]])


__all__ = ["init_layer", "init_rest"]

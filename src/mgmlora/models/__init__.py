"""Models: loading every supported family behind one interface, and the family behaviour the training core asks for.

- `args`: ModelArgs (the `model.model` config section).
- `loading`: `load_model(args) -> LoadedModel` and `model_info(args) -> ModelInfo` (config files only).
- `loaded`: `LoadedModel` and its families (`LoadedCausalLM`, `LoadedMgm`): the one place the families differ.
- `causal_lm`, `mgm`, `mgm_checkpoint`, `convnext`: the loaders and MGM's own modules.
- `attention`, `packing`, `experts`, `head`: the fast path's model-level pieces (packed attention, packed rows,
  mgmlora's grouped-GEMM experts, the LM head the fast losses call).
- `registry`: model presets as data.
- `processor`, `mgm_processor`: what the data side asks an image-text family (template, image transform, tensors);
  MGM's.
"""

from mgmlora.models.args import ModelArgs
from mgmlora.models.loaded import LoadedModel, ModelInfo
from mgmlora.models.loading import Family, build_on_meta, load_model, model_info, register_family, uses_moe

__all__ = ["Family", "LoadedModel", "ModelArgs", "ModelInfo", "build_on_meta", "load_model", "model_info",
           "register_family", "uses_moe"]

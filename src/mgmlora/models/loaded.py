"""A loaded model and its family's behaviour: the one place where a text causal LM and MGM differ.

Everything outside `mgmlora.models` asks the loaded model (`LoadedModel`) instead of branching on the family: which
module is the language model, how a batch becomes final hidden states, which components besides the language model
can train, how a merged model is written. `ModelInfo` is what the data side needs before any weight exists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from mgmlora.batch import IMAGE_TOKEN_INDEX, Batch
from mgmlora.models.attention import packed_compile_options, varlen_kwargs
from mgmlora.models.causal_lm import head_dim
from mgmlora.models.generation import GenerationArgs, generate_batch
from mgmlora.models.head import output_head
from mgmlora.models.packing import pack_padded
from mgmlora.models.processor import Processor
from mgmlora.models.quantization import QuantizationArgs, quantize_layers
from mgmlora.models.shards import INDEX, write_index
from mgmlora.models.torch_private import trace_through_checkpoint_side_effects, uncompile

Family = str  # "causal_lm", "mgm", or a registered family's name (mgmlora.models.loading.register_family)


class Forward(NamedTuple):
    """What `LoadedModel.forward_hidden` returns: the input of the loss (mgmlora.training.loss.lm_loss)."""

    hidden: torch.Tensor  # (B, T, H), or (1, N, H) packed: final hidden states before the LM head
    labels: torch.Tensor  # (B, T) / (1, N), aligned with `hidden`
    head: nn.Module  # the LM head with the family's logit transforms (mgmlora.models.head)
    host_labels: torch.Tensor | None = None  # `labels` on the CPU where known without a device sync


@dataclass
class ModelInfo:
    """What the data side and the LightningModule need to know before any weight is loaded."""

    family: Family
    vocab_size: int
    image_tokens: int = 0  # image embeddings per image (576 for MGM-2B); 0 = the model takes no images
    image_size: int = 0  # CLIP input size (336)
    image_size_aux: int = 0  # ConvNeXt input size (768)
    max_length: int = 0  # MGM: truncation length after image expansion (tokenizer_model_max_length)
    processor: Processor | None = None  # template, image transform and image tensors of an image-text family

    @property
    def takes_images(self) -> bool:
        """Whether batches may carry images (and prompts an image placeholder)."""
        return self.image_tokens > 0


@dataclass
class LoadedModel(ABC):
    """A loaded base model, where its LoRA targets live, and its family's behaviour.

    `model` is the base module. PEFT injects its LoRA layers into it in place (`get_peft_model(model)` wraps the
    same object), so every method below also runs the adapted model.

    Attributes:
        model: the base model (transformers causal LM, or MGMForCausalLM).
        info: family, vocabulary and image geometry.
        decoder_layers: dotted path of the decoder layer list inside `model` (LoRA anchoring, fast path).
        moe: whether the language model's MLPs are fused mixture-of-experts.
        quantized: the quantisation settings when the frozen decoder weights are NF4 or FP8, else None.
    """

    model: nn.Module
    info: ModelInfo
    decoder_layers: str
    moe: bool
    quantized: QuantizationArgs | None = None  # set by `quantize`: the base's decoder weights are NF4 or FP8

    # trainable components besides the language model: config name (model.trainable.<name>) -> parameter prefixes
    components: ClassVar[dict[str, tuple[str, ...]]] = {}

    @abstractmethod
    def language_model(self) -> nn.Module:
        """The transformers causal LM inside (embeddings, decoder, head, generation, text config)."""

    @abstractmethod
    def forward_hidden(self, batch: Batch, packed: bool, pad_to: int = 0) -> Forward:
        """Runs the model up to (not through) the LM head: final hidden states, labels aligned with them, the head.

        `packed` drops padding (mgmlora.models.packing) and `pad_to` then pads the packed row to a multiple of that many
        positions with a segment of its own. Returns hidden (B, T, H), or (1, N, H) when packed, labels of the same
        leading shape, the head module (with the family's logit transforms, mgmlora.models.head) and, where the batch
        carries its CPU copy (`Batch.on_host`), the labels on the CPU: data-dependent shapes are read there, so the
        forward and the loss queue their work without waiting for the GPU.
        """

    def reaches_components(self, batch: Batch) -> bool:
        """Whether `batch` sends a gradient to the components besides the language model (`components`).

        A batch that does not leaves their gradients exactly zero: for a run that trains only those, no sign that
        the run stopped learning (mgmlora.training.finite). Every batch does, unless a family says otherwise.
        """
        return True

    def generate(self, tokenizer, rows: list[list[int]], args: GenerationArgs,
                 model_inputs: dict[str, torch.Tensor] | None = None) -> list[list[str]]:
        """Replies to prompt token ids with the (adapted) model, as `mgmlora.models.generation.generate_batch`.

        The caller switches to eval mode; `model_inputs` (each (B, ...), `Processor.image_inputs` stacked) are for
        families that take more than text.
        """
        return generate_batch(self.model, tokenizer, rows, args, model_inputs)

    def save_merged(self, model: nn.Module, out: Path, max_shard_bytes: int) -> None:
        """Writes a merged (adapter-free) `model` as a standalone checkpoint in the family's own layout, with an index.

        transformers writes no index for a one-file checkpoint; loaders that read only the index (MGM's) need one.
        """
        model.config.use_cache = True  # a serving checkpoint
        model.save_pretrained(str(out), max_shard_size=max_shard_bytes, safe_serialization=True)
        if not (out / INDEX).is_file():
            write_index(out)

    def compile(self, packed: bool = False, backend: str = "inductor", **options) -> list[str]:
        """Compiles the family's hot regions in place (`speed.compile`); returns what was compiled, for the run's log.

        Regional compilation, as PyTorch's tutorial on it recommends: each decoder layer on its own (the layers share
        code, so one graph serves them all, and a graph break cannot spread to the whole model). `nn.Module.compile`
        keeps the module objects, so names, state dict keys, PEFT wrappers and hooks are untouched.

        A layer whose MoE experts carry LoRA through PEFT's own path is compiled around them instead: its largest
        submodules without such experts (attention, norms, router) each on its own, the experts eager
        (`eager_regions`).

        `packed`: the layers take packed rows (`speed.packing`), whose attention is PyTorch's varlen op on a GPU; they
        compile with `packed_compile_options` (no stride padding where it would make that op compute wrong values).
        `options` are torch.compile's keyword arguments.
        """
        layers = self._compiled_layers()
        trace_through_checkpoint_side_effects()  # else a checkpointed layer may compile nothing (torch_private)
        eager = eager_regions(layers)
        layer_options = options
        if packed and backend == "inductor":  # the padding is inductor's; other backends take no such options
            width = head_dim(self.language_model().config.get_text_config())
            if inductor := packed_compile_options(width):
                if "mode" in options:  # torch.compile takes `mode` or `options`, not both
                    raise ValueError(f"packed layers with {width}-wide heads compile with inductor options "
                                     f"{inductor}, which torch.compile refuses beside mode={options['mode']!r}")
                layer_options = {**options, "options": {**options.get("options", {}), **inductor}}
        for layer in layers:
            for region in compile_regions(layer, eager):
                region.compile(backend=backend, **layer_options)
        if eager:
            return [f"{len(layers)} decoder layers, around their {len(eager)} LoRA-adapted expert modules (eager)"]
        return [f"{len(layers)} decoder layers"]

    def uncompile(self) -> None:
        """Undoes `compile` (the benchmark compares variants on one model)."""
        for module in self._compiled_layers().modules():
            uncompile(module)

    def _compiled_layers(self) -> nn.Module:
        try:
            return self.model.get_submodule(self.decoder_layers)
        except AttributeError:
            raise ValueError(f"speed.compile: the model has no decoder layer list at {self.decoder_layers!r} (the "
                             "registry's `decoder_layers` for presets, else `model.layers`); add a preset for this "
                             "architecture or set speed.compile: false.") from None

    def mining_dims(self) -> tuple[int, int] | None:
        """(aux-tower channels, CLIP hidden size) of MGM's patch-info mining, None for models without it."""
        return None

    def quantizable_modules(self) -> nn.Module:
        """The modules quantisation stores in fewer bits: the language model's decoder layers (MGM's towers stay)."""
        return self.model.get_submodule(self.decoder_layers)

    def quantize(self, args: QuantizationArgs, device: torch.device,
                 prepare: Callable[[nn.Module], None] | None = None) -> dict[str, int]:
        """Stores the frozen decoder weights in NF4 or FP8 on `device`, layer by layer (mgmlora.models.quantization).

        `prepare(layer)` runs on each layer first (random init of a meta-device model, mgmlora.models.layerwise).
        """
        counts = quantize_layers(self.quantizable_modules(), args, device, prepare)
        self.quantized = args
        # PEFT injects its bitsandbytes QLoRA layer (lora.bnb.Linear4bit) only on a model that says it is 4-bit
        self.model.is_loaded_in_4bit = args.resolved_backend(torch.device(device)) == "bitsandbytes"
        return counts


def eager_regions(layers: nn.Module) -> list[nn.Module]:
    """The modules inside `layers` that `LoadedModel.compile` leaves out: PEFT's LoRA wrappers of fused MoE experts.

    PEFT adapts a 3-D expert parameter (`target_parameters`, `ParamWrapper`) by registering a parametrization on the
    experts module for the length of each call, and `torch.nn.utils.parametrize` does that by swapping the module's
    class for a new subclass each time. Traced by dynamo, every call then fails its guards on that class and compiles
    again, until `recompile_limit` (8) is reached and the code falls back to eager from that call on. With gradient
    checkpointing, a layer whose forward ran one of the compiled graphs and whose recompute then ran eagerly (or the
    other way round) saves different tensors: torch.utils.checkpoint's CheckpointError ("Recomputed values for the
    following tensors have different metadata than during the forward pass"), Qwen3-30B-A3B's first step on the GPU
    with torch 2.11 and transformers 5.17. Run eagerly, the experts take the same path in the forward and the
    recompute, and nothing recompiles.
    Only the outermost wrapper is listed (PEFT nests one per adapted parameter), and only where it runs PEFT's own
    forward: split expert LoRA (`speed.expert_lora: split`, mgmlora.training.expert_lora) registers nothing and
    compiles with its layer.
    """
    from peft.tuners.lora import ParamWrapper  # imported here: mgmlora.models does not depend on PEFT otherwise

    return [m for m in outer_param_wrappers(layers) if type(m).forward is ParamWrapper.forward]


def outer_param_wrappers(module: nn.Module) -> list[nn.Module]:
    """The outermost of PEFT's `ParamWrapper`s on each adapted module inside `module` (PEFT nests one per parameter)."""
    from peft.tuners.lora import ParamWrapper

    found: list[nn.Module] = []
    inner: set[int] = set()
    for wrapper in module.modules():
        if isinstance(wrapper, ParamWrapper) and id(wrapper) not in inner:
            found.append(wrapper)
            nested = wrapper.base_layer
            while isinstance(nested, ParamWrapper):
                inner.add(id(nested))
                nested = nested.base_layer
    return found


def compile_regions(module: nn.Module, eager: list[nn.Module]) -> list[nn.Module]:
    """The largest submodules of `module` (itself included) that contain none of the `eager` modules."""
    inside = {id(m) for m in module.modules()}
    if not any(id(m) in inside for m in eager):
        return [module]
    if any(m is module for m in eager):
        return []
    return [region for child in module.children() for region in compile_regions(child, eager)]


class LoadedCausalLM(LoadedModel):
    """A transformers causal LM (Qwen3 dense or MoE, or any AutoModelForCausalLM)."""

    def language_model(self) -> nn.Module:  # noqa: D102
        return self.model

    def forward_hidden(self, batch: Batch, packed: bool, pad_to: int = 0) -> Forward:  # noqa: D102
        ids, mask, labels, positions, segments = batch.input_ids, batch.attention_mask, batch.labels, None, {}
        host = batch.on_host()
        host_labels = host.labels if host is not None else None
        if packed:
            row = pack_padded(ids, mask, labels, pad_to, host)  # (B, T) -> (1, N)
            ids, positions, labels, mask, host_labels = row.values, row.positions, row.labels, None, row.host_labels
            segments = varlen_kwargs(row.lengths, ids.device)  # per-sample attention from the segment lengths
        decoder = getattr(self.model, self.model.base_model_prefix)  # e.g. Qwen3ForCausalLM.model
        # no KV cache: with one, transformers would also ignore the packed layout's restarting positions
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **segments)
        return Forward(out.last_hidden_state, labels, output_head(self.model), host_labels)


PROJECTOR_PREFIXES = ("mm_projector.", "vlm_uni_query_projector.", "vlm_uni_aux_projector.", "vlm_uni_val_projector.")
TOWER_PREFIXES = ("vision_tower.", "vision_tower_aux.")


class LoadedMgm(LoadedModel):
    """MGM: Gemma LLM (`model.llm`), CLIP and ConvNeXt towers, projector and patch-info mining modules."""

    components: ClassVar[dict[str, tuple[str, ...]]] = {"projector": PROJECTOR_PREFIXES, "towers": TOWER_PREFIXES}

    def language_model(self) -> nn.Module:  # noqa: D102
        return self.model.llm

    def forward_hidden(self, batch: Batch, packed: bool, pad_to: int = 0) -> Forward:  # noqa: D102
        # MGM aligns the labels with its image-expanded sequence (each placeholder becomes image_tokens ignored labels)
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                         packed=packed, pad_to=pad_to, hidden_only=True, host=batch.on_host(),
                         **batch.model_inputs)  # images, images_aux
        return Forward(out.hidden_states, out.labels, output_head(self.model.llm), out.host_labels)

    def reaches_components(self, batch: Batch) -> bool:
        """Only a batch with an image reaches the towers, mining and projector.

        Text-only rows keep the projector in the graph at zero weight. Read from the batch's CPU copy where it has one.
        """
        host = batch.on_host()
        return bool(((host if host is not None else batch).input_ids == IMAGE_TOKEN_INDEX).any())

    def generate(self, tokenizer, rows: list[list[int]], args: GenerationArgs,
                 model_inputs: dict[str, torch.Tensor] | None = None) -> list[list[str]]:
        """Replies to prompts with one image each (MGM splices them in exactly as in training)."""
        if not model_inputs:  # a text-only prompt still needs image tensors of the right size (MGM's blank image)
            raise ValueError("LoadedMgm.generate needs images and images_aux (MgmProcessor.image_inputs(None, ...) "
                             "for a prompt without an image).")
        return generate_batch(self.model, tokenizer, rows, args, model_inputs)

    def save_merged(self, model: nn.Module, out: Path, max_shard_bytes: int) -> None:  # noqa: D102
        from mgmlora.models.mgm_checkpoint import save_mgm

        save_mgm(model, out, max_shard_bytes)  # the original checkpoint's key names, so MGM's own code loads it

    def mining_dims(self) -> tuple[int, int] | None:  # noqa: D102
        return self.model.config.mm_hidden_size_aux, self.model.config.mm_hidden_size

    def compile(self, packed: bool = False, backend: str = "inductor", **options) -> list[str]:
        """Compiles the decoder layers and the image path (both frozen towers; upsampling, mining and projector)."""
        done = super().compile(packed, backend, **options)
        self.model.compile_image_path(backend, **options)
        return done + ["the image path (CLIP and ConvNeXt towers; upsampling, mining and projector)"]

    def uncompile(self) -> None:  # noqa: D102
        super().uncompile()
        self.model.uncompile_image_path()


__all__ = ["Family", "Forward", "LoadedCausalLM", "LoadedMgm", "LoadedModel", "ModelInfo", "PROJECTOR_PREFIXES",
           "TOWER_PREFIXES"]

"""LoRA through PEFT: named presets, targets anchored to the decoder layers, expert handling, and an audit.

Why not hand PEFT a list of leaf names (`["q_proj", "v_proj"]`)? PEFT matches list entries as *suffixes* of any module
name, so in a multimodal model the vision tower's `q_proj`/`v_proj` would be adapted too (MGM's own training code
only avoided that through call order). mgmlora therefore compiles the leaf names into one regex anchored on the
language model's decoder-layer path, resolves it against the model before PEFT runs, and audits afterwards that
exactly the resolved modules, and nothing else, carry LoRA.

Mixture-of-experts (Qwen3-MoE in transformers 5): experts are fused 3-D parameters (`mlp.experts.gate_up_proj`
[E, 2I, H], `mlp.experts.down_proj` [E, H, I]), not `nn.Linear`. PEFT adapts them through `ParamWrapper`, which
rejects `lora_dropout != 0` and, at r=64 on every expert of Qwen3-30B-A3B, makes an adapter of billions of
parameters. Expert adaptation is therefore an explicit switch (`target_experts`, off by default). When it is on,
dropout stays on the attention/dense LoRA layers and is 0 on the experts (the only setting PEFT supports there).
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from torch import nn

from mgmlora.errors import SettingsError
from mgmlora.models.registry import ATTENTION_PROJECTIONS, MLP_PROJECTIONS

PresetName = Literal["conservative", "balanced", "aggressive", "chameleons"]
_ALL = ATTENTION_PROJECTIONS + MLP_PROJECTIONS

# The four named presets (README.md lists them). Anything here can be overridden.
LORA_PRESETS: dict[str, dict] = {
    "conservative": dict(r=8, lora_alpha=16, lora_dropout=0.1, bias="none", target_modules=["q_proj", "v_proj"]),
    "balanced": dict(
        r=16, lora_alpha=32, lora_dropout=0.1, bias="none",
        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "aggressive": dict(r=32, lora_alpha=64, lora_dropout=0.1, bias="none", target_modules=list(_ALL)),
    "chameleons": dict(r=64, lora_alpha=128, lora_dropout=0.05, bias="none", target_modules=list(_ALL)),
}

# transformers 5 fuses the experts' gate and up projections into one parameter; PEFT gives it rank 2r and alpha 2α,
# which keeps α/r (the LoRA scale) equal to that of separate gate/up adapters. mgmlora follows PEFT's convention.
_EXPERT_PARAMS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


@dataclass
class LoraArgs:
    """LoRA settings, named as in `peft.LoraConfig`. A null field takes the preset's value.

    Attributes:
        preset: conservative (r8, q/v), balanced (r16, q/v/o + MLP), aggressive (r32, all projections) or
            chameleons (r64, all projections, dropout 0.05).
        r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = lora_alpha / r, or / sqrt(r) with use_rslora).
        lora_dropout: dropout on the LoRA input (not applied on MoE experts, where PEFT cannot do it).
        bias: which biases train: none, all, lora_only.
        target_modules: leaf names of projections inside the decoder layers (q_proj, k_proj, v_proj, o_proj,
            gate_proj, up_proj, down_proj, or any other nn.Linear leaf name there). Always anchored to the language
            model's decoder layers: a vision tower's q_proj is never matched.
        target_experts: also adapt MoE expert weights (gate_up_proj / down_proj) for the MLP names in target_modules.
            Off by default: on Qwen3-30B-A3B at r=64 it adds about 4 billion trainable parameters.
        use_rslora: rank-stabilised scaling lora_alpha / sqrt(r).
        use_dora: weight-decomposed LoRA (DoRA). Not supported on MoE experts.
        init_lora_weights: true (B = 0, the adapter starts as a no-op), false, gaussian or orthogonal. PiSSA-style
            inits that rewrite the base weights are not offered: the saved adapter would not fit the original base.
        exclude_modules: module names (list: exact or suffix match) or one regex (string) never to adapt.
        modules_to_save: modules trained in full and saved with the adapter (e.g. lm_head).
    """

    preset: PresetName = "balanced"
    r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    bias: Literal["none", "all", "lora_only"] | None = None
    target_modules: list[str] | None = None
    target_experts: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | Literal["gaussian", "orthogonal"] = True
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        resolved = self.resolved()
        problems = []
        if resolved["r"] < 1:
            problems.append(f"model.lora.r must be >= 1 (got {resolved['r']})")
        if not 0.0 <= resolved["lora_dropout"] < 1.0:
            problems.append(f"model.lora.lora_dropout must be in [0, 1) (got {resolved['lora_dropout']})")
        if not resolved["target_modules"]:
            problems.append("model.lora.target_modules is empty")
        if problems:
            raise SettingsError("; ".join(problems))

    def resolved(self) -> dict:
        """The effective values: the preset, overridden by every non-null field."""
        values = dict(LORA_PRESETS[self.preset])
        for key in ("r", "lora_alpha", "lora_dropout", "bias", "target_modules"):
            if getattr(self, key) is not None:
                values[key] = getattr(self, key)
        return values


@dataclass
class LoraPlan:
    """What will be adapted, resolved against a concrete model before PEFT runs."""

    config: LoraConfig
    modules: list[str]  # full names of nn.Linear modules that get LoRA
    expert_params: list[str]  # full names of fused expert parameters that get LoRA
    dropout: float  # the requested dropout (the PEFT config holds 0 when experts are targeted)
    skipped_experts: list[str]  # MLP leaf names that matched nothing because the experts are fused and not targeted


def _anchored_regex(decoder_layers: str, leaves: list[str]) -> str:
    # Any module path inside a decoder layer ending in one of the leaves, except under `.experts.` (fused experts are
    # only adapted through target_parameters; the lookahead also stops PEFT's v4->v5 MoE remap from probing them).
    leaf_alt = "|".join(re.escape(leaf) for leaf in leaves)
    return rf"^{re.escape(decoder_layers)}\.\d+\.(?!(?:.*\.)?experts\.)(?:.*\.)?(?:{leaf_alt})$"


def _excluded(name: str, exclude: list[str] | str | None) -> bool:
    """PEFT's `exclude_modules` semantics: a string is a full-match regex, a list matches exact names or suffixes."""
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return any(name == e or name.endswith("." + e) for e in exclude)


def plan_lora(model: nn.Module, args: LoraArgs, decoder_layers: str = "model.layers", moe: bool = False) -> LoraPlan:
    """Resolves `args` against `model`: which modules and expert parameters get LoRA, and the PEFT config.

    Raises:
        ValueError: naming the offending key and the valid choices, for targets that match nothing, experts
            requested on a dense model, half of a fused expert pair, or settings PEFT cannot apply to experts.
    """
    values = args.resolved()
    leaves = list(dict.fromkeys(values["target_modules"]))
    regex = _anchored_regex(decoder_layers, leaves)
    pattern = re.compile(regex)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    matched = [n for n in linear_names if pattern.match(n)]
    modules = [n for n in matched if not _excluded(n, args.exclude_modules)]
    in_layers = sorted({n.rsplit(".", 1)[-1] for n in linear_names if n.startswith(decoder_layers + ".")})
    matched_leaves = {n.rsplit(".", 1)[-1] for n in matched}
    mlp_leaves = [leaf for leaf in leaves if leaf in MLP_PROJECTIONS]

    expert_params: list[str] = []
    skipped: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, int] = {}
    if args.target_experts and not moe:
        raise ValueError("lora.target_experts is on but this model has no mixture-of-experts layers; set it to false.")
    if moe and not args.target_experts:
        skipped = [leaf for leaf in mlp_leaves if leaf not in matched_leaves]
    if moe and args.target_experts:
        fused = [n for n, _ in model.named_parameters() if ".experts." in n and n.rsplit(".", 1)[-1] in _EXPERT_PARAMS]
        problems = []
        for param, parts in _EXPERT_PARAMS.items():
            present = [p for p in parts if p in mlp_leaves]
            if present and len(present) < len(parts):
                problems.append(f"lora.target_modules has {present} without {sorted(set(parts) - set(present))}: they "
                                f"are fused into mlp.experts.{param} in transformers 5, so target both or neither")
            elif present:
                expert_params += [n for n in fused if n.endswith("." + param)
                                  and not _excluded(n, args.exclude_modules)]
                if len(parts) > 1:
                    rank_pattern[rf".*\.{param}"] = values["r"] * len(parts)
                    alpha_pattern[rf".*\.{param}"] = values["lora_alpha"] * len(parts)
        if args.use_dora:
            problems.append("lora.use_dora is not supported on MoE experts (PEFT ParamWrapper); turn one of them off")
        if values["bias"] != "none":
            problems.append("lora.bias must be `none` when lora.target_experts is on (PEFT ParamWrapper)")
        if not expert_params and not problems:
            problems.append("lora.target_experts is on but lora.target_modules names no expert projection "
                            "(gate_proj + up_proj and/or down_proj)")
        if problems:
            raise ValueError("; ".join(problems))

    unknown = [leaf for leaf in leaves if leaf not in matched_leaves and leaf not in skipped
               and not (args.target_experts and leaf in mlp_leaves)]
    if unknown:
        raise ValueError(f"lora.target_modules {unknown} match no nn.Linear inside {decoder_layers}.*. Linear leaf "
                         f"names available there: {in_layers}.")
    if not modules and not expert_params:
        raise ValueError(f"LoRA would adapt nothing: lora.target_modules={leaves}, exclude_modules="
                         f"{args.exclude_modules}. Linear leaf names in {decoder_layers}.*: {in_layers}.")

    layer_prefix = re.compile(rf"^{re.escape(decoder_layers)}\.\d+\.")
    config = LoraConfig(
        r=values["r"],
        lora_alpha=values["lora_alpha"],
        # PEFT's ParamWrapper refuses dropout; apply_lora puts it back on the nn.Linear adapters only.
        lora_dropout=0.0 if expert_params else values["lora_dropout"],
        bias=values["bias"],
        target_modules=regex if modules else None,
        target_parameters=sorted({layer_prefix.sub("", n) for n in expert_params}) or None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=args.use_rslora,
        use_dora=args.use_dora,
        init_lora_weights=args.init_lora_weights,
        exclude_modules=args.exclude_modules,
        modules_to_save=args.modules_to_save,
        # PeftModelForCausalLM for transformers LMs (generation helpers); a plain PeftModel for composite models.
        task_type="CAUSAL_LM" if hasattr(model, "prepare_inputs_for_generation") else None,
    )
    return LoraPlan(config, modules, expert_params, values["lora_dropout"], skipped)


def inject_lora(model: nn.Module, config: LoraConfig) -> PeftModel:
    """PEFT's `get_peft_model` (LoRA layers injected into `model` itself), without its false pattern warning.

    PEFT checks rank/alpha patterns against `target_modules` only and warns that the experts' `gate_up_proj` pattern
    (`plan_lora`: twice the rank for the fused gate and up halves) "matched nothing and was ignored", although it
    applies it to the parameter wrapper (`lora_report` reads the real ranks; a reload with the wrong rank would fail
    on the tensors' shapes). Training and every tool that applies a run's adapter come through here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match any targeted module.*")
        return get_peft_model(model, config)


def apply_lora(model: nn.Module, plan: LoraPlan) -> PeftModel:
    """Wraps `model` with PEFT according to `plan`, then audits the result.

    Raises:
        ValueError: with the plan's context instead of PEFT's bare message, if PEFT refuses the config.
        RuntimeError: if the adapted modules differ from the plan (the audit).
    """
    try:
        peft_model = inject_lora(model, plan.config)
    except ValueError as err:
        raise ValueError(f"PEFT refused the LoRA config ({err}). Planned targets: {len(plan.modules)} modules, "
                         f"{len(plan.expert_params)} expert parameters; config: {plan.config}") from err
    if plan.expert_params and plan.dropout > 0:
        # The saved adapter_config.json keeps lora_dropout=0 (dropout is a training-time detail, and a non-zero value
        # would make PEFT refuse to reload the expert adapter); the run's config.yaml records the real value.
        for module in peft_model.modules():
            if isinstance(module, LoraLinear):
                module.lora_dropout["default"] = nn.Dropout(plan.dropout)
    audit_lora(peft_model, plan)
    return peft_model


_BASE_LAYER = re.compile(r"(\.base_layer)+$")


def adapted_names(peft_model: nn.Module) -> tuple[list[str], list[str]]:
    """Names (relative to the wrapped model) of LoRA-adapted modules and of LoRA-adapted fused parameters."""
    modules, params = [], []
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or not module.lora_A:
            continue
        name = name.removeprefix(prefix)
        if isinstance(module, ParamWrapper):  # nested wrappers when two parameters of one module are adapted
            params.append(_BASE_LAYER.sub("", name) + "." + module.parameter_name)
        else:
            modules.append(name)
    return sorted(modules), sorted(params)


def audit_lora(peft_model: nn.Module, plan: LoraPlan) -> None:
    """Checks that LoRA sits exactly where the plan says and nowhere else (e.g. never in a vision tower).

    Raises:
        RuntimeError: listing the modules PEFT adapted beyond the plan, or the planned ones it missed.
    """
    modules, params = adapted_names(peft_model)
    extra = sorted(set(modules) - set(plan.modules)) + sorted(set(params) - set(plan.expert_params))
    missing = sorted(set(plan.modules) - set(modules)) + sorted(set(plan.expert_params) - set(params))
    if extra or missing:
        raise RuntimeError(f"LoRA audit failed: adapted outside the plan {extra[:8]}, planned but not adapted "
                           f"{missing[:8]}. Refusing to train an adapter that differs from the configuration.")


def group_names(names: list[str]) -> dict[str, int]:
    """Collapses layer indices: `model.layers.3.self_attn.q_proj` -> `model.layers.*.self_attn.q_proj`, with counts."""
    groups: dict[str, int] = defaultdict(int)
    for n in names:
        groups[re.sub(r"\.\d+\.", ".*.", n)] += 1
    return dict(sorted(groups.items()))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting DeepSpeed ZeRO-3 partitions by their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def lora_report(peft_model: nn.Module, plan: LoraPlan) -> str:
    """Human-readable summary printed at the start of a run: counts, adapted groups, what was left out and why."""
    trainable, total = count_parameters(peft_model)
    modules, params = adapted_names(peft_model)
    cfg = plan.config
    lines = [
        f"LoRA r={cfg.r} alpha={cfg.lora_alpha} dropout={plan.dropout} rslora={cfg.use_rslora} dora={cfg.use_dora}",
        f"trainable params: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.4f}%)",
        "adapted module groups:",
    ]
    lines += [f"  {g}  x{n}" for g, n in group_names(modules).items()]
    if params:
        lines.append("adapted expert parameters (LoRA per expert, no dropout):")
        ranks = {m.parameter_name: m.r["default"] for m in peft_model.modules() if isinstance(m, ParamWrapper)}
        lines += [f"  {g}  x{n}  r={ranks[g.rsplit('.', 1)[-1]]}" for g, n in group_names(params).items()]
    if plan.skipped_experts:
        lines.append(f"not adapted: {plan.skipped_experts} on MoE layers (fused experts; set lora.target_experts: "
                     "true to adapt them)")
    if cfg.modules_to_save:
        lines.append(f"trained in full and saved with the adapter: {cfg.modules_to_save}")
    return "\n".join(lines)

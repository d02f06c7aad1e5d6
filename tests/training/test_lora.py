import re
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import ParamWrapper
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from mgmlora.training.lora import (
    LORA_PRESETS,
    LoraArgs,
    apply_lora,
    audit_lora,
    inject_lora,
    lora_report,
    plan_lora,
)
from tests.conftest import tiny_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# The presets as documented (LoraArgs' docstring and the README), written out by hand rather than copied from
# LORA_PRESETS: (r, lora_alpha, lora_dropout, adapted leaf names). alpha is 2r throughout (README's LoRA presets).
DOCUMENTED = {
    "conservative": (8, 16, 0.1, {"q_proj", "v_proj"}),
    "balanced": (16, 32, 0.1, {"q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "aggressive": (32, 64, 0.1, set(ALL)),
    "chameleons": (64, 128, 0.05, set(ALL)),
}


@pytest.mark.parametrize("preset", sorted(DOCUMENTED))
def test_each_preset_adapts_what_its_documentation_says(preset):
    r, alpha, dropout, leaves = DOCUMENTED[preset]
    plan = plan_lora(tiny_model(), LoraArgs(preset=preset))
    assert (plan.config.r, plan.config.lora_alpha, plan.dropout, plan.config.bias) == (r, alpha, dropout, "none")
    # what PEFT really adapts in the 2-layer model, not the table's own entries
    peft_model = apply_lora(tiny_model(), plan)
    adapted = {n for n, m in peft_model.named_modules() if isinstance(m, LoraLinear)}
    expected = {f"base_model.model.model.layers.{i}.{'self_attn' if leaf in ALL[:4] else 'mlp'}.{leaf}"
                for i in range(2) for leaf in leaves}
    assert adapted == expected
    assert all(m.r["default"] == r and m.scaling["default"] == alpha / r for m in peft_model.modules()
               if isinstance(m, LoraLinear))


def test_documented_ranks_are_the_presets_ranks():
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    in_readme = dict(re.findall(r"`(conservative|balanced|aggressive|chameleons)` r(\d+)", readme))
    in_docstring = dict(re.findall(r"(conservative|balanced|aggressive|chameleons) \(r(\d+)", LoraArgs.__doc__))
    documented = {name: str(values[0]) for name, values in DOCUMENTED.items()}
    assert in_readme == in_docstring == documented
    assert set(LORA_PRESETS) == set(DOCUMENTED)


def test_every_field_overrides_the_preset():
    args = LoraArgs(preset="conservative", r=4, lora_alpha=7, lora_dropout=0.0, target_modules=["o_proj"])
    assert args.resolved() == dict(r=4, lora_alpha=7, lora_dropout=0.0, bias="none", target_modules=["o_proj"])
    plan = plan_lora(tiny_model(), args)
    assert (plan.config.r, plan.config.lora_alpha, plan.config.lora_dropout) == (4, 7, 0.0)
    assert plan.modules == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]


@pytest.mark.parametrize("preset,lora", [
    ("tiny-qwen3", LoraArgs(preset="aggressive")),
    ("tiny-qwen3-moe", LoraArgs(preset="balanced")),
    ("tiny-qwen3-moe", LoraArgs(preset="chameleons", target_experts=True)),
])
def test_adapted_model_equals_base_model_at_init(preset, lora):
    base = tiny_model(preset).eval()
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        expected = base(input_ids=ids).logits.clone()
    peft_model = apply_lora(base, plan_lora(base, lora, moe=preset.endswith("moe"))).eval()
    assert any("lora_B" in n for n, _ in peft_model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=0, atol=0)


class _VisionLanguage(nn.Module):
    """A CLIP vision tower beside a Qwen3 LM: both have q_proj/k_proj/v_proj leaves."""

    def __init__(self):
        super().__init__()
        self.vision_tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, image_size=32, patch_size=8))
        self.llm = tiny_model()


def test_targets_are_anchored_to_the_language_model_not_the_vision_tower():
    # The trap this guards against: PEFT's own suffix matching adapts the vision tower too.
    naive = get_peft_model(_VisionLanguage(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert any("vision_tower" in n and "lora_" in n for n, _ in naive.named_parameters())

    model = _VisionLanguage()
    plan = plan_lora(model, LoraArgs(preset="aggressive"), decoder_layers="llm.model.layers")
    peft_model = apply_lora(model, plan)
    lora_params = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora_params and all(".llm.model.layers." in n for n in lora_params)
    assert not any("vision_tower" in n for n in lora_params)
    assert len(plan.modules) == 2 * 7


def test_audit_rejects_an_adapter_that_differs_from_the_plan():
    model = tiny_model()
    plan = plan_lora(model, LoraArgs(preset="conservative"))
    peft_model = apply_lora(model, plan)
    plan.modules = plan.modules[1:]
    with pytest.raises(RuntimeError, match="outside the plan"):
        audit_lora(peft_model, plan)


def test_exclude_modules_is_honoured():
    model = tiny_model()
    args = LoraArgs(preset="conservative", exclude_modules=["model.layers.0.self_attn.q_proj"])
    peft_model = apply_lora(model, plan := plan_lora(model, args))
    assert "model.layers.0.self_attn.q_proj" not in plan.modules
    assert not isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj, LoraLinear)
    assert isinstance(peft_model.base_model.model.model.layers[1].self_attn.q_proj, LoraLinear)


def test_moe_experts_are_off_by_default_and_reported():
    model = tiny_model("tiny-qwen3-moe")
    plan = plan_lora(model, LoraArgs(preset="chameleons"), moe=True)
    peft_model = apply_lora(model, plan)
    assert not any(isinstance(m, ParamWrapper) for m in peft_model.modules())
    report = lora_report(peft_model, plan)
    assert "not adapted: ['gate_proj', 'up_proj', 'down_proj']" in report and "target_experts" in report
    assert all(m.lora_dropout["default"].p == 0.05 for m in peft_model.modules() if isinstance(m, LoraLinear))


def test_moe_experts_on_keep_dropout_on_attention_and_use_peft_fused_ranks():
    # PEFT alone raises "lora.ParamWrapper does not work with lora_dropout != 0" for this config.
    model = tiny_model("tiny-qwen3-moe")
    with pytest.raises(ValueError, match="lora_dropout != 0"):
        get_peft_model(tiny_model("tiny-qwen3-moe"), LoraConfig(r=8, lora_dropout=0.05, target_modules=ALL))
    plan = plan_lora(model, LoraArgs(preset="chameleons", target_experts=True), moe=True)
    peft_model = apply_lora(model, plan)
    wrappers = {m.parameter_name: m for m in peft_model.modules() if isinstance(m, ParamWrapper)}
    assert wrappers["gate_up_proj"].r["default"] == 128 and wrappers["down_proj"].r["default"] == 64
    assert wrappers["gate_up_proj"].scaling["default"] == wrappers["down_proj"].scaling["default"] == 2.0
    linears = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    assert linears and all(isinstance(m.lora_dropout["default"], nn.Dropout) for m in linears)
    assert all(m.lora_dropout["default"].p == 0.05 for m in linears)
    assert "adapted expert parameters" in lora_report(peft_model, plan)


def test_a_saved_expert_adapter_config_applies_its_gate_up_rank_without_peft_s_false_warning():
    # what export, generate and score do with a run's adapter_config.json: PEFT alone warns that the gate_up rank
    # pattern was ignored (it checks patterns against target_modules only), yet applies it
    plan = plan_lora(tiny_model("tiny-qwen3-moe"), LoraArgs(preset="chameleons", target_experts=True), moe=True)
    saved = LoraConfig(**{**plan.config.to_dict(), "inference_mode": True})
    with pytest.warns(RuntimeWarning, match="rank_pattern keys did not match"):
        get_peft_model(tiny_model("tiny-qwen3-moe"), LoraConfig(**saved.to_dict()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        peft_model = inject_lora(tiny_model("tiny-qwen3-moe"), saved)
    ranks = {m.parameter_name: m.r["default"] for m in peft_model.modules() if isinstance(m, ParamWrapper)}
    assert ranks == {"gate_up_proj": 2 * 64, "down_proj": 64}  # the chameleons preset's r, doubled for gate and up


@pytest.mark.parametrize("args,moe,message", [
    (LoraArgs(target_modules=["qq_proj"]), False, r"match no nn.Linear.*available there: \['down_proj'"),
    (LoraArgs(target_experts=True), False, "no mixture-of-experts"),
    (LoraArgs(target_modules=["q_proj", "gate_proj"], target_experts=True), True, "without \\['up_proj'\\]"),
    (LoraArgs(preset="aggressive", target_experts=True, use_dora=True), True, "use_dora"),
    (LoraArgs(target_modules=["q_proj"], exclude_modules=".*q_proj"), False, "adapt nothing"),
])
def test_bad_lora_settings_fail_before_peft_with_the_key_named(args, moe, message):
    with pytest.raises(ValueError, match=message):
        plan_lora(tiny_model("tiny-qwen3-moe" if moe else "tiny-qwen3"), args, moe=moe)


def test_invalid_values_are_rejected_at_construction():
    with pytest.raises(ValueError, match="lora.r"):
        LoraArgs(r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraArgs(lora_dropout=1.5)

"""The fence on transformers' private attributes (mgmlora.models.transformers_private) still reads what it names."""

from mgmlora.models.args import ModelArgs
from mgmlora.models.causal_lm import load_causal_lm
from mgmlora.models.transformers_private import attn_implementation, experts_implementation


def test_attention_and_experts_readers_follow_the_public_setters():
    model = load_causal_lm(ModelArgs(preset="tiny-qwen3-moe", dtype="float32", attn_implementation="sdpa",
                                     experts_implementation="eager"))
    assert attn_implementation(model.config) == "sdpa"  # what from_pretrained's public argument asked for
    assert experts_implementation(model.config) == "eager"
    model.set_attn_implementation("eager")
    model.set_experts_implementation("grouped_mm")
    assert attn_implementation(model.config) == "eager"
    assert experts_implementation(model.config) == "grouped_mm"

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


def test_init_module_initialises_one_module_as_the_model_does():
    import torch

    from mgmlora.models.transformers_private import init_module

    model = load_causal_lm(ModelArgs(preset="tiny-qwen3-moe", dtype="float32"))
    experts, norm = model.model.layers[0].mlp.experts, model.model.layers[0].input_layernorm
    with torch.no_grad():
        experts.gate_up_proj.fill_(5.0), norm.weight.fill_(5.0)
    init_module(model, experts)  # Qwen3-MoE's own rule: normal(0, initializer_range)
    init_module(model, norm)
    std = model.config.initializer_range
    assert abs(experts.gate_up_proj.std().item() - std) < 0.1 * std
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))


def test_checkpoint_inside_forward_says_where_the_layer_checkpoint_runs():
    import torch

    from mgmlora.models.causal_lm import enable_gradient_checkpointing
    from mgmlora.models.transformers_private import checkpoint_inside_forward

    model = load_causal_lm(ModelArgs(preset="tiny-qwen3", dtype="float32"))
    enable_gradient_checkpointing(model)
    model.train()
    layer = model.model.layers[0]
    wrapped = []

    def record(fn, *args, **kwargs):  # the layer's checkpoint function: what does it checkpoint?
        wrapped.append(fn.func if hasattr(fn, "func") else fn)
        return fn(*args, **kwargs)

    layer._gradient_checkpointing_func = record
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    model(input_ids=ids)
    assert wrapped, "the layer was not checkpointed through _gradient_checkpointing_func"
    inside = getattr(wrapped[0], "__name__", "") == "forward"  # the layer's own forward, not Module.__call__
    assert checkpoint_inside_forward() == inside

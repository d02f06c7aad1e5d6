"""The fence on PEFT's private parts (mgmlora.models.peft_private) still reads what it names."""

import torch

from mgmlora.models.peft_private import lora_factors
from mgmlora.training.lora import LoraArgs, apply_lora, plan_lora
from tests.conftest import tiny_model


def test_lora_factors_rebuild_the_parameter_peft_computes_while_its_adapter_runs():
    model = tiny_model("tiny-qwen3-moe", seed=1)
    model = apply_lora(model, plan_lora(model, LoraArgs(preset="chameleons", r=4, lora_alpha=16, lora_dropout=0.0,
                                                        target_experts=True), moe=True))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    experts = next(m for m in model.modules() if type(m).__name__ == "Qwen3MoeExperts")
    seen = {}

    def look(module, *_):
        for name in ("gate_up_proj", "down_proj"):
            seen[name] = (lora_factors(module, name), getattr(module, name).detach().clone())

    experts.register_forward_pre_hook(look)
    model(input_ids=torch.randint(3, 500, (1, 7)))
    for name, (factors, parametrised) in seen.items():
        assert factors is not None, name
        weight, lhs, rhs, scaling = factors
        assert weight.shape == parametrised.shape and lhs.shape[-1] == rhs.shape[-2]  # the rank in between
        assert not weight.requires_grad and lhs.requires_grad  # frozen stack, factors on the LoRA graph
        # PEFT's effective parameter, recomputed from what the fence returns
        torch.testing.assert_close(weight + scaling * lhs @ rhs, parametrised)
        assert not torch.equal(parametrised, weight)  # the adapter is not a no-op here
    assert lora_factors(experts, "gate_up_proj") is None  # outside the wrapper's forward: plain parameter

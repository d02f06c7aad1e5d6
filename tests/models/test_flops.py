"""The FLOP formula against PyTorch's FlopCounterMode on tiny models (two independent counts of one step)."""

import peft
import pytest
import torch

from mgmlora.models.causal_lm import disable_gradient_checkpointing, enable_gradient_checkpointing
from mgmlora.models.flops import FlopModel, measure_forward_flops
from mgmlora.models.transformers_private import experts_implementation
from tests.conftest import tiny_model


def _lora(model, targets, target_parameters=None):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                             target_parameters=target_parameters)
    peft_model = peft.get_peft_model(model, config)
    model.enable_input_require_grads()  # every layer's input gradient is computed, layer 0's too (as under ckpt)
    return peft_model


def _counted_step(peft_model, ids, checkpointing):
    """FlopCounterMode over one forward + backward (transformers' loss: the head on every position)."""
    base = peft_model.get_base_model()
    (enable_gradient_checkpointing if checkpointing else disable_gradient_checkpointing)(base)
    peft_model.train()

    def step():
        out = peft_model(input_ids=ids, labels=ids)
        out.loss.backward()

    return measure_forward_flops(step)


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_step_flops_match_flop_counter(preset):
    torch.manual_seed(0)
    model = tiny_model(preset)
    model.set_attn_implementation("eager")  # plain matmuls the counter sees (full L x L, not causal)
    if experts_implementation(model.config) is not None:
        model.set_experts_implementation("eager")  # per-expert matmuls: exactly the routed tokens, top_k each
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    targets = [t for t in targets if any(n.endswith(t) for n, _ in model.named_modules())]
    peft_model = _lora(model, targets)
    flops = FlopModel.of(peft_model.get_base_model())
    length = 24
    ids = torch.randint(3, model.config.vocab_size, (1, length))
    # the eager kernels compute every pair (L x L), the formula's causal count only those a position attends to
    square_extra = flops.attention_forward([length], causal=False) - flops.attention_forward([length])
    expected = flops.step([length], supervised=length, recompute=False).model + 3 * square_extra
    assert _counted_step(peft_model, ids, checkpointing=False) == pytest.approx(expected, rel=1e-6)
    expected_hw = flops.step([length], supervised=length, recompute=True).hardware + 4 * square_extra
    # non-reentrant checkpointing stops recomputing once the saved tensors are back: each layer's last LoRA B
    # product is not rerun, a few hundred FLOPs per position that the formula's whole-layer recompute counts
    assert _counted_step(peft_model, ids, checkpointing=True) == pytest.approx(expected_hw, rel=5e-3)


def test_counts_split_frozen_lora_and_head_by_hand():
    model = tiny_model("tiny-qwen3")
    cfg = model.config
    peft_model = _lora(model, ["q_proj"])
    flops = FlopModel.of(peft_model.get_base_model())
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    q_out = cfg.num_attention_heads * cfg.head_dim
    assert flops.lora == layers * 4 * (h + q_out)  # r = 4: A (4 x h) and B (q_out x 4) per layer
    assert flops.head == h * cfg.vocab_size
    assert flops.attention == layers * cfg.num_attention_heads * cfg.head_dim
    # two samples of 3 and 5 positions attend to 6 and 15 pairs; never across the pack
    assert flops.attention_forward([3, 5]) == 4 * flops.attention * (6 + 15)
    one = flops.step([8], supervised=2, recompute=False)
    two = flops.step([8], supervised=3, recompute=False)
    assert two.model - one.model == 4 * flops.head  # the head costs only where a loss is taken
    assert one.hardware == one.model


def test_kept_expert_outputs_take_their_gemms_out_of_the_recompute_only():
    model = tiny_model("tiny-qwen3-moe")
    cfg = model.config
    flops = FlopModel.of(model)
    h, width, k, layers = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.num_hidden_layers
    # per position, each of the top_k experts it is routed to: gate/up (h -> 2 x width) and down (width -> h)
    assert flops.gate_up == layers * k * h * 2 * width and flops.down == layers * k * width * h
    full, gate_up, kept = (flops.step([10, 6], supervised=12, kept=keep) for keep in ("none", "gate_up", "all"))
    assert full.model == gate_up.model == kept.model  # the math is the same
    assert full.hardware - gate_up.hardware == 2 * flops.gate_up * 16  # forward FLOPs of 16 positions not rerun
    assert full.hardware - kept.hardware == 2 * (flops.gate_up + flops.down) * 16
    assert FlopModel.of(tiny_model("tiny-qwen3")).gate_up == 0  # dense: no experts


def test_kept_attention_takes_the_attention_kernel_out_of_the_recompute_only():
    model = tiny_model("tiny-qwen3")
    cfg = model.config
    flops = FlopModel.of(model)
    full, kept = (flops.step([10, 6], supervised=12, kept_attention=on) for on in (False, True))
    assert full.model == kept.model  # the math is the same
    # by hand: QK^T and AV over each sample's causal pairs (10 x 11 / 2 + 6 x 7 / 2 = 76), 2 products x 2 FLOPs per
    # multiply-add, per layer, query head and head dimension
    per_pair = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
    assert full.hardware - kept.hardware == per_pair * 76


@pytest.mark.parametrize("quant_type", ["nf4", "fp8"])
@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_a_quantised_base_does_the_same_math_as_its_full_precision_twin(preset, quant_type):
    # quantised linears store their codes flat (NF4 packed, FP8 one byte each): the count reads the layer's shape
    from mgmlora.models import load_model
    from tests.models.test_quantization import _args

    quantised = FlopModel.of(load_model(_args(preset, quant_type=quant_type)).model)
    full = FlopModel.of(load_model(_args(preset, quant_type=quant_type), quantize=False).model)
    assert quantised == full and quantised.frozen > 0

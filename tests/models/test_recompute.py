"""What checkpointing recomputes: with `speed.keep_expert_outputs` / `speed.keep_attention_outputs` the recompute
skips the kept expert GEMMs / attention kernels and computes the same loss and gradients."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from mgmlora.errors import UsageError
from mgmlora.models import load_model
from mgmlora.models.args import ModelArgs
from mgmlora.models.quantization import QuantizationArgs
from mgmlora.models.recompute import recompute_policy
from mgmlora.models.torch_private import attention_ops, grouped_gemm_ops
from mgmlora.models.transformers_private import checkpoint_inside_forward
from mgmlora.training.fastpath import apply_fast_path
from mgmlora.training.lora import LoraArgs
from mgmlora.training.loss import SpeedArgs
from mgmlora.training.trainable import Trainability, apply_trainability


class _GroupedGemms(TorchDispatchMode):
    """Counts grouped GEMMs (and attention kernels: `attention`) dispatched (a selective checkpoint's cached outputs
    are never dispatched again)."""

    def __init__(self):
        super().__init__()
        self.count = self.attention = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in grouped_gemm_ops()
        self.attention += func in attention_ops()
        return func(*args, **(kwargs or {}))


ATTENTION_PROFILED = ("aten::_scaled_dot_product_flash_attention_for_cpu",)  # the CPU kernel, as profiled
# what the CUDA attention ops call to run their forward kernel (flash for varlen, cuDNN's for SDPA on an H100)
_ATTENTION_FORWARDS = ("aten::_flash_attention_forward", "aten::_efficient_attention_forward",
                       "aten::_cudnn_attention_forward")


def _step(keep="none", checkpointing=True, target_experts=True, dtype="float32", quantization=None, compiled=False,
          preset="tiny-qwen3-moe", attention=False, attn="sdpa", **speed):
    """(loss, gradients by name, grouped GEMMs in the backward pass, the fast path's log, attention kernels in the
    backward pass) of one step; `attention` is `speed.keep_attention_outputs`."""
    torch.manual_seed(0)  # the same weights, LoRA initialisation and batch for every setting
    loaded = load_model(ModelArgs(preset=preset, dtype=dtype, gradient_checkpointing=checkpointing,
                                  quantization=quantization, attn_implementation=attn))
    model, _ = apply_trainability(loaded, LoraArgs(preset="aggressive", target_experts=target_experts,
                                                   lora_dropout=0.0), Trainability())
    speed = SpeedArgs(keep_expert_outputs=keep, keep_attention_outputs=attention, compile=compiled, **speed)
    done = apply_fast_path(loaded, speed, same_compute_dtype=dtype == "float32")  # fp32 adapters, no autocast
    model.train()
    ids = torch.randint(0, 512, (2, 24))
    if compiled:  # a first step compiles (the backward graph too, lazily, running kernels while it does): not counted
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    if compiled:  # compiled code calls the GEMMs as extern kernels: the profiler sees them, a dispatch mode not
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss.backward()
        events = prof.key_averages()
        count = sum(e.count for e in events if e.key in ("aten::_grouped_mm", "aten::_scaled_grouped_mm"))
        attention_count = sum(e.count for e in events if e.key in ATTENTION_PROFILED)
    else:
        with _GroupedGemms() as counted:
            loss.backward()
        count, attention_count = counted.count, counted.attention
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads, count, done, attention_count


def _assert_same(got, expected, exact=True):
    check = torch.testing.assert_close if not exact else lambda a, b, msg: torch.testing.assert_close(
        a, b, rtol=0, atol=0, msg=msg)
    check(got[0], expected[0], msg="loss")
    assert got[1].keys() == expected[1].keys()
    for name, grad in got[1].items():
        check(grad, expected[1][name], msg=name)


@pytest.mark.parametrize("target_experts", [False, True])
def test_kept_expert_outputs_give_the_same_loss_and_gradients_with_fewer_gemms_recomputed(target_experts):
    none, gate_up, kept_all = (_step(keep, target_experts=target_experts) for keep in ("none", "gate_up", "all"))
    plain = _step(checkpointing=False, target_experts=target_experts)
    layers = 2  # tiny-qwen3-moe: every decoder layer is a MoE layer
    _assert_same(gate_up, none)  # a kept output is the value the recompute would compute
    _assert_same(kept_all, none)
    _assert_same(none, plain, exact=False)
    # the recompute runs each layer's two frozen expert GEMMs; gate_up keeps one of them, all both
    assert none[2] - gate_up[2] == layers and none[2] - kept_all[2] == 2 * layers
    # without checkpointing nothing is recomputed: per layer the two frozen GEMMs, and split LoRA's four (A, B)
    assert none[2] - plain[2] == (2 + (4 if target_experts else 0)) * layers
    assert any("expert GEMM outputs (gate_up) kept for the backward" in line for line in gate_up[3])


@pytest.mark.parametrize("expert_products", ["fp8", "dequantized"])
def test_fp8_experts_keep_their_products_too(expert_products):
    fp8 = QuantizationArgs(quant_type="fp8", compute_dtype="float32", expert_products=expert_products)
    none, kept_all = (_step(keep, quantization=fp8) for keep in ("none", "all"))
    _assert_same(kept_all, none)
    assert none[2] - kept_all[2] == 2 * 2  # two layers, two frozen expert products each


@pytest.mark.parametrize(("setting", "message"), [
    ({"checkpointing": False}, "checkpointing is off"),
    ({"expert_lora": "peft"}, "expert_lora: split"),
])
def test_settings_where_nothing_would_be_kept_are_refused(setting, message):
    with pytest.raises(UsageError, match=message):
        _step("all", **setting)


def test_a_dense_model_other_experts_forwards_and_handed_back_layouts_are_refused():
    for args, message in ((ModelArgs(preset="tiny-qwen3", dtype="float32"), "has none"),
                          (ModelArgs(preset="tiny-qwen3-moe", dtype="float32", experts_implementation="eager"),
                           "experts_implementation: mgmlora_grouped_mm \\(it is eager\\)"),
                          (ModelArgs(preset="tiny-qwen3-moe", dtype="float32", experts_implementation="grouped_mm"),
                           "\\(it is grouped_mm\\)")):  # transformers' adds biases to the kept output in place
        loaded = load_model(args)
        apply_trainability(loaded, LoraArgs(preset="aggressive"), Trainability())
        with pytest.raises(UsageError, match=message):
            apply_fast_path(loaded, SpeedArgs(keep_expert_outputs="gate_up"), True)
    loaded = load_model(ModelArgs(preset="tiny-qwen3-moe", dtype="float32"))
    apply_trainability(loaded, LoraArgs(preset="aggressive"), Trainability())
    loaded.model.model.layers[1].mlp.experts.has_bias = True  # a layout mgmlora's forward hands to transformers'
    with pytest.raises(UsageError, match="hands model.layers.1.mlp.experts"):
        apply_fast_path(loaded, SpeedArgs(keep_expert_outputs="gate_up"), True)


@pytest.mark.parametrize("model_type", ["mixtral", "olmoe"])
def test_families_whose_expert_width_is_intermediate_size_keep_their_products(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    from mgmlora.models import experts
    from mgmlora.models.causal_lm import enable_gradient_checkpointing
    from mgmlora.models.recompute import set_recompute

    experts.register()
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts=4,
                               num_experts_per_tok=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="mgmlora_grouped_mm").train()
    model.requires_grad_(False).lm_head.requires_grad_(True)
    enable_gradient_checkpointing(model)
    ids = torch.randint(0, 64, (2, 8))
    counts = []
    for keep in ("none", "gate_up", "all"):  # no `moe_intermediate_size` in these configs
        set_recompute(model, keep)
        loss = model(input_ids=ids, labels=ids).loss
        with _GroupedGemms() as counted:
            loss.backward()
        counts.append(counted.count)
    assert counts[0] - counts[1] == 1 and counts[0] - counts[2] == 2  # one MoE layer


@pytest.mark.parametrize("keep", ["gate_up", "all"])
def test_the_policy_tells_the_projections_apart_by_their_weight_even_where_widths_coincide(keep):
    hidden = width = 64  # expert width = hidden size: the input width alone cannot tell gate/up from down
    policy = recompute_policy(hidden, width, keep)
    grouped, scaled = grouped_gemm_ops()
    rows = torch.empty(8, hidden)
    gate_up, down = torch.empty(4, hidden, 2 * width), torch.empty(4, width, hidden)  # (E, in, out)
    lora_factor = torch.empty(4, hidden, 2 * width, requires_grad=True)  # trains: recomputed
    saved = CheckpointPolicy.MUST_SAVE
    assert policy(None, grouped, rows, gate_up) == policy(None, scaled, rows, gate_up) == saved
    assert (policy(None, grouped, rows, down) == saved) is (keep == "all")
    assert policy(None, grouped, rows, lora_factor) != saved
    assert policy(None, torch.ops.aten.mm.default, rows, gate_up[0]) != saved


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_kept_attention_outputs_give_the_same_loss_and_gradients_with_no_attention_recomputed(preset):
    moe = preset.endswith("moe")
    none, kept = (_step(preset=preset, target_experts=False, attention=on) for on in (False, True))
    plain = _step(preset=preset, target_experts=False, checkpointing=False)
    _assert_same(kept, none)  # the kept output is the value the recompute would compute
    # two decoder layers: whole-layer recompute runs each layer's attention kernel once more, the kept output never;
    # without checkpointing the backward runs no attention forward either
    assert (none[4], kept[4], plain[4]) == (2, 0, 0)
    assert kept[2] == none[2] and (kept[2] > 0) is moe  # the expert GEMMs are still recomputed
    assert any("attention outputs kept for the backward" in line for line in kept[3])


def test_packed_rows_keep_each_samples_attention_output_too():
    # on the CPU a packed row runs one causal SDPA call per sample (mgmlora.models.attention): each is kept
    from mgmlora.batch import Batch
    from mgmlora.training.loss import lm_loss

    runs = {}
    for on in (False, True):
        torch.manual_seed(0)
        loaded = load_model(ModelArgs(preset="tiny-qwen3", dtype="float32", gradient_checkpointing=True), packing=True)
        model, _ = apply_trainability(loaded, LoraArgs(preset="aggressive", lora_dropout=0.0), Trainability())
        apply_fast_path(loaded, SpeedArgs(keep_attention_outputs=on, packing=True), same_compute_dtype=True)
        lengths = [20, 24, 9]
        ids = torch.randint(3, 500, (3, 24), generator=torch.Generator().manual_seed(1))
        mask = torch.tensor([[1] * n + [0] * (24 - n) for n in lengths])
        batch = Batch(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), model_inputs={})
        hidden, labels, head, _ = loaded.forward_hidden(batch, True)
        loss = lm_loss(hidden, labels, head, "chunked", 16).loss_sum
        with _GroupedGemms() as counted:
            loss.backward()
        runs[on] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, 0, [],
                    counted.attention)
    _assert_same(runs[True], runs[False])
    assert (runs[False][4], runs[True][4]) == (2 * 3, 0)  # two layers x three samples, recomputed or kept


def test_kept_attention_and_expert_outputs_combine():
    both = _step("gate_up", target_experts=False, attention=True)
    experts_only, none = _step("gate_up", target_experts=False), _step(target_experts=False)
    _assert_same(both, none)
    assert both[4] == 0 and none[4] == 2 and both[2] == experts_only[2] == none[2] - 2
    assert any("expert GEMM outputs (gate_up) and attention outputs kept" in line for line in both[3])


@pytest.mark.parametrize(("setting", "message"), [
    ({"checkpointing": False}, "keep_attention_outputs: true chooses what gradient checkpointing recomputes"),
    ({"attn": "eager"}, "the model runs eager: set model.model.attn_implementation: sdpa"),
])
def test_kept_attention_where_nothing_could_be_kept_is_refused(setting, message):
    with pytest.raises(UsageError, match=message):
        _step(preset="tiny-qwen3", target_experts=False, attention=True, **setting)


def test_the_policy_keeps_attention_kernels_only_when_asked():
    hidden, width = 32, 16
    q = torch.empty(1, 2, 4, 8)
    saved = CheckpointPolicy.MUST_SAVE
    for op in attention_ops():
        assert recompute_policy(hidden, width, "none", attention=True)(None, op, q, q, q) == saved
        assert recompute_policy(hidden, width, "gate_up")(None, op, q, q, q) != saved
    assert recompute_policy(hidden, width, "none", attention=True)(None, torch.ops.aten.bmm.default, q, q) != saved


@pytest.mark.integration
def test_compiled_layers_keep_the_outputs_and_compute_the_same():
    # bf16: the CPU compiles grouped_mm for bf16 only (mgmlora.models.experts); per-layer regions as in training;
    # no expert LoRA, so the grouped GEMMs counted are the frozen experts' only; the CPU's attention kernel is SDPA's
    # flash kernel for the CPU
    none, gate_up, kept_all = (_step(keep, target_experts=False, dtype="bfloat16", compiled=True)
                               for keep in ("none", "gate_up", "all"))
    torch._dynamo.reset()  # compiled anew, as training compiles after setting the policy once
    attention = _step(target_experts=False, dtype="bfloat16", compiled=True, attention=True)
    torch._dynamo.reset()
    for kept in (gate_up, kept_all, attention):
        _assert_same(kept, none, exact=False)
    if not checkpoint_inside_forward():  # the recompute runs in a dispatch mode, which the profiler counts through
        pytest.skip("this transformers checkpoints around the compiled layer: the eager tests cover that layout")
    # the compiled checkpoint recomputes what the backward reads: each layer's gate/up GEMM, never the down one
    assert none[2] - gate_up[2] == 2 and kept_all[2] == gate_up[2]
    assert any("gate_up in effect" in line for line in kept_all[3])
    # and each layer's attention kernel once more, unless its output is kept
    assert (none[4], attention[4]) == (2, 0) and attention[2] == none[2]


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", [None, "fp8"])
def test_compiled_layers_on_the_gpu_launch_fewer_grouped_gemm_kernels_and_train_alike(quant_type):
    from torch._dynamo.utils import counters

    from mgmlora.models import fp8
    from mgmlora.models.torch_private import dynamo_counts

    if quant_type and torch.cuda.get_device_capability()[0] not in fp8.GROUPED_MAJORS:
        pytest.skip("PyTorch builds its grouped FP8 kernel for compute capability 9.x and 10.x only")
    quant = QuantizationArgs(quant_type="fp8", expert_products="fp8", compute_dtype="bfloat16") if quant_type else None
    runs = {}
    for keep in ("none", "gate_up", "all"):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        with torch.device("cuda"):
            loaded = load_model(ModelArgs(preset="tiny-qwen3-moe", dtype="bfloat16", quantization=quant))
        model, _ = apply_trainability(loaded, LoraArgs(preset="aggressive", lora_dropout=0.0), Trainability())
        model.to("cuda").train()
        apply_fast_path(loaded, SpeedArgs(keep_expert_outputs=keep, compile=True), same_compute_dtype=False)
        ids = torch.randint(0, 512, (2, 64), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()  # compiles
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            loss.backward()
            torch.cuda.synchronize()
        # launched kernels, not calls: a kept output is read without a launch in either checkpoint layout
        kernels = sum(e.count for e in prof.key_averages() if "GroupProblemShape" in e.key)
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        runs[keep] = (loss.detach().float(), grads, kernels)
        graphs, breaks = dynamo_counts()
        assert graphs > 0 and not breaks, breaks
    none, gate_up, kept_all = runs["none"], runs["gate_up"], runs["all"]
    assert none[2] > 0, "no CUTLASS grouped GEMM kernel seen: the experts ran another kernel"
    # two MoE layers: gate_up skips each layer's gate/up GEMM; all also the down one where the recompute ran it
    assert none[2] - gate_up[2] == 2
    assert none[2] - kept_all[2] == (2 if checkpoint_inside_forward() else 4)
    for other in (gate_up, kept_all):
        torch.testing.assert_close(other[0], none[0], rtol=1e-3, atol=1e-3)
        assert (other[1] - none[1]).norm() <= 1e-2 * none[1].norm()


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_compiled_layers_on_the_gpu_launch_no_attention_forward_in_the_backward_and_train_alike(packed):
    """Unpadded rows run an SDPA fused kernel, packed rows PyTorch's varlen op (mgmlora.models.attention): both kept."""
    from mgmlora.batch import Batch
    from mgmlora.models.torch_private import dynamo_counts
    from mgmlora.training.loss import lm_loss

    runs = {}
    for attention in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        with torch.device("cuda"):
            loaded = load_model(ModelArgs(preset="tiny-qwen3-moe", dtype="bfloat16"), packing=packed)
        model, _ = apply_trainability(loaded, LoraArgs(preset="aggressive", lora_dropout=0.0), Trainability())
        model.to("cuda").train()
        apply_fast_path(loaded, SpeedArgs(keep_attention_outputs=attention, compile=True, packing=packed),
                        same_compute_dtype=False)
        # unpacked rows without padding: a padding mask would send SDPA to its memory-efficient kernel
        lengths = [40, 64, 17] if packed else [64, 64, 64]
        ids = torch.randint(3, 512, (3, 64), device="cuda")
        mask = torch.tensor([[1] * n + [0] * (64 - n) for n in lengths], device="cuda")
        batch = Batch(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), model_inputs={})

        def loss():
            hidden, labels, head, _ = loaded.forward_hidden(batch, packed)
            return lm_loss(hidden, labels, head, "chunked", 64).loss_sum

        loss().backward()  # compiles
        model.zero_grad()
        value = loss()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            value.backward()
            torch.cuda.synchronize()
        # the recompute's attention: the kernel each attention op runs (on an H100 SDPA picks cuDNN's, varlen flash);
        # a kept op is still called, but its kernel is not
        forwards = sum(e.count for e in prof.key_averages() if e.key in _ATTENTION_FORWARDS)
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        runs[attention] = (value.detach().float(), grads, forwards)
        graphs, breaks = dynamo_counts()
        assert graphs > 0 and not breaks, breaks
    none, kept = runs[False], runs[True]
    assert none[2] == 2, "whole-layer recompute should run each of the two layers' attention kernel once more"
    assert kept[2] == 0
    torch.testing.assert_close(kept[0], none[0], rtol=1e-3, atol=1e-3)
    assert (kept[1] - none[1]).norm() <= 1e-2 * none[1].norm()

"""The FP8 frozen base (mgmlora.models.fp8): the stored codes, both products and their input gradients, the model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from mgmlora.errors import UsageError
from mgmlora.models import fp8, load_model, torch_private
from mgmlora.models.args import ModelArgs
from mgmlora.models.quantization import QuantizationArgs
from mgmlora.training.expert_lora import set_expert_lora
from mgmlora.training.lora import LoraArgs
from mgmlora.training.trainable import Trainability, apply_trainability
from tests.models.test_quantization import _args as _quant_args
from tests.models.test_quantization import _batch, _loss

E4M3 = torch.float8_e4m3fn


def _fake(t: torch.Tensor) -> torch.Tensor:
    """t through e4m3 and back, each row scaled so that its largest magnitude lands on 448 (the reference)."""
    scale = t.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 448.0
    return (t.float() / scale).to(E4M3).float() * scale


def _args(preset, expert_products="fp8", checkpointing=True):
    return _quant_args(preset, quant_type="fp8", expert_products=expert_products, checkpointing=checkpointing)


def test_rows_are_scaled_to_448_and_come_back_within_e4m3s_rounding():
    t = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [3e-3, 1e-3, -7e-3, 2e-3]])
    codes, scale = fp8.quantize_rows(t)
    assert codes.dtype == E4M3 and scale.shape == (3, 1) and scale.dtype == torch.float32
    # the largest magnitude of each non-zero row is exactly 448 (e4m3's largest finite value)
    assert codes.float().abs().amax(-1).tolist() == [448.0, 0.0, 448.0]
    torch.testing.assert_close(scale[0, 0], torch.tensor(2.0 / 448))
    assert torch.isfinite(scale).all() and (codes[1].float() == 0).all()  # an all-zero row stays zero
    back = codes.float() * scale
    # e4m3 keeps 3 mantissa bits: relative rounding error at most 2^-4 for normal values
    nonzero = t != 0
    assert ((back - t).abs()[nonzero] <= t.abs()[nonzero] * 2**-4 + 1e-9).all()
    assert (back[0] == torch.tensor([1.0, -2.0, 0.5, 0.0])).all()  # powers of two of the row are exact


def test_a_model_cast_to_another_dtype_keeps_the_codes_and_scales():
    linear = fp8.Fp8Linear(nn.Linear(32, 16, bias=False), torch.float32, torch.device("cpu"))
    experts = fp8.Fp8Weight(torch.randn(2, 16, 32), torch.float32)
    before = [(m.e4m3.view(torch.uint8).clone(), m.scale.clone()) for m in (linear, experts)]
    for module in (linear, experts):
        module.to(torch.bfloat16)  # converts every floating tensor of the module; the bits are integers
    for module, (codes, scale) in zip((linear, experts), before, strict=True):
        assert torch.equal(module.e4m3.view(torch.uint8), codes)
        assert torch.equal(module.scale, scale) and module.scale.dtype == torch.float32


def test_the_linear_holds_its_codes_once_and_not_as_a_float_matrix():
    linear = fp8.Fp8Linear(nn.Linear(32, 16, bias=False), torch.float32, torch.device("cpu"))
    # one tensor of out x in elements, so that a module move copies the codes once
    sizes = [t.numel() for t in (*linear.parameters(), *linear.buffers())]
    assert sorted(sizes) == [16, 16 * 32] and linear.weight.shape == (16 * 32,)
    moved = linear.to(torch.device("meta"))
    assert [t.numel() for t in moved.parameters()] == [16 * 32]


def test_merging_an_adapter_into_the_fp8_base_fails_instead_of_writing_into_the_codes():
    loaded = load_model(_args("tiny-qwen3"))
    model, _ = apply_trainability(loaded, LoraArgs(preset="balanced"), Trainability())
    layer = loaded.model.model.layers[0].self_attn.q_proj
    codes = layer.base_layer.weight.clone()
    with pytest.raises(RuntimeError):  # the flat codes have no (out, in) shape to add the delta to
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, codes) and not layer.merged


def test_the_linear_computes_with_quantised_inputs_and_weight_and_returns_the_input_gradient():
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    linear = fp8.Fp8Linear(dense, torch.float32, torch.device("cpu"))
    x = torch.randn(2, 5, 64, requires_grad=True)
    out = linear(x)
    # forward: both operands through e4m3, per row of x and per output row of the weight, summed in fp32
    expected = _fake(x.detach()) @ _fake(dense.weight.detach()).t() + dense.bias.detach()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    exact = dense(x)
    assert not torch.allclose(out, exact, rtol=1e-3, atol=1e-3)  # the test can fail: FP8 is not float32
    assert (out - exact).norm() < 0.1 * exact.norm()
    grad = torch.randn_like(out)
    out.backward(grad)
    # the input gradient g W with W = diag(s) Q: the row scales s move onto g's columns before g is quantised
    codes, scale = fp8.quantize_rows(dense.weight.detach())
    expected_grad = _fake(grad * scale.t()) @ codes.float()
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-5, atol=1e-5)
    assert linear.weight.grad is None and not linear.weight.requires_grad
    # and the true input gradient g W, within FP8's rounding (3 mantissa bits on both operands)
    exact_grad = grad @ dense.weight.detach()
    assert (x.grad - exact_grad).norm() < 0.1 * exact_grad.norm()


def test_an_input_in_another_dtype_is_multiplied_in_the_compute_dtype_and_gets_its_own_gradient_dtype(monkeypatch):
    # the CUDA kernels write bf16 (or fp16) only: every product, backward included, must ask for the compute dtype;
    # a linear hands its output back in its input's dtype (a float32 model's attention mixes it with float32 q and k),
    # the grouped product stays in the compute dtype (the experts forward casts its sum back once)
    asked = []
    for name in ("_mm", "_grouped_mm"):
        real = getattr(fp8, name)
        monkeypatch.setattr(fp8, name, lambda *a, real=real: asked.append(a[-1]) or real(*a))
    linear = fp8.Fp8Linear(nn.Linear(64, 32, bias=True), torch.bfloat16, torch.device("cpu"))
    experts = fp8.Fp8Weight(torch.randn(2, 32, 64), torch.bfloat16)
    offsets = torch.tensor([3, 6], dtype=torch.int32)
    for product, returns in ((linear, torch.float32), (lambda t: experts.grouped(t, offsets), torch.bfloat16)):
        x = torch.randn(6, 64, requires_grad=True)  # float32, as a float32 model under bf16 compute feeds it
        out = product(x)
        assert out.dtype == returns
        out.float().sum().backward()
        assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert asked == [torch.bfloat16] * 4  # two products, forward and backward each

def test_the_grouped_product_matches_each_experts_own_product_forward_and_backward():
    torch.manual_seed(0)
    weight = torch.randn(4, 48, 32)  # (E, out, in)
    stored = fp8.Fp8Weight(weight, torch.float32)
    offsets = torch.tensor([5, 5, 21, 30], dtype=torch.int32)  # expert 1 has no rows
    x = torch.randn(30, 32, requires_grad=True)
    out = stored.grouped(x, offsets)
    grad = torch.randn_like(out)
    out.backward(grad)
    codes, scale = fp8.quantize_rows(weight)
    start = 0
    for e, end in enumerate(offsets.tolist()):  # each expert on its own rows, written out per expert
        rows = slice(start, end)
        torch.testing.assert_close(out[rows], _fake(x.detach()[rows]) @ _fake(weight[e]).t(), rtol=1e-5, atol=1e-5)
        g = _fake(grad[rows] * scale[e].t()) @ codes[e].float()
        torch.testing.assert_close(x.grad[rows], g, rtol=1e-5, atol=1e-5)
        exact = grad[rows] @ weight[e]  # the true input gradient, within FP8's rounding
        assert (x.grad[rows] - exact).norm() <= 0.1 * exact.norm()
        start = end


def test_a_transposed_expert_weight_is_stored_by_output_rows_and_dequantised_in_its_own_layout():
    weight = torch.randn(3, 32, 48)  # (E, in, out), as transformers' `is_transposed` experts keep it
    stored = fp8.Fp8Weight(weight, torch.float32, transposed=True)
    assert stored.e4m3.shape == (3, 48, 32) and stored.scale.shape == (3, 48, 1)
    torch.testing.assert_close(stored.dequantize(), _fake(weight.transpose(-2, -1)).transpose(-2, -1))


def test_the_dense_kernel_takes_the_operands_as_the_emulation_does():
    # the kernel call the GPU makes, run where the CPU build has row-wise scaling (torch 2.13 does, 2.11 does not)
    torch.manual_seed(0)
    a, a_scale = fp8.quantize_rows(torch.randn(24, 64))
    b, b_scale = fp8.quantize_rows(torch.randn(32, 64))  # (N, K) row-major: b.t() is the column-major operand
    try:
        got = torch_private.scaled_mm(a, b.t(), a_scale, b_scale.t(), torch.bfloat16)  # the GPU's output dtype
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"this torch build has no row-wise scaled_mm on the CPU: {str(err)[:80]}")
    torch.testing.assert_close(got, fp8.emulated_mm(a, a_scale, b.t(), b_scale.t(), torch.bfloat16))


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_the_fp8_model_stores_one_byte_per_weight_and_stays_close_to_full_precision(preset):
    loaded, full = load_model(_args(preset)), load_model(_args(preset), quantize=False)
    layer = loaded.model.model.layers[0]
    assert type(layer.self_attn.q_proj) is fp8.Fp8Linear and loaded.quantized.bits == 8
    stored = [m.e4m3 for m in loaded.model.modules() if isinstance(m, (fp8.Fp8Weight, fp8.Fp8Linear))]
    full_layers = full.model.model.layers
    quantizable = [m.weight for m in full_layers.modules() if type(m) is nn.Linear]
    quantizable += [p for p in full_layers.parameters() if p.ndim == 3]
    assert sum(c.numel() for c in stored) == sum(p.numel() for p in quantizable)
    assert all(c.element_size() == 1 for c in stored)
    if loaded.moe:  # the experts' own parameters hold no memory: one element expanded to the full shape
        assert layer.mlp.experts.gate_up_proj.stride() == (0, 0, 0)
        assert isinstance(layer.mlp.experts.fp8_gate_up_proj, fp8.Fp8Weight)
    ids = _batch().input_ids
    with torch.no_grad():
        got, exact = loaded.model(input_ids=ids).logits, full.model(input_ids=ids).logits
    assert not torch.allclose(got, exact, rtol=1e-3, atol=1e-3)
    # random tiny models amplify rounding through the layers; 4-bit NF4 lands further away on the same weights
    nf4 = load_model(ModelArgs(preset=preset, dtype="float32", quantization=QuantizationArgs(compute_dtype="float32")))
    with torch.no_grad():
        far = nf4.model(input_ids=ids).logits
    assert (got - exact).norm() < (far - exact).norm()


@pytest.mark.parametrize("expert_lora", ["peft", "split"])
def test_lora_on_fp8_attention_and_experts_trains_every_adapter(expert_lora):
    torch.manual_seed(0)
    loaded = load_model(_args("tiny-qwen3-moe"))
    lora = LoraArgs(preset="aggressive", lora_dropout=0.0, target_experts=True, init_lora_weights="gaussian")
    model, _ = apply_trainability(loaded, lora, Trainability())
    assert set_expert_lora(model, expert_lora)[0] == (2 if expert_lora == "split" else 0)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    codes = {n: b.clone() for n, b in model.named_buffers() if n.endswith("codes")}
    model.train()
    loss = _loss(loaded)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == trainable and all("lora_" in n for n in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers() if n.endswith("codes"))


@pytest.mark.parametrize(("expert_products", "expert_lora", "dequantised"), [
    ("fp8", "split", False), ("fp8", "peft", True), ("dequantized", "split", True), ("dequantized", "peft", True)])
def test_fp8_experts_are_multiplied_in_fp8_only_where_asked_and_no_delta_joins_them(monkeypatch, expert_products,
                                                                                    expert_lora, dequantised):
    # expert_products: fp8 with split LoRA leaves the weight unparametrised, so the FP8 grouped product runs; PEFT's
    # delta has to join the weight, so that path dequantises; `dequantized` always does
    calls, dequantize = [], fp8.dequantize  # what every dequantisation of FP8 codes calls
    monkeypatch.setattr(fp8, "dequantize", lambda *args: calls.append("dequantize") or dequantize(*args))
    grouped = []
    monkeypatch.setattr(fp8.Fp8Weight, "grouped", lambda self, x, offsets: grouped.append(1) or
                        fp8._Fp8GroupedLinear.apply(x.to(self.dtype), self.e4m3, self.scale, offsets, self.dtype))
    loaded = load_model(_args("tiny-qwen3-moe", expert_products))
    model, _ = apply_trainability(loaded, LoraArgs(preset="aggressive", target_experts=True), Trainability())
    set_expert_lora(model, expert_lora)
    _loss(loaded).backward()
    assert bool(calls) is dequantised and bool(grouped) is not dequantised


def test_fp8_settings_that_do_not_fit_are_refused_with_the_key_to_change(monkeypatch):
    with pytest.raises(ValueError, match="bits=4 does not match quant_type=fp8"):
        QuantizationArgs(quant_type="fp8", bits=4)
    with pytest.raises(ValueError, match="backend: auto"):
        QuantizationArgs(quant_type="fp8", backend="bitsandbytes")
    with pytest.raises(ValueError, match="expert_products=fp8 needs quant_type=fp8"):
        QuantizationArgs(expert_products="fp8")
    assert QuantizationArgs().bits == 4 and QuantizationArgs(quant_type="fp8").bits == 8
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(UsageError, match="capability 8.9 or later.*A100 is 8.0.*quant_type: nf4.*bin/estimate.py"):
        from mgmlora.models.quantization import quantize_layers

        quantize_layers(nn.ModuleList([nn.Linear(16, 16)]), QuantizationArgs(quant_type="fp8",
                                                                             compute_dtype="bfloat16"), "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(UsageError, match="compute_dtype: bfloat16, or null \\(it is float32\\)"):
        quantize_layers(nn.ModuleList([nn.Linear(16, 16)]), QuantizationArgs(quant_type="fp8",
                                                                             compute_dtype="float32"), "cuda")


@pytest.mark.parametrize(("capability", "experts", "refused"), [
    ((8, 9), False, False), ((8, 9), True, True), ((9, 0), True, False), ((10, 0), True, False), ((10, 3), True, False),
    ((11, 0), True, True), ((12, 0), False, False), ((12, 0), True, True), ((8, 6), False, True)])
def test_gpus_without_the_fp8_kernels_a_model_needs_are_refused(monkeypatch, capability, experts, refused):
    # torch 2.11 runs its grouped FP8 kernel on majors 9 and 10 (Blas.cpp); the dense one from 8.9 on
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    check = lambda: fp8.check_device(torch.device("cuda"), torch.bfloat16, experts)  # noqa: E731
    if refused:
        with pytest.raises(ValueError, match="expert_products: dequantized" if experts and capability >= (8, 9)
                           else "compute capability 8.9 or later"):
            check()
    else:
        check()


def test_quantised_experts_in_a_layout_handed_to_transformers_are_refused():
    loaded = load_model(_args("tiny-qwen3-moe"))
    loaded.model.model.layers[0].mlp.experts.has_bias = True  # a layout mgmlora's experts forward hands over
    with pytest.raises(UsageError, match="cannot read quantised experts"):
        loaded.model(input_ids=_batch().input_ids)


def test_dora_on_mgmloras_quantised_layers_is_refused():
    loaded = load_model(_args("tiny-qwen3"))
    with pytest.raises(UsageError, match="use_dora: false"):
        apply_trainability(loaded, LoraArgs(preset="balanced", use_dora=True), Trainability())


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
@pytest.mark.parametrize("backward", [False, True])
def test_the_dequantising_expert_operator_is_a_well_formed_op_and_computes_each_experts_product(backward):
    from mgmlora.models.experts import fp8_dequantized_grouped_linear

    torch.manual_seed(0)
    codes, scale = fp8.quantize_rows(torch.randn(4, 32, 48))  # (E, out, in), (E, out, 1)
    codes = codes.contiguous().view(torch.uint8)
    offsets = torch.tensor([3, 3, 10, 16], dtype=torch.int32)  # expert 1 gets no rows
    x = torch.randn(16, 32 if backward else 48, requires_grad=True)
    # schema, fake tensor (symbolic row counts), autograd registration, AOT dispatch
    torch.library.opcheck(fp8_dequantized_grouped_linear, (x, offsets, codes, scale, backward))
    weight = codes.view(fp8.FP8).float() * scale  # (E, out, in), by the format's definition
    starts = [0, *offsets.tolist()[:-1]]
    reference = torch.cat([x[a:b] @ (weight[e] if backward else weight[e].t())  # a loop over experts
                           for e, (a, b) in enumerate(zip(starts, offsets.tolist(), strict=True))])
    out = fp8_dequantized_grouped_linear(x, offsets, codes, scale, backward)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    (expected,) = torch.autograd.grad(reference, x, grad)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(("expert_products", "target_experts", "expert_lora", "refused"), [
    ("fp8", False, "split", False), ("fp8", True, "peft", True), ("fp8", True, "split", False),
    ("dequantized", False, "split", False), ("dequantized", True, "peft", True), ("dequantized", True, "split", False)])
def test_an_fp8_moe_base_needs_checkpointing_only_for_pefts_expert_lora(expert_products, target_experts, expert_lora,
                                                                       refused):
    from mgmlora.training.fastpath import apply_fast_path
    from mgmlora.training.loss import SpeedArgs

    loaded = load_model(_args("tiny-qwen3-moe", expert_products, checkpointing=False))
    model, _ = apply_trainability(loaded, LoraArgs(preset="aggressive", target_experts=target_experts),
                                  Trainability())
    speed = SpeedArgs(expert_lora=expert_lora)
    if refused:  # PEFT joins its delta to each layer's dequantised experts, which autograd keeps
        with pytest.raises(UsageError, match="gradient_checkpointing: true"):
            apply_fast_path(loaded, speed, same_compute_dtype=True)
        return
    done = apply_fast_path(loaded, speed, same_compute_dtype=True)
    weights = [m for m in model.modules() if isinstance(m, fp8.Fp8Weight) and len(m.shape) == 3]
    assert weights and all(w.dequantize_in_backward for w in weights)
    assert any("dequantised again in the backward" in line for line in done)
    _loss(loaded).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fp8_experts_under_checkpointing_keep_the_plain_product():
    from mgmlora.training.fastpath import apply_fast_path
    from mgmlora.training.loss import SpeedArgs

    loaded = load_model(_args("tiny-qwen3-moe", "dequantized", checkpointing=True))
    model, _ = apply_trainability(loaded, LoraArgs(preset="aggressive", target_experts=True), Trainability())
    done = apply_fast_path(loaded, SpeedArgs(expert_lora="peft"), same_compute_dtype=True)  # allowed: checkpointed
    weights = [m for m in model.modules() if isinstance(m, fp8.Fp8Weight) and len(m.shape) == 3]
    assert weights and not any(w.dequantize_in_backward for w in weights)
    assert not any("dequantised again" in line for line in done)


@pytest.mark.integration
def test_a_compiled_fp8_model_computes_what_the_eager_one_does_on_the_cpu():
    # the dense products compile whole on the CPU (emulated); the experts' emulated grouped product does not (its
    # float32 grouped_mm compiles for bf16 only), so the CPU covers the dense layers and the GPU tier the MoE ones
    losses, grads = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        loaded = load_model(_args("tiny-qwen3"))
        model, _ = apply_trainability(loaded, LoraArgs(preset="aggressive", lora_dropout=0.0), Trainability())
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            loaded.compile()
        model.train()
        loss = _loss(loaded)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    graphs, breaks = torch_private.dynamo_counts()
    assert graphs > 0 and not breaks, breaks
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4)



@pytest.mark.integration
def test_compiled_and_eager_fp8_gradients_are_equally_close_to_the_full_precision_ones():
    """Compiled and eager FP8 differ by FP8's own noise, not by a compile error (bf16 on the CPU, as on a GPU).

    Each quantises activations and gradients to e4m3 rows (steps 12.5% apart), and compile computes the bf16 values
    and scales it rounds from in other fused orders: a few elements land on other e4m3 steps, and the two gradients
    differ by about as much as each differs from the full-precision model's. Neither is further from it.
    """
    def gradients(quantize: bool, compiled: bool) -> torch.Tensor:
        torch._dynamo.reset()
        torch.manual_seed(0)
        quant = QuantizationArgs(quant_type="fp8", compute_dtype="bfloat16")
        loaded = load_model(ModelArgs(preset="tiny-qwen3", dtype="bfloat16", quantization=quant),
                            quantize=quantize)  # the same random weights, quantised or not
        model, _ = apply_trainability(loaded, LoraArgs(preset="aggressive", lora_dropout=0.0), Trainability())
        if compiled:
            loaded.compile()
        model.train()
        torch.manual_seed(1)
        ids = torch.randint(0, 512, (4, 64))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])

    reference, eager, compiled = gradients(False, False), gradients(True, False), gradients(True, True)
    torch._dynamo.reset()
    gap = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    to_eager, to_compiled, between = gap(eager, reference), gap(compiled, reference), gap(compiled, eager)
    assert abs(to_eager - to_compiled) < 0.1 * to_eager  # equally close to full precision
    assert between < to_eager  # the compiled-vs-eager difference is within FP8's own


@pytest.mark.parametrize("expert_products", ["dequantized", "fp8"])
def test_only_fp8_expert_products_need_the_grouped_fp8_kernel(monkeypatch, expert_products):
    # dequantized experts run bf16 grouped GEMMs, so a GPU without the grouped FP8 kernel (8.9, 12.x) can train them
    asked = []
    monkeypatch.setattr(fp8, "check_device", lambda device, dtype, experts: asked.append(experts))
    load_model(_args("tiny-qwen3-moe", expert_products))
    assert asked == [expert_products == "fp8"]


def test_weights_the_kernels_cannot_take_stay_in_the_model_dtype():
    from mgmlora.models.quantization import quantize_layers

    layers = nn.ModuleList([nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 20))])  # 20 rows: not a multiple of 16
    counts = quantize_layers(layers, QuantizationArgs(quant_type="fp8", compute_dtype="float32"), "cpu")
    assert counts == {"linear": 1, "experts": 0, "kept": 1}
    assert type(layers[0][0]) is fp8.Fp8Linear and type(layers[0][1]) is nn.Linear


def _needs(grouped: bool) -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a GPU with FP8 tensor cores")
    if grouped and torch.cuda.get_device_capability()[0] not in fp8.GROUPED_MAJORS:
        pytest.skip("PyTorch builds its grouped FP8 kernel for compute capability 9.x and 10.x only")


def _products(device: torch.device, dtype: torch.dtype):
    """An FP8 linear 256 -> 512, 8 FP8 experts of that shape, and the offsets of 300 rows over them."""
    torch.manual_seed(0)
    dense = fp8.Fp8Linear(nn.Linear(256, 512, bias=False), dtype, device)
    experts = fp8.Fp8Weight(torch.randn(8, 512, 256, device=device), dtype)
    offsets = torch.tensor([0, 40, 41, 120, 200, 200, 290, 300], dtype=torch.int32, device=device)  # 2 without rows
    return dense, experts, offsets


@pytest.mark.gpu
@pytest.mark.parametrize("grouped", [False, True])
def test_the_cuda_kernels_compute_what_the_emulation_does(grouped):
    _needs(grouped)
    device = torch.device("cuda")
    dense, experts, offsets = _products(torch.device("cpu"), torch.float32)
    gpu_dense, gpu_experts = copy.deepcopy(dense).to(device), copy.deepcopy(experts).to(device)  # the same codes
    gpu_dense.product_dtype = gpu_experts.dtype = torch.bfloat16
    on_gpu = (lambda t: gpu_experts.grouped(t, offsets.to(device))) if grouped else gpu_dense
    on_cpu = (lambda t: experts.grouped(t, offsets)) if grouped else dense
    x = torch.randn(300, 256, dtype=torch.bfloat16)
    xg, xc = x.to(device).requires_grad_(), x.float().requires_grad_()  # bf16 values, exact in fp32
    out, ref = on_gpu(xg), on_cpu(xc)
    grad = torch.randn(out.shape, dtype=torch.bfloat16)
    (gx,) = torch.autograd.grad(out, xg, grad.to(device))
    (ref_gx,) = torch.autograd.grad(ref, xc, grad.float())
    # bf16 outputs of fp32 sums of the same e4m3 products; the gradient's quantisation may round a few elements on
    # either side of an e4m3 step (12.5% apart) where the device's fp32 product differs in its last bit (the first
    # GPU run: 1.2% of the elements past an element-wise 5e-2)
    assert (out.float().cpu() - ref).norm() < 1e-2 * ref.norm()
    assert (gx.float().cpu() - ref_gx).norm() < 2e-2 * ref_gx.norm()


@pytest.mark.gpu
@pytest.mark.parametrize("grouped", [False, True])
def test_a_compiled_fp8_product_computes_what_the_eager_one_does_on_the_gpu(grouped):
    _needs(grouped)
    device = torch.device("cuda")
    dense, experts, offsets = _products(device, torch.bfloat16)
    product = (lambda t: experts.grouped(t, offsets)) if grouped else dense
    x = torch.randn(300, 256, dtype=torch.bfloat16, device=device)
    grad = torch.randn(300, 512, dtype=torch.bfloat16, device=device)
    torch._dynamo.reset()
    counters.clear()
    results = []
    for run in (product, torch.compile(product, fullgraph=True)):
        xi = x.clone().requires_grad_()
        out = run(xi)
        (gx,) = torch.autograd.grad(out, xi, grad)
        results.append((out.float(), gx.float()))
    assert not torch_private.dynamo_counts()[1]
    # the same codes from the same inputs; only the order of the fp32 sums and the quantisation's rounding differ
    for eager, compiled in zip(results[0], results[1], strict=True):
        assert (compiled - eager).norm() < 1e-2 * eager.norm()


@pytest.mark.gpu
@pytest.mark.parametrize("expert_products", ["dequantized", "fp8"])
def test_a_compiled_fp8_moe_layer_trains_as_the_eager_one_on_the_gpu(expert_products):
    _needs(grouped=expert_products == "fp8")
    quant = QuantizationArgs(quant_type="fp8", expert_products=expert_products, compute_dtype="bfloat16")
    args = ModelArgs(preset="tiny-qwen3-moe", dtype="bfloat16", gradient_checkpointing=True, quantization=quant)
    lora = LoraArgs(preset="aggressive", lora_dropout=0.0, target_experts=True)
    losses, grads = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        with torch.device("cuda"):
            loaded = load_model(args)
        model, _ = apply_trainability(loaded, lora, Trainability())
        set_expert_lora(model, "split")
        model.to("cuda").train()
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            loaded.compile()
        batch = _batch().to(torch.device("cuda"))
        hidden, labels, head, _ = loaded.forward_hidden(batch, packed=False)
        logits = head(hidden)[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None]))
    graphs, breaks = torch_private.dynamo_counts()
    assert graphs > 0 and not breaks, breaks
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=1e-2)
    # compile rounds the bf16 element-wise work differently, which moves some values across an e4m3 rounding step
    # (12.5% apart) or a token across experts: the gradients agree in direction, not to a few percent
    assert torch.isfinite(grads[1]).all()
    assert torch.nn.functional.cosine_similarity(grads[1], grads[0], dim=0) > 0.95


@pytest.mark.parametrize("expert_products", ["dequantized", "fp8"])
def test_an_fp8_base_generates_with_its_kv_cache_what_its_full_forward_predicts(expert_products):
    # what validation's greedy replies (GenerationEval, mgmlora.models.generation) run on an FP8 base: a left-padded
    # batch, the KV cache and one-token steps through the FP8 products (one scale per token row, so a token's product
    # does not depend on its neighbours); each new token must be the argmax of a full forward without cache
    from mgmlora.models.generation import left_pad

    torch.manual_seed(0)
    loaded = load_model(_args("tiny-qwen3-moe", expert_products=expert_products))
    model, _ = apply_trainability(loaded, LoraArgs(preset="chameleons", lora_dropout=0.0), Trainability())
    for name, p in model.named_parameters():  # LoRA B away from zero: the adapter takes part in every product
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.eval()
    prompts = [[5, 17, 33, 48, 9, 70, 11, 12], [3, 44, 21]]
    ids, mask = left_pad(prompts, 0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, max_new_tokens=5, do_sample=False,
                             eos_token_id=[], pad_token_id=0)
    for prompt, new in zip(prompts, out[:, ids.shape[1]:].tolist()):
        assert len(new) == 5
        row = list(prompt)
        for token in new:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([row])).logits[0, -1]
            assert token == int(logits.argmax()), (prompt, row, token)
            row.append(token)

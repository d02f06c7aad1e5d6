"""mgmlora's experts forward (mgmlora.models.experts): the function transformers' experts compute, by another route."""

import pytest
import torch

import mgmlora.models.experts as experts
from mgmlora.models import load_model
from mgmlora.models.args import ModelArgs
from mgmlora.models.experts import FAST_EXPERTS
from mgmlora.training.lora import LoraArgs, apply_lora, plan_lora
from tests.conftest import tiny_model


def _experts_modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


def _loss_and_grads(model, ids, implementation):
    experts.register()  # what the loaders do before a model may use mgmlora_grouped_mm
    model.set_experts_implementation(implementation)
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [None, LoraArgs(preset="chameleons", target_experts=True, lora_dropout=0.0)])
def test_same_loss_and_gradients_as_transformers_per_expert_loop(lora, monkeypatch):
    """Reference: transformers' `eager` experts (a Python loop over experts, no grouped GEMM, weights after down)."""
    model = tiny_model("tiny-qwen3-moe", seed=4)
    if lora is None:
        model.requires_grad_(True)
    else:  # LoRA on the fused expert weights (PEFT's parametrization of gate_up_proj / down_proj) and attention
        model = apply_lora(model, plan_lora(model, lora, moe=True))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero so that the experts' LoRA changes the forward and gets gradients
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    calls = []
    real = experts._grouped_mm
    monkeypatch.setattr(experts, "_grouped_mm", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(3, 500, (3, 19), generator=torch.Generator().manual_seed(0))
    loss_ref, grads_ref = _loss_and_grads(model, ids, "eager")
    loss, grads = _loss_and_grads(model, ids, FAST_EXPERTS)
    layers = model.config.num_hidden_layers
    assert len(calls) == 2 * layers  # our path ran: gate_up and down once per layer
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and grads
    if lora is not None:
        assert any("experts" in n and "lora" in n for n in grads)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item() + 1e-7,
                                   msg=name)


def test_hand_computed_two_experts():
    """One token routed to two experts: out = sum_k w_k * down_k(silu(gate_k x) * up_k x), written out by hand."""
    model = tiny_model("tiny-qwen3-moe", seed=1)
    module = _experts_modules(model)[0]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, module.hidden_dim, generator=g)
    index, weights = torch.tensor([[3, 1]]), torch.tensor([[0.7, 0.3]])
    expected = torch.zeros(1, module.hidden_dim)
    for e, w in zip(index[0].tolist(), weights[0].tolist(), strict=True):
        gate, up = (module.gate_up_proj[e] @ x[0]).chunk(2)
        expected += w * (module.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    with torch.no_grad():
        torch.testing.assert_close(experts.fast_experts_forward(module, x, index, weights), expected,
                                   rtol=1e-5, atol=1e-6)


def test_expert_parallel_modules_go_back_to_transformers(monkeypatch):
    """Sharded experts need transformers' sentinel masks: such a module is never run by the mask-free path."""
    module = _experts_modules(tiny_model("tiny-qwen3-moe"))[0]
    monkeypatch.setattr(experts, "_grouped_mm", lambda *a: pytest.fail("the mask-free path ran"))
    monkeypatch.setattr(module, "_is_expert_parallel", True)
    x = torch.randn(4, module.hidden_dim)
    index, weights = torch.tensor([[0, 1]] * 4), torch.full((4, 2), 0.5)
    assert experts.fast_experts_forward(module, x, index, weights).shape == x.shape


def test_transformers_experts_attributes_this_path_reads():
    """Fence: the attributes of transformers' experts class the dispatch reads. Fails when upstream renames them."""
    module = _experts_modules(tiny_model("tiny-qwen3-moe"))[0]
    for name in ("_is_expert_parallel", "has_gate", "has_bias", "is_transposed", "num_experts", "gate_up_proj",
                 "down_proj"):
        assert hasattr(module, name), name


def test_model_args_choose_the_experts_implementation():
    args = dict(preset="tiny-qwen3-moe", dtype="float32", gradient_checkpointing=False)
    assert load_model(ModelArgs(**args)).model.config._experts_implementation == FAST_EXPERTS
    assert load_model(ModelArgs(**args, experts_implementation="grouped_mm")).model.config._experts_implementation \
        == "grouped_mm"


def test_a_torch_without_the_public_grouped_mm_is_a_one_line_error_naming_the_setting(monkeypatch):
    monkeypatch.delattr(torch.nn.functional, "grouped_mm", raising=False)  # what torch releases before it lack
    x, weight, offsets = torch.ones(2, 4), torch.ones(1, 4, 3), torch.tensor([2], dtype=torch.int32)
    with pytest.raises(experts.MgmloraError, match=r"model.model.experts_implementation: mgmlora_grouped_mm needs "
                                                   r"torch.nn.functional.grouped_mm.*experts_implementation: "
                                                   r"grouped_mm"):
        experts._grouped_mm(x, weight, offsets)


@pytest.mark.integration  # inductor compiles C++ kernels: slow on a cold cache
def test_expert_lora_compiles_with_inductor_from_pefts_strided_factors():
    """inductor lays out a copy of a strided view in the view's stride order, and grouped_mm refused PEFT's B factor
    (experts innermost) copied that way: "Invalid strides/sizes" (the 2026-12-04 GPU run; the same on the CPU).
    `contiguous_factor` pins the copy's layout. bf16: grouped_mm's fake (meta) function takes nothing else."""
    e, r, d_in, d_out, tokens = 4, 8, 32, 48, 24
    g = torch.Generator().manual_seed(0)
    lora_a = (torch.randn(e * r, d_in, generator=g) * 0.2).requires_grad_()  # PEFT's lora_A.weight (E r, in)
    lora_b = (torch.randn(d_out, r * e, generator=g) * 0.2).requires_grad_()  # lora_B.weight (out, r E)
    offsets = torch.tensor([5, 5, 17, 24], dtype=torch.int32)
    x = torch.randn(tokens, d_in, generator=g).bfloat16().requires_grad_()
    grad_out = torch.randn(tokens, d_out, generator=g).bfloat16()

    def step(fn):
        for t in (lora_a, lora_b, x):
            t.grad = None
        out = fn(x, offsets)
        (out * grad_out).sum().backward()
        return out.detach(), lora_a.grad.clone(), lora_b.grad.clone(), x.grad.clone()

    def split(x, offsets):  # PEFT's storage as strided views, as mgmlora.training.expert_lora passes them
        factors = experts.ExpertLora(lora_a.view(e, r, d_in).transpose(1, 2),
                                     lora_b.view(d_out, r, e).permute(2, 1, 0), 2.0)
        return factors(x, offsets)

    eager = step(split)
    try:
        compiled = step(torch.compile(split, backend="inductor", fullgraph=True))
    finally:
        torch._dynamo.reset()
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())
    # and the reference is right: expert by expert, in fp32
    starts = [0, *offsets.tolist()[:-1]]
    manual = torch.cat([2.0 * x[s:t].float() @ lora_a[i * r:(i + 1) * r].T @ lora_b[:, i::e].T
                        for i, (s, t) in enumerate(zip(starts, offsets.tolist(), strict=True))])
    torch.testing.assert_close(eager[0].float(), manual, rtol=2e-2, atol=2e-2 * manual.abs().max().item())


@pytest.mark.integration  # compiles twice: kept out of the fast tier's 2 minutes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_experts_run_in_float32_too(dtype):
    """grouped_mm's compiled form takes bf16 only: float32 experts (the CPU demos) crashed under torch.compile."""
    model = tiny_model("tiny-qwen3-moe", seed=5).to(dtype)
    experts.register()
    model.set_experts_implementation(FAST_EXPERTS)
    module = _experts_modules(model)[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, module.hidden_dim, generator=g).to(dtype)
    index = torch.randint(0, module.num_experts, (6, 2), generator=g)
    weights = torch.rand(6, 2, generator=g).to(dtype)
    with torch.no_grad():
        eager = experts.fast_experts_forward(module, x, index, weights)
        try:
            compiled = torch.compile(experts.fast_experts_forward, backend="aot_eager")(module, x, index, weights)
        finally:
            torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)

"""The MoE permutation as gathers (mgmlora.models.routing): the indexing form's values and gradients."""

import pytest
import torch

from mgmlora.models.routing import from_expert_order, route, to_expert_order


def _routing(tokens: int, k: int, experts: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    top_k = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])  # (T, k) distinct experts
    _, order = torch.sort(top_k.reshape(-1), stable=True)  # (S,)
    return order


def test_by_hand():
    """Two tokens, k = 2, routed (t0: e1, e0), (t1: e0, e2): expert order is t0s1, t1s0, t0s0, t1s1."""
    order = torch.tensor([1, 2, 0, 3])  # (token, slot) pairs 0..3 = t0s0, t0s1, t1s0, t1s1 sorted by expert
    r = route(order, 2)
    assert r.token.tolist() == [0, 1, 0, 1]
    assert r.inverse.tolist() == [2, 0, 1, 3]
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0]])
    assert to_expert_order(x, r).tolist() == [[1, 10], [2, 20], [1, 10], [2, 20]]
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [100.0, 0.0], [0.0, 100.0]])
    # token 0 owns rows 0 and 2, token 1 rows 1 and 3
    assert from_expert_order(rows, r).tolist() == [[101, 0], [0, 101]]


@pytest.mark.parametrize(("tokens", "k", "experts"), [(7, 2, 4), (13, 3, 8), (1, 1, 2)])
def test_same_values_and_gradients_as_indexing(tokens, k, experts):
    """Reference: x[order // k] into expert order, index_copy back to token order and a sum over k (autograd's)."""
    order = _routing(tokens, k, experts, seed=tokens)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 5, generator=g, requires_grad=True)
    weight = torch.randn(5, 5, generator=g)
    r = route(order, k)

    def reference(x):
        rows = torch.tanh(x[order // k] @ weight)  # (S, 5), not linear so that the rows differ from x's
        return torch.empty_like(rows).index_copy_(0, order, rows).view(tokens, k, 5).sum(1)

    def gathers(x):
        return from_expert_order(torch.tanh(to_expert_order(x, r) @ weight), r)

    expected = reference(x)
    got = gathers(x)
    torch.testing.assert_close(got, expected)
    upstream = torch.randn(tokens, 5, generator=g)
    (grad_ref,) = torch.autograd.grad(expected, x, upstream)
    (grad,) = torch.autograd.grad(got, x, upstream)
    torch.testing.assert_close(grad, grad_ref)


def test_gradcheck_both_directions():
    """Finite differences in float64 through both functions, and each one's backward through the other."""
    order = _routing(6, 2, 5, seed=3)
    r = route(order, 2)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: to_expert_order(t, r), (x,))
    assert torch.autograd.gradcheck(lambda t: from_expert_order(t, r), (rows,))
    assert torch.autograd.gradgradcheck(lambda t: from_expert_order(to_expert_order(t, r) ** 2, r), (x,))


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
@pytest.mark.parametrize(("backend", "dtype"), [("aot_eager", torch.float32), ("inductor", torch.bfloat16)])
def test_compiled_matches_eager(backend, dtype):
    """Under torch.compile (inductor is what speed.compile runs) the functions give the eager values and gradients."""
    order = _routing(9, 2, 4, seed=5)
    r = route(order, 2)
    x = torch.randn(9, 4, dtype=dtype, requires_grad=True)

    def f(x, token, inverse):
        rows = to_expert_order(x, r._replace(token=token, inverse=inverse))
        return from_expert_order(rows.sin(), r._replace(token=token, inverse=inverse))

    eager = f(x, r.token, r.inverse)
    compiled = torch.compile(f, backend=backend, fullgraph=True)(x, r.token, r.inverse)
    torch.testing.assert_close(compiled, eager)
    upstream = torch.randn(9, 4, dtype=dtype)
    (grad_compiled,) = torch.autograd.grad(compiled, x, upstream)
    (grad_eager,) = torch.autograd.grad(eager, x, upstream)
    torch.testing.assert_close(grad_compiled, grad_eager)


@pytest.mark.integration  # compiles: kept out of the fast tier, as the test above
def test_compiled_keeps_float64():
    """Compiled, the sum adds float64 rows in float64 (a float32 accumulator rounded them): gradcheck's dtype."""
    order = _routing(9, 4, 8, seed=7)
    r = route(order, 4)
    rows = torch.randn(36, 5, dtype=torch.float64)

    def f(rows, token, inverse):
        return from_expert_order(rows, r._replace(token=token, inverse=inverse))

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(rows, r.token, r.inverse)
    torch._dynamo.reset()
    assert compiled.dtype == torch.float64
    # float64 tolerance well below float32's rounding (about 6e-8 relative), above float64's (about 1e-16)
    torch.testing.assert_close(compiled, rows[r.inverse].view(9, 4, 5).sum(1), rtol=1e-12, atol=1e-12)

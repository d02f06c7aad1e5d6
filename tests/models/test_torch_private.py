"""The fence on PyTorch's private attributes (mgmlora.models.torch_private) still does what mgmlora needs."""

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from mgmlora.models.torch_private import (
    allocation_events,
    attention_ops,
    grouped_gemm_ops,
    scaled_grouped_mm,
    stack_config,
    trace_through_checkpoint_side_effects,
    uncompile,
    unpadded_inductor_options,
)


def test_uncompile_makes_a_compiled_module_run_eagerly_again():
    compiled_calls = []

    def backend(graph, example_inputs):  # counts every call that goes through torch.compile, runs it eagerly
        def run(*args):
            compiled_calls.append(1)
            return graph.forward(*args)

        return run

    class Layer(nn.Module):  # dynamo skips torch's own modules at the top level: a module defined here it compiles
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x)

    layer = Layer()
    layer.compile(backend=backend)
    layer(torch.ones(2, 4))
    assert compiled_calls == [1]
    uncompile(layer)
    out = layer(torch.ones(2, 4))  # the shape compiled above: a still-compiled module would run the compiled call
    assert compiled_calls == [1]
    torch.testing.assert_close(out, torch.ones(2, 4) @ layer.linear.weight.T + layer.linear.bias)


def test_allocation_events_are_the_timeline_of_each_allocation_and_free():
    nbytes = 4 << 20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = torch.empty(nbytes, dtype=torch.uint8)
        del kept
    events = sorted(allocation_events(prof))
    sizes = [size for _, size in events]
    assert nbytes in sizes and -nbytes in sizes  # the allocation, then its free
    assert sizes.index(nbytes) < sizes.index(-nbytes)


def test_the_stack_config_makes_the_profiler_record_python_stacks():
    def masked_sum(x):
        return x[x > 0].sum()  # a boolean index: aten::nonzero

    with profile(activities=[ProfilerActivity.CPU], with_stack=True, experimental_config=stack_config()) as prof:
        masked_sum(torch.randn(16))
    stacks = [e.stack for e in prof.events() if e.name == "aten::nonzero"]
    assert stacks and any("masked_sum" in frame for frame in stacks[0])


def test_a_checkpointed_forward_that_flips_outer_state_compiles_whole_only_with_the_switch():
    """The pattern of transformers 5.25 + `kernels`: checkpoint inside `forward`, and around the body a value set and
    reset on an outer object that also flips a flag for good the first time it is traced (kernels' `_ScopedVar`).
    Without the switch dynamo breaks the graph at the checkpoint; with it, one graph holds the checkpointed body."""

    class ScopedVar:
        def __init__(self):
            self.value, self.tracing = None, False

        def set(self, value):
            if torch.compiler.is_compiling():
                self.tracing = True  # never undone: what dynamo refuses inside a checkpoint
            previous, self.value = self.value, value
            return previous

    scoped = ScopedVar()

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def _body(self, x):
            token = scoped.set("inside")
            try:
                return self.linear(x).relu()
            finally:
                scoped.set(token)

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self._body, x, use_reentrant=False)

    def compiled_run():
        torch._dynamo.reset()
        counters.clear()
        scoped.tracing = False
        graphs = []
        layer = Layer()
        layer.compile(backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
        layer(torch.ones(2, 4, requires_grad=True)).sum().backward()
        assert scoped.value is None
        return graphs, sum(counters["graph_break"].values())

    flag = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    try:
        with torch._dynamo.config.patch(**{flag: False}):
            graphs, breaks = compiled_run()
            assert breaks >= 1 and graphs == []
            trace_through_checkpoint_side_effects()
            assert getattr(torch._dynamo.config, flag) is True
            graphs, breaks = compiled_run()
            assert breaks == 0 and len(graphs) == 1
            assert any("checkpoint" in str(node.target) for node in graphs[0].graph.nodes)  # the body is in the graph
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize(("op", "arguments"), [
    ("aten::_scaled_mm", ("self", "mat2", "scale_a", "scale_b", "out_dtype")),
    ("aten::_scaled_grouped_mm", ("self", "mat2", "scale_a", "scale_b", "offs", "out_dtype")),
])
def test_the_fp8_products_keep_the_arguments_mgmlora_passes(op, arguments):
    # torch_private.scaled_mm / scaled_grouped_mm call these private ops with these keywords (mgmlora.models.fp8)
    schemas = torch._C._jit_get_schemas_for_operator(op)
    assert schemas, f"{op} is gone"
    names = {argument.name for argument in schemas[0].arguments}
    assert set(arguments) <= names, names


def test_the_grouped_gemms_dispatch_to_the_operators_the_recompute_policy_names():
    # mgmlora.models.recompute keeps the outputs of these operators; grouped_mm must still reach the first
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    grouped, scaled = grouped_gemm_ops()
    offsets = torch.tensor([16, 32], dtype=torch.int32)
    with Seen() as seen:
        torch.nn.functional.grouped_mm(torch.randn(32, 16), torch.randn(2, 16, 16), offs=offsets)
    assert grouped in seen.ops
    # FP8's grouped product (torch_private.scaled_grouped_mm) on meta tensors: dispatched without a GPU
    a = torch.empty(32, 16, device="meta", dtype=torch.float8_e4m3fn)
    b = torch.empty(2, 16, 16, device="meta", dtype=torch.float8_e4m3fn).transpose(-2, -1)
    with Seen() as seen:
        scaled_grouped_mm(a, b, torch.empty(32, device="meta"), torch.empty(2, 16, device="meta"),
                          offsets.to("meta"), torch.bfloat16)
    assert scaled in seen.ops


def test_attention_kernels_dispatch_to_the_operators_the_recompute_policy_names():
    # mgmlora.models.recompute keeps the outputs of attention_ops(): SDPA's CPU kernel, and the varlen op that
    # mgmlora's packed attention calls (PyTorch's private torch_attn._varlen_attn, here on meta tensors: no GPU)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    kept = set(attention_ops())
    q = torch.randn(2, 4, 8, 16)  # (B, heads, T, D)
    with Seen() as seen:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert kept & set(seen.ops), seen.ops
    from mgmlora.models import attention

    rows = torch.empty(12, 4, 64, device="meta", dtype=torch.bfloat16)  # (N, heads, D)
    bounds = torch.tensor([0, 5, 12], dtype=torch.int32, device="meta")
    with Seen() as seen:  # the call mgmlora's packed attention makes on the GPU
        attention._varlen(rows, rows, rows, bounds, 7, 64**-0.5)
    assert torch.ops.torch_attn._varlen_attn.default in seen.ops and torch.ops.torch_attn._varlen_attn.default in kept


def test_the_unpadded_options_name_inductor_options_that_exist():
    # torch.compile validates `options` only when it compiles: a renamed option would fail the first packed step
    import torch._inductor

    assert set(unpadded_inductor_options()) <= set(torch._inductor.list_options())
    assert torch._inductor.config.comprehensive_padding is True  # the default the options turn off
    # mgmlora.models.attention.packed_compile_options leaves 64-multiple head dims padded: 128 bytes of bf16 is 64
    assert torch._inductor.config.padding_alignment_bytes == 128

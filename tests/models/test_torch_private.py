"""The fence on PyTorch's private attributes (mgmlora.models.torch_private) still does what mgmlora needs."""

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mgmlora.models.torch_private import allocation_events, stack_config, uncompile


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

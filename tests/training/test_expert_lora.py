"""Split expert LoRA (mgmlora.training.expert_lora): PEFT's function without forming W + B A per expert."""

import copy

import pytest
import torch
from peft.tuners.lora import ParamWrapper
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import mgmlora.models.experts as experts
from mgmlora.models import load_model
from mgmlora.models.args import ModelArgs
from mgmlora.models.experts import ExpertLora
from mgmlora.models.loaded import eager_regions, outer_param_wrappers
from mgmlora.training.expert_lora import SplitLoraExperts, expert_factors, set_expert_lora
from mgmlora.training.fastpath import apply_fast_path
from mgmlora.training.lora import LoraArgs
from mgmlora.training.loss import SpeedArgs
from mgmlora.training.trainable import Trainability, apply_trainability


def _expert_lora_model(dtype="float32", r=None, checkpointing=False, **model):
    torch.manual_seed(0)
    loaded = load_model(ModelArgs(preset="tiny-qwen3-moe", dtype=dtype, gradient_checkpointing=checkpointing,
                                  **model))
    lora = LoraArgs(preset="chameleons", target_experts=True, lora_dropout=0.0, r=r)
    peft_model, _ = apply_trainability(loaded, lora, Trainability())
    for p in peft_model.parameters():
        if p.requires_grad:  # non-zero LoRA B, so the experts' adapters change the forward and get gradients
            torch.nn.init.normal_(p, std=0.05)
    return peft_model, loaded


def _ids():
    return torch.randint(3, 500, (3, 21), generator=torch.Generator().manual_seed(0))


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class _ExpertStacks(TorchDispatchMode):
    """Records every op that makes a new tensor (not a view) shaped like a fused expert weight, either orientation."""

    def __init__(self, model):
        super().__init__()
        self.ops = []
        self.shapes = set()
        for wrapper in model.modules():
            if isinstance(wrapper, ParamWrapper):
                e, a, b = wrapper.get_param().shape
                self.shapes |= {(e, a, b), (e, b, a)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        if not func.is_view and any(isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes for t in outs):
            self.ops.append(str(func))
        return out


def test_split_gives_peft_loss_and_gradients_and_never_forms_the_expert_stack(monkeypatch):
    model, _ = _expert_lora_model(r=8)  # rank 8 / 16: no LoRA factor shares a shape with an expert stack
    ids = _ids()
    with _ExpertStacks(model) as peft_ops:  # reference: PEFT's parametrization, W + B A per call
        loss_ref, grads_ref = _loss_and_grads(model, ids)
    assert peft_ops.ops  # the detector sees PEFT's merged weights (and their gradients)

    assert set_expert_lora(model, "split") == (2, 0)  # tiny-qwen3-moe: 2 layers
    monkeypatch.setattr(torch.nn.utils.parametrize, "register_parametrization",
                        lambda *a, **k: pytest.fail("PEFT's parametrization ran"))
    calls = []
    real = ExpertLora.__call__
    monkeypatch.setattr(ExpertLora, "__call__", lambda self, *a: calls.append(self.a.shape) or real(self, *a))
    with _ExpertStacks(model) as split_ops:
        loss, grads = _loss_and_grads(model, ids)
    assert split_ops.ops == []
    assert len(calls) == 4  # gate_up and down of each layer
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    assert sum("experts" in n and "lora" in n for n in grads) == 8  # A and B of 2 parameters in 2 layers
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item() + 1e-8,
                                   msg=name)


def test_factors_are_pefts_delta_weight():
    """Fence on PEFT's storage of expert LoRA: scaling * a[e] @ b[e] is `get_delta_weight`'s expert e (transposed to
    the (in, out) orientation of the math). Fails when PEFT changes how lora_A / lora_B hold the experts."""
    model, _ = _expert_lora_model(r=4)
    for wrapper in [w for w in model.modules() if isinstance(w, ParamWrapper)]:
        factors = expert_factors(wrapper, "default")
        delta = wrapper.get_delta_weight("default")  # (E, out, in) as Qwen3-MoE stores its experts
        assert factors.a.shape == (delta.shape[0], delta.shape[2], wrapper.r["default"])
        torch.testing.assert_close(factors.scaling * factors.a @ factors.b, delta.transpose(1, 2))


def test_hand_computed_split_expert_with_an_unaligned_rank():
    """One token through two experts, LoRA on both fused weights, written out per expert; rank 3 is padded to 4."""
    torch.manual_seed(3)
    model, _ = _expert_lora_model()
    module = model.get_base_model().model.layers[0].mlp.experts.get_base_layer()
    e, hidden, inter = module.num_experts, module.hidden_dim, module.intermediate_dim
    lora = {"gate_up_proj": ExpertLora(torch.randn(e, hidden, 3), torch.randn(e, 3, 2 * inter), 0.5),
            "down_proj": ExpertLora(torch.randn(e, inter, 3), torch.randn(e, 3, hidden), 2.0)}
    x = torch.randn(1, hidden)
    index, weights = torch.tensor([[2, 0]]), torch.tensor([[0.6, 0.4]])
    expected = torch.zeros(1, hidden)
    for k, w in zip(index[0].tolist(), weights[0].tolist(), strict=True):
        gu = lora["gate_up_proj"]
        gate, up = (module.gate_up_proj[k] @ x[0] + gu.scaling * x[0] @ gu.a[k] @ gu.b[k]).chunk(2)
        h = torch.nn.functional.silu(gate) * up
        dn = lora["down_proj"]
        expected += w * (module.down_proj[k] @ h + dn.scaling * h @ dn.a[k] @ dn.b[k])
    with torch.no_grad():
        out = experts.fast_experts_forward(module, x, index, weights, lora=lora)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def _merge(wrappers):
    for module in wrappers:
        module.merge()


def test_disabled_and_merged_adapters_run_the_plain_experts():
    model, _ = _expert_lora_model()
    ids = _ids()
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    set_expert_lora(model, "split")
    lora_layers = [m for m in model.modules() if hasattr(m, "merge") and hasattr(m, "lora_A")]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)  # sums reordered
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base)
        _merge(lora_layers)  # merged: the delta sits in the weights, so it must not be added again
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
        with model.disable_adapter():  # disabled while merged: unmerged first, as PEFT does
            torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=1e-4, atol=1e-4)
        assert not any(m.merged for m in lora_layers)


def test_a_partly_merged_chain_gives_pefts_output():
    # only the inner wrapper (gate_up_proj) merged: its delta is in the weight, the outer one's (down_proj) is not
    model, _ = _expert_lora_model()
    ids = _ids()
    for wrapper in outer_param_wrappers(model):
        wrapper.base_layer.merge()
    with torch.no_grad():
        reference = model(input_ids=ids).logits  # PEFT's path
        set_expert_lora(model, "split")
        torch.testing.assert_close(model(input_ids=ids).logits, reference)


def test_only_the_outer_wrapper_changes_and_state_dict_keys_stay_pefts():
    model, _ = _expert_lora_model()
    keys = list(model.state_dict())
    outer = outer_param_wrappers(model)
    assert len(outer) == 2 and all(isinstance(w.base_layer, ParamWrapper) for w in outer)  # gate_up inside down
    set_expert_lora(model, "split")
    assert all(type(w) is SplitLoraExperts for w in outer)
    assert all(type(w.base_layer) is ParamWrapper for w in outer)
    assert list(model.state_dict()) == keys
    assert set_expert_lora(model, "peft") == (0, 0)
    assert all(type(w) is ParamWrapper for w in outer)


def test_other_experts_implementations_keep_pefts_path_and_the_log_says_so():
    split = SpeedArgs(expert_lora="split")
    model, loaded = _expert_lora_model(experts_implementation="grouped_mm")
    done = apply_fast_path(loaded, split, same_compute_dtype=True)
    assert not any(type(w) is SplitLoraExperts for w in model.modules())
    assert any("expert LoRA through PEFT" in line and "in 2 MoE layers" in line for line in done)
    model, loaded = _expert_lora_model()
    assert any("expert LoRA split" in line and "in 2 MoE" in line for line in apply_fast_path(loaded, split, True))
    assert sum(type(w) is SplitLoraExperts for w in model.modules()) == 2
    assert not any("expert LoRA" in line for line in apply_fast_path(loaded, SpeedArgs(expert_lora="peft"), True))
    assert not any(type(w) is SplitLoraExperts for w in model.modules())


@pytest.mark.integration  # compiles for a few seconds
def test_split_layers_compile_whole_and_match_eager_under_checkpointing():
    # PEFT's path keeps the experts eager (eager_regions); split LoRA registers nothing per call, so the whole layer
    # compiles and no call recompiles
    model, loaded = _expert_lora_model(dtype="bfloat16", checkpointing=True)
    set_expert_lora(model, "split")
    model.train()
    ids = _ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_eager, grads_eager = _loss_and_grads(model, ids)
    layers = model.get_base_model().get_submodule(loaded.decoder_layers)
    assert eager_regions(layers) == []
    torch._dynamo.reset()  # code another test compiled under other global state (autocast) would count as a recompile
    counters.clear()
    try:
        assert loaded.compile(backend="aot_eager") == [f"{len(layers)} decoder layers"]
        with torch._dynamo.config.patch(error_on_recompile=True), torch.autocast("cpu", dtype=torch.bfloat16):
            loss, grads = _loss_and_grads(model, ids)
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # compiled, not fallen back
        assert all(layer._compiled_call_impl is not None for layer in layers)
        torch.testing.assert_close(loss, loss_eager, rtol=1e-3, atol=1e-3)
        assert grads.keys() == grads_eager.keys() and any("experts" in n for n in grads)
        for name in grads_eager:
            scale = grads_eager[name].abs().max()
            assert (grads[name] - grads_eager[name]).abs().max() <= 1e-2 * scale + 1e-9, name
    finally:
        loaded.uncompile()
        torch._dynamo.reset()


@pytest.mark.integration
@pytest.mark.parametrize("checkpointing", [False, True])
def test_split_layers_compile_with_inductor(checkpointing):
    """The GPU's configuration on the CPU: bf16, layers compiled whole by inductor, which once failed on the LoRA
    factors' layout (mgmlora.models.experts.contiguous_factor). With checkpointing, transformers releases that
    checkpoint inside the layer's forward give dynamo a graph break and the layer runs eagerly (the GPU image's
    transformers checkpoints around the compiled layer); without it, inductor compiles the layer on every release."""
    model, loaded = _expert_lora_model(dtype="bfloat16", checkpointing=checkpointing)
    model.train()
    ids = _ids()
    reference = _loss_and_grads(copy.deepcopy(model).float(), ids)  # the same weights in fp32, eager
    loss_peft, grads_peft = _loss_and_grads(model, ids)  # what ships: PEFT's path, eager, in bf16
    set_expert_lora(model, "split")
    counters.clear()
    try:
        loaded.compile()
        # inductor rounds like eager bf16 (by default it keeps some intermediates in fp32: a different rounding on
        # every path, PEFT's included, far above this model's eager error)
        with torch._inductor.config.patch(emulate_precision_casts=True):
            loss, grads = _loss_and_grads(model, ids)
            graphs = counters["stats"]["unique_graphs"]  # the first layer's input needs no gradient: its own graph
            loss_again, _ = _loss_and_grads(model, ids)
        assert counters["stats"]["unique_graphs"] == graphs  # the second call compiled nothing new
    finally:
        loaded.uncompile()
        torch._dynamo.reset()
    if not checkpointing:
        assert graphs >= 1 and counters["inductor"]["extern_calls"] > 0
    assert loss_again == loss
    assert grads.keys() == grads_peft.keys() == reference[1].keys() and sum("experts" in n for n in grads) == 8

    # held to the fp32 reference within a small multiple of PEFT's own bf16 error (on this random model up to ~15% of
    # a gradient's largest entry); a wrong or missing term would be of the order of the gradient itself
    def error(got, want):
        return ((got.float() - want).abs().max() / want.abs().max()).item()

    assert error(loss, reference[0]) <= 2 * error(loss_peft, reference[0]) + 1e-3
    for name, want in reference[1].items():
        assert error(grads[name], want) <= 2 * error(grads_peft[name], want) + 2e-2, name


def test_apply_fast_path_splits_before_it_compiles():
    # the compile decides what stays eager from the experts' forward: split first, or the experts would stay eager
    for mode, compiled in [("split", "2 decoder layers"),
                           ("peft", "2 decoder layers, around their 2 LoRA-adapted expert modules (eager)")]:
        model, loaded = _expert_lora_model()
        try:
            done = apply_fast_path(loaded, SpeedArgs(expert_lora=mode, compile=True), same_compute_dtype=True)
        finally:
            loaded.uncompile()
            torch._dynamo.reset()
        assert f"compiled (torch.compile): {compiled}" in done


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
def test_pefts_fallback_inside_a_compiled_split_layer_runs_eagerly():
    # two adapters active at once: the split wrapper hands the call to PEFT's forward, whose per-call parametrization
    # would recompile on every call inside a compiled layer (and, checkpointed, raise CheckpointError); it runs eagerly
    # (traced, this fails under torch 2.11 / transformers 5.17, the GPU image's)
    model, loaded = _expert_lora_model(dtype="bfloat16", checkpointing=True)
    model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))  # before the split: PEFT finds its class
    model.base_model.set_adapter(["default", "other"])
    assert set_expert_lora(model, "split") == (2, 0)
    model.train()
    ids = _ids()
    counters.clear()
    try:
        loaded.compile(backend="aot_eager")
        losses = [_loss_and_grads(model, ids)[0] for _ in range(3)]
        graphs = counters["stats"]["unique_graphs"]
        _loss_and_grads(model, ids)
        assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiles call after call
    finally:
        loaded.uncompile()
        torch._dynamo.reset()
    assert losses[0] == losses[1] == losses[2]

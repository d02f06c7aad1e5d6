"""The fast path's model-level switches change speed, not results (mgmlora.training.fastpath, optim.fused)."""

import copy

import lightning as L
import pytest
import torch
from peft.tuners.lora import ParamWrapper
from torch import nn

from mgmlora.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mgmlora.data.datamodule import ChatDataModule
from mgmlora.models import load_model
from mgmlora.models.args import ModelArgs
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.fastpath import CompileWatch, apply_fast_path, set_peft_input_cast
from mgmlora.training.lora import LoraArgs
from mgmlora.training.loss import SpeedArgs, lm_loss
from mgmlora.training.module import LoraLitModule
from mgmlora.training.optim import OptimArgs
from mgmlora.training.trainable import Trainability, apply_trainability
from tests.conftest import TOKENIZER, TRAIN, connect_data, forward_hidden


def _lora_model(model_preset, dtype, **lora):
    torch.manual_seed(0)
    loaded = load_model(ModelArgs(preset=model_preset, dtype=dtype, gradient_checkpointing=False))
    model, _ = apply_trainability(loaded, LoraArgs(**lora), Trainability())
    for p in model.parameters():
        if p.requires_grad:  # non-zero LoRA B, so the adapters take part in the loss
            torch.nn.init.normal_(p, std=0.02)
    return model, loaded


def _loss_and_grads(model, batch, autocast=True, family="causal_lm"):
    model.zero_grad()
    torch.manual_seed(1)  # same dropout masks in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden, labels, head, _ = forward_hidden(model.get_base_model(), family, batch, False)
        out = lm_loss(hidden, labels, head, "chunked", 16)
    out.loss_sum.backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _batch(vocab):
    ids = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("preset,lora", [
    ("tiny-qwen3", dict(preset="balanced", lora_dropout=0.0)),
    ("tiny-qwen3-moe", dict(preset="chameleons", target_experts=True, lora_dropout=0.0)),
])
def test_skipping_peft_input_casts_is_bit_identical_under_bf16_autocast(preset, lora):
    model, loaded = _lora_model(preset, "bfloat16", **lora)  # bf16 base, fp32 adapters: PEFT casts every input
    model.train()
    batch = _batch(loaded.info.vocab_size)
    loss_cast, grads_cast = _loss_and_grads(model, batch)
    assert set_peft_input_cast(model, False) > 0
    loss_skip, grads_skip = _loss_and_grads(model, batch)
    assert torch.equal(loss_cast, loss_skip)
    assert grads_cast.keys() == grads_skip.keys() and len(grads_cast) > 0
    for name in grads_cast:
        assert torch.equal(grads_cast[name], grads_skip[name]), name


def test_layers_with_lora_dropout_keep_the_cast_their_exactness_needs():
    model, loaded = _lora_model("tiny-qwen3", "bfloat16", preset="balanced", lora_dropout=0.1)
    model.train()
    batch = _batch(loaded.info.vocab_size)
    loss_cast, _ = _loss_and_grads(model, batch)
    assert set_peft_input_cast(model, False) == 0
    assert torch.equal(_loss_and_grads(model, batch)[0], loss_cast)
    for layer in [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]:
        layer.cast_input_dtype_enabled = False  # forcing it: bf16 dropout rounds its 1/(1-p) rescale
    assert not torch.equal(_loss_and_grads(model, batch)[0], loss_cast)


def test_the_input_cast_is_kept_where_skipping_it_would_break():
    model, loaded = _lora_model("tiny-qwen3", "bfloat16", preset="balanced", lora_dropout=0.0)
    # without autocast, a bf16 input meets fp32 adapters: only PEFT's cast makes this work
    assert apply_fast_path(loaded, SpeedArgs(), same_compute_dtype=False) == []
    _loss_and_grads(model, _batch(loaded.info.vocab_size), autocast=False)
    set_peft_input_cast(model, False)
    with pytest.raises(RuntimeError):  # the switch really removes the cast
        _loss_and_grads(model, _batch(loaded.info.vocab_size), autocast=False)
    applied = apply_fast_path(loaded, SpeedArgs(peft_input_cast=True), True)
    assert applied == []  # asked to keep it


def _a_copy_runs_its_own_weights_eagerly(mgm, batch):
    """A deep-copied compiled MGM (as pickling, through `__getstate__`): the compiled step is bound to the original."""
    twin = copy.deepcopy(mgm)
    assert twin._compiled_image_tokens is None and twin.vision_tower._compiled_call_impl is None
    images = batch["images"], batch["images_aux"]
    with torch.no_grad():
        twin.mm_projector[2].bias.add_(1.0)  # the copy's own weights must decide its output
        torch.testing.assert_close(twin.encode_images(*images), mgm.encode_images(*images) + 1.0)


def _mgm_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[2, 5, IMAGE_TOKEN_INDEX, 7, 8, 9, 10], [2, IMAGE_TOKEN_INDEX, 6, 7, 8, 0, 0]])
    labels = ids.masked_fill(torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1, 1]], dtype=torch.bool),
                             IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": (torch.arange(7) < torch.tensor([[7], [5]])).long(), "labels": labels,
            "images": torch.randn(2, 3, 48, 48, generator=g), "images_aux": torch.randn(2, 3, 96, 96, generator=g)}


# each case compiles for a few seconds: both in the integration tier (test_checkpointed_layers_compile_whole keeps
# the text models' compile in the fast tier)
@pytest.mark.parametrize("preset,family", [pytest.param("tiny-qwen3", "causal_lm", marks=pytest.mark.integration),
                                           pytest.param("tiny-mgm", "mgm", marks=pytest.mark.integration)])
def test_compiled_regions_compute_the_eager_loss_and_gradients(preset, family):
    model, loaded = _lora_model(preset, "float32", preset="balanced", lora_dropout=0.0)
    batch = _batch(loaded.info.vocab_size) if family == "causal_lm" else _mgm_batch()
    keys = list(model.state_dict())
    loss_eager, grads_eager = _loss_and_grads(model, batch, autocast=False, family=family)
    # aot_eager traces forward and backward like inductor, without needing a C++ compiler on the CI machine
    applied = loaded.compile(backend="aot_eager")
    layers = model.get_base_model().get_submodule(loaded.decoder_layers)
    assert applied[0] == f"{len(layers)} decoder layers" and all(layer._compiled_call_impl is not None
                                                                   for layer in layers)
    image_calls = []
    if family == "mgm":  # the image path is compiled too, and the forward goes through its compiled step
        mgm = loaded.model
        assert len(applied) == 2 and mgm._compiled_image_tokens is not None
        assert mgm.vision_tower._compiled_call_impl is not None and mgm.vision_tower_aux._compiled_call_impl is not None
        compiled_step = mgm._compiled_image_tokens
        mgm._compiled_image_tokens = lambda *a: image_calls.append(1) or compiled_step(*a)
    loss_compiled, grads_compiled = _loss_and_grads(model, batch, autocast=False, family=family)
    assert list(model.state_dict()) == keys  # checkpoints and adapters keep their names
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
    assert grads_compiled.keys() == grads_eager.keys()
    for name in grads_eager:
        # aot_eager's decompositions (layer norm, softmax) reorder float sums: differences of ~1e-6 of each
        # gradient's largest entry (a dropped or doubled term would be of the order of the gradient itself)
        scale = grads_eager[name].abs().max()
        assert (grads_compiled[name] - grads_eager[name]).abs().max() <= 1e-5 * scale + 1e-9, name
    if family == "mgm":
        assert image_calls == [1]  # one micro-batch, one call of the compiled upsampling + mining + projector
        assert any("vlm_uni_aux_projector" in n for n in grads_eager)  # the mining trains through it
        loaded.model._compiled_image_tokens = compiled_step  # the spy off
        _a_copy_runs_its_own_weights_eagerly(loaded.model, batch)
    loaded.uncompile()
    assert all(layer._compiled_call_impl is None for layer in layers)
    if family == "mgm":
        assert loaded.model._compiled_image_tokens is None and loaded.model.vision_tower._compiled_call_impl is None
    torch._dynamo.reset()


@pytest.mark.parametrize("preset,head_dim", [("tiny-qwen3", 16), ("tiny-mgm", 16), ("qwen3-0.6b", 128)])
def test_packed_layers_compile_without_stride_padding_where_a_head_stride_could_be_padded(preset, head_dim,
                                                                                          monkeypatch):
    # inductor pads a stride to 128 bytes; a bf16 head's stride over a packed row, tokens x head_dim x 2 bytes, can be
    # unaligned only where head_dim x 2 is not a multiple of 128 (bench/results/*packed_compile_padding*)
    with torch.device("meta" if preset == "qwen3-0.6b" else "cpu"):
        loaded = load_model(ModelArgs(preset=preset, dtype="bfloat16"))
    padded_somewhere = (head_dim * 2) % 128 != 0
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **kw: calls.append((self, kw)))  # records, compiles none
    for packed, backend in ((False, "inductor"), (True, "inductor"), (True, "aot_eager")):
        calls.clear()
        loaded.compile(packed=packed, backend=backend)
        layers = list(loaded.model.get_submodule(loaded.decoder_layers))
        assert [m for m, _ in calls if m in layers] == layers  # each decoder layer, with the same options
        for module, kw in calls:
            unpadded = packed and padded_somewhere and module in layers and backend == "inductor"
            assert kw.get("options") == ({"comprehensive_padding": False} if unpadded else None), (packed, backend)
            assert kw["backend"] == backend
    if padded_somewhere:  # torch.compile refuses options beside a mode: said before anything compiles
        with pytest.raises(ValueError, match="mode='max-autotune'"):
            loaded.compile(packed=True, mode="max-autotune")


@pytest.mark.parametrize("preset,family", [("tiny-qwen3", "causal_lm"), ("tiny-qwen3-moe", "causal_lm"),
                                           pytest.param("tiny-mgm", "mgm", marks=pytest.mark.integration)])
def test_checkpointed_layers_compile_whole(preset, family):
    # transformers 5.25 checkpoints inside each layer's forward, and its `kernels` dependency flips state there: without
    # mgmlora.models.torch_private.trace_through_checkpoint_side_effects dynamo broke the graph and every layer ran
    # eagerly, so `speed.compile` compiled nothing (transformers 5.17 checkpoints around the layer: compiled either way)
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    loaded = load_model(ModelArgs(preset=preset, dtype="bfloat16", gradient_checkpointing=True))
    model, _ = apply_trainability(loaded, LoraArgs(preset="chameleons", lora_dropout=0.0), Trainability())
    model.train()
    layers = model.get_base_model().get_submodule(loaded.decoder_layers)
    graphs = []
    torch._dynamo.reset()
    counters.clear()
    batch = _batch(loaded.info.vocab_size) if family == "causal_lm" else _mgm_batch()
    try:
        loaded.compile(backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
        # MGM's towers install transformers' output-capturing hooks on their first call (a one-time graph break)
        _loss_and_grads(model, batch, autocast=False, family=family)
        counters.clear()
        _loss_and_grads(model, batch, autocast=False, family=family)
    finally:
        loaded.uncompile()
        torch._dynamo.reset()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])  # the second step
    traced = [node for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
              for node in m.graph.nodes]
    # the layers' bodies were traced (their attention), not only a call into an eagerly run checkpoint
    assert any(node.target is torch.nn.functional.scaled_dot_product_attention or "attention" in str(node.target)
               for node in traced), len(graphs)
    assert len(layers) >= 2


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
def test_layers_with_expert_lora_compile_around_the_experts_and_match_eager_under_checkpointing():
    # PEFT's expert LoRA re-registers a parametrization (a new module class) on every call: compiled, each call
    # recompiled until dynamo's recompile_limit sent the rest eager, and a layer whose forward ran compiled but whose
    # checkpointed recompute ran eagerly raised CheckpointError (Qwen3-30B-A3B's 48 layers, torch 2.11 /
    # transformers 5.17). Any recompile is an error here: with those versions the old whole-layer compile fails
    # (RecompileError in PEFT's experts code), and a silent eager fallback cannot pass for compiled. Newer
    # transformers checkpoint inside the compiled forward, where the old compile did not recompile; there the
    # structural checks below hold the fix.
    torch.manual_seed(0)
    loaded = load_model(ModelArgs(preset="tiny-qwen3-moe", dtype="bfloat16", gradient_checkpointing=True))
    model, _ = apply_trainability(loaded, LoraArgs(preset="chameleons", target_experts=True, lora_dropout=0.0),
                                  Trainability())
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    batch = _batch(loaded.info.vocab_size)
    loss_eager, grads_eager = _loss_and_grads(model, batch)  # bf16 base under bf16 autocast, as on the GPU
    layers = model.get_base_model().get_submodule(loaded.decoder_layers)
    assert all(layer.gradient_checkpointing for layer in layers)
    experts = [layer.mlp.experts for layer in layers]
    assert all(isinstance(e, ParamWrapper) for e in experts)
    try:
        applied = loaded.compile(backend="aot_eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            loss_compiled, grads_compiled = _loss_and_grads(model, batch)
        torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-3, atol=1e-3)
        assert grads_compiled.keys() == grads_eager.keys()
        assert any("experts" in n for n in grads_eager)  # the experts' LoRA trains
        for name in grads_eager:
            scale = grads_eager[name].abs().max()
            assert (grads_compiled[name] - grads_eager[name]).abs().max() <= 1e-2 * scale + 1e-9, name
        assert applied == [f"{len(layers)} decoder layers, around their {len(layers)} LoRA-adapted expert modules "
                           "(eager)"]
        for layer in layers:  # the rest of each layer is compiled, the experts (every PEFT wrapper level) are not
            assert layer._compiled_call_impl is None and layer.mlp._compiled_call_impl is None
            assert all(m._compiled_call_impl is not None for m in (layer.self_attn, layer.input_layernorm,
                                                                    layer.post_attention_layernorm, layer.mlp.gate))
            assert all(m._compiled_call_impl is None for m in layer.mlp.experts.modules())
    finally:
        loaded.uncompile()
        torch._dynamo.reset()
    assert all(m._compiled_call_impl is None for m in layers.modules())


class _ClipSpy(LoraLitModule):
    norms: list = []
    optimizers: list = []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        self.optimizers.append(optimizer)


def test_fused_adamw_trains_and_clips_under_bf16_mixed(tmp_path):
    model = ModelArgs(preset="tiny-qwen3", tokenizer_path=str(TOKENIZER), dtype="float32", gradient_checkpointing=False)
    module = _ClipSpy(model, LoraArgs(preset="balanced", lora_dropout=0.0),
                      OptimArgs(lr=1e-3, warmup_ratio=0.0, fused=True), speed=SpeedArgs())
    # Lightning alone raises here ("does not allow for gradient clipping ... fused optimizer")
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=3, gradient_clip_val=1e-3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, plugins=[AdapterCheckpointIO()], default_root_dir=tmp_path)
    trainer.fit(module, connect_data(ChatDataModule(str(TRAIN), batch_size=4, seed=1), module))
    assert trainer.global_step == 3 and len(module.norms) == 3
    assert all(getattr(opt, "defaults", {}).get("fused") for opt in module.optimizers)
    assert max(module.norms) <= 1e-3 * 1.01  # clipped to gradient_clip_val
    layers = [m for m in module.model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)  # bf16-mixed: the casts were skipped


@pytest.mark.parametrize("stage,skip_cast", [(2, True), (3, False)])
def test_peft_input_cast_is_kept_under_zero3_where_lora_weights_stay_fp32(stage, skip_cast):
    """ZeRO-1/2 cast every weight to bf16; ZeRO-3 leaves PEFT's LoRA weights fp32 (their input cast is then needed)."""
    from mgmlora.training.strategies import MgmDeepSpeedStrategy, input_cast_needed

    trainer = L.Trainer(strategy=MgmDeepSpeedStrategy(stage=stage), accelerator="cpu", devices=1,
                        precision="bf16-mixed", logger=False, enable_checkpointing=False)
    assert input_cast_needed(trainer, "bfloat16") is not skip_cast


@pytest.mark.parametrize("body,compiled,says", [
    ("clean", True, None),
    ("break", True, "2 graph(s) compiled; 1 graph break(s), first: "),
    ("eager", False, "compiled nothing in the first step"),
])
def test_compile_watch_says_whether_anything_compiled(body, compiled, says):
    class Layer(torch.nn.Module):  # defined here: dynamo skips torch's own modules at the top level
        def forward(self, x):
            x = x.relu() + 1
            if body == "break":
                torch._dynamo.graph_break()
            return x * 2

    layer = Layer()
    if body == "eager":
        layer.forward = torch.compiler.disable(layer.forward)
    torch._dynamo.reset()
    watch = CompileWatch()
    try:
        layer.compile(backend="eager")
        layer(torch.ones(3))
        got_compiled, line = watch.outcome()
    finally:
        torch._dynamo.reset()
    assert got_compiled is compiled
    assert line == says if says is None else says in line


def test_compile_watch_leaves_the_compiled_loss_out():
    # speed.loss: compiled compiles in the same step as the layers: a model whose layers compiled nothing says so still
    from mgmlora.training.loss import CompiledChunkLoss

    layer = torch.nn.Linear(4, 4)
    layer.forward = torch.compiler.disable(layer.forward)
    head = torch.nn.Linear(4, 6)
    torch._dynamo.reset()
    watch = CompileWatch()
    try:
        hidden = layer(torch.ones(3, 4))
        loss = CompiledChunkLoss(backend="eager")
        before = CompiledChunkLoss.graphs
        loss(hidden, head, torch.tensor([0, 5, 2]))
        assert CompiledChunkLoss.graphs == before + 1  # the loss did compile
        got_compiled, line = watch.outcome()
    finally:
        torch._dynamo.reset()
    assert not got_compiled and "compiled nothing in the first step" in line

"""QLoRA's 4-bit base (mgmlora.models.quantization) on tiny models: it computes with the dequantised weights, LoRA on
attention and on 4-bit experts gets the gradients of the same LoRA on a full-precision copy of those weights, and
nothing else trains."""

import importlib.util

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from mgmlora.batch import Batch
from mgmlora.data.datamodule import ChatDataModule
from mgmlora.errors import UsageError
from mgmlora.models import load_model
from mgmlora.models.args import ModelArgs
from mgmlora.models.nf4 import dequantize, quantize
from mgmlora.models.quantization import Nf4Linear, QuantizationArgs, checkpointing_required, set_expert_backward
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.expert_lora import set_expert_lora
from mgmlora.training.fastpath import apply_fast_path
from mgmlora.training.lora import LoraArgs
from mgmlora.training.loss import SpeedArgs
from mgmlora.training.module import LoraLitModule
from mgmlora.training.optim import OptimArgs
from mgmlora.training.trainable import Trainability, apply_trainability
from tests.conftest import TOKENIZER, TRAIN, StepLosses
from tests.models.test_mgm import _batch as _mgm_batch

BACKENDS = ["torch"] + (["bitsandbytes"] if importlib.util.find_spec("bitsandbytes") else [])


def _args(preset, backend="torch", checkpointing=True, quant_type="nf4", expert_products="dequantized", **kw):
    quant = QuantizationArgs(quant_type=quant_type, compute_dtype="float32", backend=backend, double_quant=True,
                             expert_products=expert_products)
    return ModelArgs(preset=preset, dtype="float32", gradient_checkpointing=checkpointing, quantization=quant, **kw)


def _fake_quantized(preset, backend="torch"):
    """The full-precision model with every decoder weight replaced by its NF4 round trip (the reference).

    The round trip uses the backend under test: bitsandbytes' 8-bit rounding of the scales differs on rare ties
    (tests/models/test_nf4.py), and a tiny weight difference can flip an MoE token's top-k experts.
    """
    loaded = load_model(_args(preset, backend), quantize=False)  # the same random weights, not quantised
    for module in loaded.model.model.layers.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, nn.Linear) and name == "weight" or param.ndim == 3:
                param.data = dequantize(quantize(param.data, True, torch.float32, backend), backend)
    return loaded


def _batch():
    ids = torch.tensor([[5, 17, 33, 48, 9, 70, 11, 2], [3, 44, 21, 8, 90, 6, 0, 0]])
    mask = (torch.arange(8) < torch.tensor([[8], [6]])).long()
    return Batch(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _loss(loaded):
    hidden, labels, head, _ = loaded.forward_hidden(_batch(), packed=False)
    logits = head(hidden)[:, :-1].float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_the_4bit_model_computes_with_the_dequantised_weights(preset, backend):
    quantized = load_model(_args(preset, backend))
    layer = quantized.model.model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == ("Linear4bit" if backend == "bitsandbytes" else "Nf4Linear")
    if quantized.moe:  # the experts' own parameters hold no memory: one element expanded to the full shape
        experts = layer.mlp.experts
        assert experts.gate_up_proj.stride() == (0, 0, 0) and experts.nf4_gate_up_proj.codes.dtype == torch.uint8
    reference, full = _fake_quantized(preset, backend), load_model(_args(preset, backend), quantize=False)
    with torch.no_grad():
        got = quantized.model(input_ids=_batch().input_ids).logits
        torch.testing.assert_close(got, reference.model(input_ids=_batch().input_ids).logits, rtol=1e-4, atol=1e-4)
        # the test can fail: 4 bits are not the full-precision weights
        assert not torch.allclose(got, full.model(input_ids=_batch().input_ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("expert_lora", ["peft", "split"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_on_attention_and_4bit_experts_gets_the_gradients_of_lora_on_the_dequantised_weights(backend, expert_lora):
    # the reference: PEFT's own expert LoRA on the dequantised weights held in full precision
    lora = LoraArgs(preset="aggressive", lora_dropout=0.0, target_experts=True, init_lora_weights="gaussian")
    torch.manual_seed(0)
    quantized = load_model(_args("tiny-qwen3-moe", backend))
    model, _ = apply_trainability(quantized, lora, Trainability())
    assert set_expert_lora(model, expert_lora)[0] == (2 if expert_lora == "split" else 0)
    torch.manual_seed(0)
    reference = _fake_quantized("tiny-qwen3-moe", backend)
    ref_model, _ = apply_trainability(reference, lora, Trainability())
    # gaussian init leaves lora_B at zero: make it non-zero (the same in both) so the delta is part of the forward
    torch.manual_seed(1)
    for (name, p), (ref_name, q) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True):
        assert name == ref_name
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
            q.data.copy_(p.data)
    codes = {n: b.clone() for n, b in model.named_buffers() if n.endswith("codes")}
    model.train(), ref_model.train()
    loss, ref_loss = _loss(quantized), _loss(reference)
    loss.backward(), ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in grads) and any(".experts." in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".experts." in n)
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers() if n.endswith("codes"))
    # the dequantised experts were not kept on the module after the backward pass (one layer at a time)
    fused = [p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    assert fused and all(p.stride() == (0, 0, 0) for p in fused)


def _most_dequantised_alive(loaded, monkeypatch) -> int:
    """Forward + backward, counting the dequantised expert tensors alive at each dequantisation (weak references)."""
    import weakref

    from mgmlora.models import fp8, quantization

    alive, most = weakref.WeakSet(), [0]

    def counting(original):
        def dequantize(*args, **kwargs):
            out = original(*args, **kwargs)
            if out.ndim == 3:
                alive.add(out.untyped_storage())  # the storage: autograd may keep an alias, not this object
                most[0] = max(most[0], len(alive))
            return out
        return dequantize

    for module in (quantization, fp8):  # what every dequantisation of a stored weight calls (NF4's, FP8's)
        monkeypatch.setattr(module, "dequantize", counting(module.dequantize))
    _loss(loaded).backward()
    return most[0]


@pytest.mark.parametrize("quant_type", ["nf4", "fp8"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_dequantised_experts_alive_at_once(checkpointing, quant_type, monkeypatch):
    from mgmlora.training.lora import apply_lora, plan_lora

    # 2 layers, 2 fused tensors each; FP8 with dequantized expert products (the default)
    loaded = load_model(_args("tiny-qwen3-moe", checkpointing=checkpointing, quant_type=quant_type))
    model = apply_lora(loaded.model, plan_lora(loaded.model, LoraArgs(preset="balanced", lora_dropout=0.0),
                                               decoder_layers=loaded.decoder_layers, moe=True))
    set_expert_backward(model, checkpointing)  # as the fast path sets it
    model.train()
    # Under checkpointing a layer's two are alive (the recompute of the other layer comes after they are freed).
    # Without it NF4 keeps every layer's four (what training refuses: quantization.checkpointing_required); FP8's
    # products dequantise again in the backward and keep neither, one tensor at a time
    expected = 2 if checkpointing else 1 if quant_type == "fp8" else 4
    assert _most_dequantised_alive(loaded, monkeypatch) == expected


def _saved_fp8_expert_tensors(backend: str) -> tuple[list, list]:
    """(floating, integer) tensors of an expert weight's size autograd keeps through one compiled or eager step of a
    tiny bf16 MoE on the FP8 base, without checkpointing."""
    torch.manual_seed(0)
    quant = QuantizationArgs(quant_type="fp8", compute_dtype="bfloat16")
    loaded = load_model(ModelArgs(preset="tiny-qwen3-moe", dtype="bfloat16", gradient_checkpointing=False,
                                  quantization=quant))
    model, _ = apply_trainability(loaded, LoraArgs(preset="aggressive", lora_dropout=0.0), Trainability())
    assert set_expert_backward(model, checkpointed=False) == 4
    model.train()
    experts = loaded.model.model.layers[0].mlp.experts
    sizes = {experts.get_submodule(f"fp8_{n}").shape.numel() for n in ("gate_up_proj", "down_proj")}
    floating, integer = [], []

    def pack(t):
        if t.numel() in sizes:
            (floating if t.is_floating_point() else integer).append(tuple(t.shape))  # integer: the stored codes
        return t

    try:
        if backend != "eager":
            loaded.compile(backend=backend)
            _loss(loaded).backward()  # compiled here, outside the count
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _loss(loaded)
        loss.backward()
    finally:
        loaded.uncompile()
        torch._dynamo.reset()
    return floating, integer


@pytest.mark.parametrize("backend", ["eager", pytest.param("aot_eager", marks=pytest.mark.integration),
                                     pytest.param("inductor", marks=pytest.mark.integration)])
def test_frozen_fp8_experts_keep_only_their_codes_for_the_backward_compiled_or_not(backend):
    # torch.compile's joint graph would merge a dequantisation in the forward with the one in the backward and keep
    # the weight between them; the opaque operator keeps the codes: 2 layers x 2 fused weights
    floating, integer = _saved_fp8_expert_tensors(backend)
    assert floating == [] and len(integer) == 4, (floating, integer)


def test_frozen_fp8_experts_train_alike_with_and_without_checkpointing():
    results = []
    for checkpointing in (True, False):
        torch.manual_seed(0)  # the same weights and LoRA initialisation both times
        loaded = load_model(_args("tiny-qwen3-moe", checkpointing=checkpointing, quant_type="fp8"))
        model, _ = apply_trainability(loaded, LoraArgs(preset="balanced", lora_dropout=0.0), Trainability())
        set_expert_backward(model, checkpointing)  # the plain product under checkpointing, the operator without
        model.train()
        loss = _loss(loaded)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_ckpt, grads_ckpt), (loss_plain, grads_plain) = results
    torch.testing.assert_close(loss_plain, loss_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys() and any(g.abs().sum() > 0 for g in grads_plain.values())
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grad, grads_ckpt[name], msg=name)


@pytest.mark.parametrize(("quant_type", "moe", "peft_expert_lora", "needed"), [
    (None, True, True, None),  # a bf16 base's experts are weights autograd holds anyway
    ("nf4", False, True, None), ("fp8", False, True, None),  # no fused experts to dequantise
    ("nf4", True, False, "NF4 experts"),  # dequantised per product, kept by autograd
    ("fp8", True, False, None),  # the codes-only operator
    ("fp8", True, True, "PEFT's expert LoRA")])  # W + delta formed and kept
def test_which_bases_need_checkpointing_is_one_rule(quant_type, moe, peft_expert_lora, needed):
    reason = checkpointing_required(quant_type, moe, peft_expert_lora)
    assert reason is None if needed is None else (needed in reason and "gradient_checkpointing: true" in reason)


def test_4bit_settings_that_cannot_train_are_refused_with_the_key_to_change():
    loaded = load_model(_args("tiny-qwen3-moe", checkpointing=False))
    apply_trainability(loaded, LoraArgs(), Trainability())
    with pytest.raises(UsageError, match="gradient_checkpointing: true.*NF4 experts"):  # before any compute
        apply_fast_path(loaded, SpeedArgs(), same_compute_dtype=True)
    with pytest.raises(UsageError, match="trainable.llm: lora"):
        apply_trainability(load_model(_args("tiny-qwen3")), LoraArgs(), Trainability(llm="full"))
    with pytest.raises(UsageError, match="experts_implementation: mgmlora_grouped_mm"):
        load_model(_args("tiny-qwen3-moe", experts_implementation="eager"))


@pytest.mark.parametrize("quant_type", ["nf4", "fp8"])
def test_a_float32_model_runs_its_quantised_base_in_its_own_dtype_or_in_bfloat16(quant_type):
    # the CPU demos are float32: `quantization: {quant_type: ...}` alone crashed in attention (a bfloat16 value
    # projection beside float32 queries and keys) before the compute dtype followed the model's
    def loaded(**quant):
        torch.manual_seed(0)  # the same random weights in every model
        return load_model(ModelArgs(preset="tiny-qwen3", dtype="float32",
                                    quantization={"backend": "torch", **quant} if quant else None))

    default, bf16 = loaded(quant_type=quant_type), loaded(quant_type=quant_type, compute_dtype="bfloat16")
    assert default.quantized.compute_dtype == "float32" and bf16.quantized.compute_dtype == "bfloat16"
    # decided when the layers are quantised: the settings a run saves keep null, so a tool that loads the model in
    # another dtype (or on a GPU) decides again; FP8 on a GPU computes in bfloat16, its kernels' only output
    settings = ModelArgs(preset="tiny-qwen3", dtype="float32", quantization={"quant_type": quant_type})
    assert settings.quantization.compute_dtype is None
    on_gpu = settings.quantization.resolved("float32", "cuda").compute_dtype
    assert on_gpu == ("bfloat16" if quant_type == "fp8" else "float32")
    assert settings.quantization.resolved("bfloat16", "cpu").compute_dtype == "bfloat16"
    reference = loaded(quant_type=quant_type, compute_dtype="float32")  # the compute dtype spelled out
    losses = {}
    for name, model in (("default", default), ("bf16", bf16), ("reference", reference), ("full", loaded())):
        loss = _loss(model)
        loss.backward()  # through every quantised product, back to the embeddings
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        losses[name] = loss.item()
    assert losses["default"] == losses["reference"]
    # bfloat16 products round the same quantised function: they move the loss, but less than the quantisation itself
    # moves it from the full-precision weights' (a random tiny model is sensitive to both)
    assert 0 < abs(losses["bf16"] - losses["reference"]) < abs(losses["reference"] - losses["full"])


def test_mgm_quantises_the_gemma_decoder_only_and_trains_lora_and_the_projector():
    loaded = load_model(_args("tiny-mgm"))
    assert all(type(m) is not nn.Linear for m in loaded.model.llm.model.layers.modules())
    assert any(isinstance(m, Nf4Linear) for m in loaded.model.llm.model.layers.modules())
    for prefix in ("mm_projector", "vision_tower", "vision_tower_aux", "vlm_uni_aux_projector"):  # as without 4 bits
        assert not any(isinstance(m, Nf4Linear) for m in loaded.model.get_submodule(prefix).modules())
    model, _ = apply_trainability(loaded, LoraArgs(preset="balanced", lora_dropout=0.0), Trainability())
    model.train()
    ids, mask, labels, images, aux = _mgm_batch()
    batch = Batch(input_ids=ids, attention_mask=mask, labels=labels, model_inputs={"images": images, "images_aux": aux})
    hidden, _, head, _ = loaded.forward_hidden(batch, packed=False)
    head(hidden).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in grads) and any("mm_projector" in n for n in grads)
    assert not any("vision_tower" in n for n in grads)


def _fit(tmp_path, name, max_steps, ckpt_path=None, quant_type="nf4"):
    torch.manual_seed(0)
    model = _args("tiny-qwen3-moe", quant_type=quant_type, tokenizer_path=str(TOKENIZER))
    module = LoraLitModule(model, LoraArgs(preset="chameleons", lora_dropout=0.0, target_experts=True),
                           OptimArgs(lr=1e-2, warmup_ratio=0.0))
    record = StepLosses()
    path = tmp_path / "train.jsonl"
    path.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:8]))
    data = ChatDataModule(str(path), batch_size=2, shuffle=True, seed=3)
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tmp_path,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / name, filename="{step}", every_n_train_steps=2,
                                                   save_top_k=-1), record],
                        plugins=[AdapterCheckpointIO()], limit_val_batches=0)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return record.losses


@pytest.mark.integration
@pytest.mark.parametrize("quant_type", ["nf4", "fp8"])
def test_qlora_fit_with_expert_lora_resumes_to_the_uninterrupted_run(tmp_path, quant_type):
    straight = _fit(tmp_path, "straight", max_steps=4, quant_type=quant_type)
    assert straight[4] < straight[1]  # it learns
    resumed = _fit(tmp_path, "resumed", max_steps=4, ckpt_path=tmp_path / "straight" / "step=2.ckpt",
                   quant_type=quant_type)
    assert {s: resumed[s] for s in (3, 4)} == {s: straight[s] for s in (3, 4)}


def test_auto_runs_bitsandbytes_on_cuda_only(monkeypatch):
    """bitsandbytes' CPU backend dequantises some shapes wrongly (mgmlora.models.nf4): auto keeps the CPU on PyTorch."""
    import mgmlora.models.quantization as quantization

    monkeypatch.setattr(quantization, "bitsandbytes_available", lambda: True)
    auto = QuantizationArgs()
    assert auto.resolved_backend(torch.device("cpu")) == "torch"
    assert auto.resolved_backend(torch.device("cuda", 0)) == "bitsandbytes"
    assert QuantizationArgs(backend="bitsandbytes").resolved_backend(torch.device("cpu")) == "bitsandbytes"
    monkeypatch.setattr(quantization, "bitsandbytes_available", lambda: False)
    assert auto.resolved_backend(torch.device("cuda", 0)) == "torch"

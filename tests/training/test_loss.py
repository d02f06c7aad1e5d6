"""The fast loss paths and padding-free micro-batches compute what the plain path computes (mgmlora.training.loss)."""

import importlib.util

import lightning as L
import pytest
import torch

from mgmlora.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Batch
from mgmlora.data.datamodule import ChatDataModule
from mgmlora.models.args import ModelArgs
from mgmlora.models.mgm import MGMConfig
from mgmlora.models.mgm_checkpoint import build_mgm
from mgmlora.models.packing import pack_padded
from mgmlora.models.registry import MGM_PRESETS
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.lora import LoraArgs
from mgmlora.training.loss import SpeedArgs, lm_loss
from mgmlora.training.module import LoraLitModule
from mgmlora.training.optim import OptimArgs
from tests.conftest import TOKENIZER, TRAIN, connect_data, forward_hidden, tiny_model

X = IGNORE_INDEX


def _text_batch():
    """Two right-padded rows of different lengths with answer-only labels."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 9), generator=g)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    labels = ids.clone()
    labels[:, :4] = X
    labels[mask == 0] = X
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, family, batch, impl, packed, chunk=3):
    model.zero_grad()
    hidden, labels, head, _ = forward_hidden(model, family, batch, packed)
    out = lm_loss(hidden, labels, head, impl, chunk)
    out.loss_sum.backward()
    return out, _grads(model)


def test_pack_padded_drops_padding_and_masks_each_samples_first_label():
    batch = _text_batch()
    row = pack_padded(batch["input_ids"], batch["attention_mask"], batch["labels"])
    ids, positions, labels = row.values, row.positions, row.labels
    assert ids.shape == positions.shape == labels.shape == (1, 15)
    assert positions[0].tolist() == list(range(9)) + list(range(6))
    assert labels[0, 9] == X  # would otherwise be the target of sample 0's last position
    # the same supervised targets as the padded layout after the causal shift
    padded_targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != X].tolist()
    assert labels[0, 1:][labels[0, 1:] != X].tolist() == padded_targets


def test_packing_from_the_host_copy_builds_the_same_row_and_reads_nothing_on_the_device():
    batch = Batch(**_text_batch())
    reference = pack_padded(batch.input_ids, batch.attention_mask, batch.labels, pad_to=4)
    row = pack_padded(batch.input_ids, batch.attention_mask, batch.labels, pad_to=4, host=batch)
    assert row.lengths == reference.lengths == [9, 6, 1]
    for name in ("values", "positions", "labels"):
        assert torch.equal(getattr(row, name), getattr(reference, name)), name
    assert torch.equal(row.host_labels, reference.labels)
    moved = batch.to("meta")  # a data-dependent read of a meta tensor raises, as on a GPU it would sync
    row = pack_padded(moved.input_ids, moved.attention_mask, moved.labels, pad_to=4, host=moved.on_host())
    assert row.values.is_meta and row.labels.is_meta and row.lengths == [9, 6, 1]
    with pytest.raises((RuntimeError, NotImplementedError)):
        pack_padded(moved.input_ids, moved.attention_mask, moved.labels)


def test_the_loss_from_host_labels_is_the_device_labels_loss_bit_for_bit():
    impl = "chunked"
    torch.manual_seed(0)
    labels = _text_batch()["labels"]  # (2, 9), 7 targets after the shift
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    head = torch.nn.Linear(16, 100, bias=False)
    outs = []
    for host_labels in (None, labels):
        hidden.grad = None
        out = lm_loss(hidden, labels, head, impl, 3, with_preds=True, host_labels=host_labels)
        out.loss_sum.backward()
        outs.append((out, hidden.grad.clone()))
    (ref, ref_grad), (out, grad) = outs
    assert int(out.n_tokens) == int(ref.n_tokens) == 7
    assert torch.equal(out.loss_sum, ref.loss_sum) and torch.equal(grad, ref_grad)
    assert torch.equal(out.preds, ref.preds) and torch.equal(out.targets, ref.targets)
    # on the meta device: the positions come from the host labels, nothing reads the device
    meta = lm_loss(hidden.detach().to("meta"), labels.to("meta"), head.to("meta"), impl, 3, host_labels=labels)
    assert meta.loss_sum.is_meta and meta.n_tokens.is_meta
    with pytest.raises((RuntimeError, NotImplementedError)):
        lm_loss(hidden.detach().to("meta"), labels.to("meta"), head, impl, 3)


@pytest.mark.parametrize("impl,packed", [("chunked", False), ("full", True), ("chunked", True)])
def test_fast_paths_give_the_plain_loss_and_gradients_on_a_text_lm(impl, packed):
    model = tiny_model("tiny-qwen3")
    model.requires_grad_(True)
    batch = _text_batch()
    ref, ref_grads = _run(model, "causal_lm", batch, "full", False)
    out, grads = _run(model, "causal_lm", batch, impl, packed)
    assert out.n_tokens == ref.n_tokens == 7
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("packed", [False, True])
def test_fast_paths_give_the_plain_loss_and_gradients_on_mgm(packed):
    torch.manual_seed(0)
    model = build_mgm(MGMConfig.from_dict(MGM_PRESETS["tiny-mgm"]), torch.float32)
    model.requires_grad_(False)
    model.mm_projector.requires_grad_(True)
    model.llm.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.tensor([[2, 5, IMAGE_TOKEN_INDEX, 7, 8, 9], [2, 5, 6, 7, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
             "labels": torch.tensor([[X, X, X, 7, 8, 9], [X, X, 6, 7, X, X]]),
             "images": torch.randn(2, 3, 48, 48, generator=g), "images_aux": torch.randn(2, 3, 96, 96, generator=g)}
    ref, ref_grads = _run(model, "mgm", batch, "full", False)
    out, grads = _run(model, "mgm", batch, "chunked", packed, chunk=2)
    assert out.n_tokens == ref.n_tokens == 5
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(ref_grads) and grads
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


def test_evaluation_predictions_match_the_full_logits_argmax():
    model = tiny_model("tiny-qwen3")
    batch = _text_batch()
    with torch.no_grad():
        hidden, labels, head, _ = forward_hidden(model, "causal_lm", batch, False)
        full = lm_loss(hidden, labels, head, "full", 3, with_preds=True)
        chunked = lm_loss(hidden, labels, head, "chunked", 3, with_preds=True)
    assert torch.equal(full.preds, chunked.preds) and torch.equal(full.targets, chunked.targets)


def test_liger_without_the_package_is_a_clear_error_when_the_run_starts(monkeypatch):
    """Parsing a Liger config works anywhere (estimator, sample viewer); starting a run without Liger fails first."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    speed = SpeedArgs(loss="liger")  # no error while parsing
    with pytest.raises(ValueError, match="speed.loss=liger needs Liger-Kernel"):
        LoraLitModule(ModelArgs(preset="tiny-qwen3", tokenizer_path=str(TOKENIZER)), speed=speed)
    with pytest.raises(ValueError, match="loss_chunk_size"):
        SpeedArgs(loss_chunk_size=0)
    with pytest.raises(ValueError, match="pad_to_multiple"):
        SpeedArgs(pad_to_multiple=128)  # needs packing


def _fit_losses(tmp_path, speed, steps=50):
    torch.manual_seed(0)
    model = ModelArgs(preset="tiny-qwen3", tokenizer_path=str(TOKENIZER), dtype="float32", gradient_checkpointing=False)
    module = LoraLitModule(model, LoraArgs(preset="balanced", lora_dropout=0.0), OptimArgs(lr=3e-3, warmup_ratio=0.0),
                           speed=speed)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(trainer.callback_metrics["train/loss"].item())

    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[Record()], plugins=[AdapterCheckpointIO()], default_root_dir=tmp_path)
    trainer.fit(module, connect_data(ChatDataModule(str(TRAIN), batch_size=4, seed=1), module))
    return losses


@pytest.mark.integration
def test_fifty_steps_of_the_fast_path_learn_what_the_plain_path_learns(tmp_path):
    plain = _fit_losses(tmp_path, SpeedArgs(loss="full", packing=False))
    fast = _fit_losses(tmp_path, SpeedArgs(loss="chunked", loss_chunk_size=16, packing=True))
    assert len(plain) == len(fast) == 50
    assert plain[-1] < plain[0] - 1.0  # it learns, so the comparison means something
    assert fast == pytest.approx(plain, rel=1e-3)


def test_fast_loss_applies_the_logit_softcapping_the_model_applies():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0,
                          use_cache=False)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits large enough for the soft cap to matter
    batch = _text_batch()
    batch["input_ids"] = batch["input_ids"] % 128
    batch["labels"] = torch.where(batch["labels"] == X, X, batch["labels"] % 128)
    with torch.no_grad():
        out = model(**batch)
        logits, targets = out.logits[:, :-1], batch["labels"][:, 1:]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 128).float(), targets.reshape(-1),
                                                     ignore_index=X, reduction="sum")
        hidden, labels, head, _ = forward_hidden(model, "causal_lm", batch, packed=False)
        got = lm_loss(hidden, labels, head, "chunked", 3)
        plain_head = lm_loss(hidden, labels, model.lm_head, "chunked", 3)
    torch.testing.assert_close(got.loss_sum, expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(plain_head.loss_sum, expected, rtol=1e-2)  # without the cap the loss differs


def _random_lm_problem(n_rows=3, length=11, hidden=16, vocab=50, device="cpu"):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(n_rows, length, hidden, generator=g).to(device)
    labels = torch.randint(0, vocab, (n_rows, length), generator=g)
    labels[:, :3] = X  # prompts
    labels[1, 6:] = X  # a shorter answer
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
    return h, labels.to(device), head.to(device)


def _reference_sum(h, labels, head):
    """Plain next-token cross-entropy: torch's own F.cross_entropy on every position's full logits."""
    logits = h[:, :-1] @ head.weight.T
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                                             ignore_index=X, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 4, 1000])  # one position per chunk, a ragged last chunk, one chunk
def test_chunked_loss_is_the_plain_cross_entropy(chunk):
    h, labels, head = _random_lm_problem()
    h.requires_grad_(True)
    out = lm_loss(h, labels, head, "chunked", chunk)
    (grad,) = torch.autograd.grad(out.loss_sum, h)
    h_ref = h.detach().clone().requires_grad_(True)
    expected = _reference_sum(h_ref, labels, head)
    expected.backward()
    assert out.n_tokens == 8 + 3 + 8  # supervised labels 3..10 in rows 0 and 2, 3..5 in row 1 (none at position 0)
    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, h_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.integration),  # compiles on a cold cache
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_compiled_chunk_loss_is_the_plain_cross_entropy_with_a_ragged_last_chunk(device):
    # chunks of 4 supervised positions: full ones, then a last one of 3 (compiled again for its size)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    h, labels, head = _random_lm_problem(device=device)
    h.requires_grad_(True)
    torch.compiler.reset()
    from mgmlora.training.loss import CompiledChunkLoss

    graphs = CompiledChunkLoss.graphs
    out = lm_loss(h, labels, head, "compiled", 4)
    assert CompiledChunkLoss.graphs > graphs  # it compiled, not only ran the eager chunk
    (grad,) = torch.autograd.grad(out.loss_sum, h)
    h_ref = h.detach().clone().requires_grad_(True)
    expected = _reference_sum(h_ref, labels, head)
    expected.backward()
    assert out.n_tokens == 19
    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    from mgmlora.models.head import PostProcessedHead

    softcapped = PostProcessedHead(head, 1.0, 2.0)  # Gemma-2's soft cap: the compiled chunk applies the head whole
    sums = [lm_loss(h.detach().clone().requires_grad_(True), labels, softcapped, impl, 4).loss_sum
            for impl in ("compiled", "chunked")]  # with a gradient: evaluation's no-grad chunks run eagerly
    torch.testing.assert_close(sums[0], sums[1])
    assert not torch.allclose(sums[0], out.loss_sum, rtol=1e-2)  # the cap changed the loss
    # bf16 logits, as on the GPU recipes: the upcast the compiled chunk fuses, against the eager chunk's
    h16, head16 = h.detach().bfloat16(), head.bfloat16()
    pairs = []
    for impl in ("compiled", "chunked"):
        x = h16.clone().requires_grad_(True)
        total = lm_loss(x, labels, head16, impl, 4).loss_sum
        pairs.append((total, torch.autograd.grad(total, x)[0]))
    assert pairs[0][0].dtype == torch.float32
    torch.testing.assert_close(pairs[0][0], pairs[1][0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(pairs[0][1].float(), pairs[1][1].float(), rtol=2e-2, atol=2e-2)


def test_the_compiled_loss_without_a_compiler_is_refused_in_one_line_when_the_run_starts(monkeypatch):
    import mgmlora.training.loss as loss

    monkeypatch.setattr(loss.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(loss.SettingsError, match=r"loss=compiled needs .*no-such-compiler-here.*use `chunked`"):
        loss.check_available(SpeedArgs(loss="compiled"))
    monkeypatch.setenv("CXX", "sh")  # any program on PATH stands for a compiler here
    loss.check_available(SpeedArgs(loss="compiled"))


def test_liger_refuses_a_head_that_transforms_its_logits_before_loading_liger():
    """Asserted on every machine: the check runs before Liger is imported."""
    from mgmlora.models.head import PostProcessedHead

    h, labels, head = _random_lm_problem()
    with pytest.raises(ValueError, match="needs a plain linear LM head.*use speed.loss=chunked"):
        lm_loss(h, labels, PostProcessedHead(head, 1.0, 30.0), "liger", 4)


_LIGER = importlib.util.find_spec("liger_kernel") is not None


@pytest.mark.skipif(not _LIGER or not torch.cuda.is_available(),
                    reason="Liger-Kernel's loss needs the liger-kernel package (`liger` extra) and a CUDA GPU (Triton)"
                           f"; liger-kernel installed: {_LIGER}, CUDA: {torch.cuda.is_available()}")
def test_liger_loss_is_the_plain_cross_entropy():
    h, labels, head = _random_lm_problem(device="cuda")
    h.requires_grad_(True)
    out = lm_loss(h, labels, head, "liger", 4, with_preds=True)
    (grad,) = torch.autograd.grad(out.loss_sum, h)
    h_ref = h.detach().clone().requires_grad_(True)
    expected = _reference_sum(h_ref, labels, head)
    expected.backward()
    assert out.n_tokens == (labels[:, 1:] != X).sum()
    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, h_ref.grad, rtol=1e-3, atol=1e-5)
    keep = labels[:, 1:] != X
    assert torch.equal(out.preds, (h[:, :-1] @ head.weight.T).argmax(-1)[keep])


def _sync_sites(fn) -> list[str]:
    """file:line of every CUDA host sync `fn` makes (torch's sync debug mode; each one a warning)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # not the mode's own one-time notice ("... does not yet detect all synchronizing operations")
    return [f"{w.filename}:{w.lineno}" for w in caught if "called a synchronizing CUDA operation" in str(w.message)]


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["causal_lm", "mgm"])
def test_a_packed_chunked_step_waits_for_the_gpu_only_in_transformers_mask_on_cuda(family):
    # The forward and the loss read every data-dependent shape from the batch's CPU copy; the one sync left is
    # transformers' own packed-row check (masking_utils.find_packed_sequence_indices). Without the copy (a batch made
    # on the GPU) the same step syncs more: packing and the loss on text, copies of ids, mask and labels for MGM.
    from mgmlora.models import load_model

    args = ModelArgs(preset="tiny-mgm" if family == "mgm" else "tiny-qwen3", dtype="bfloat16",
                     gradient_checkpointing=False)
    model = load_model(args, packing=True).model.cuda().requires_grad_(True)  # bf16: PyTorch's varlen kernel
    if family == "mgm":
        g = torch.Generator().manual_seed(1)
        batch = Batch(torch.tensor([[2, 5, IMAGE_TOKEN_INDEX, 7, 8, 9], [2, 5, 6, 7, 0, 0]]),
                      torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
                      torch.tensor([[X, X, X, 7, 8, 9], [X, X, 6, 7, X, X]]),
                      model_inputs={"images": torch.randn(2, 3, 48, 48, generator=g).bfloat16(),
                                    "images_aux": torch.randn(2, 3, 96, 96, generator=g).bfloat16()})
    else:
        batch = Batch(**_text_batch())

    def step(b):
        fwd = forward_hidden(model, family, b, True)
        lm_loss(fwd.hidden, fwd.labels, fwd.head, "chunked", 3, host_labels=fwd.host_labels).loss_sum.backward()

    moved = batch.to("cuda")
    step(moved)  # warm-up: first-call initialisation may sync
    with_copy = _sync_sites(lambda: step(moved))
    on_gpu = Batch(moved.input_ids, moved.attention_mask, moved.labels, model_inputs=moved.model_inputs)
    without = _sync_sites(lambda: step(on_gpu))
    assert all("masking_utils" in site for site in with_copy) and len(with_copy) <= 1, with_copy
    assert len(without) > len(with_copy), without


@pytest.mark.gpu
def test_the_host_queues_the_copy_packing_and_loss_selection_while_the_gpu_is_busy():
    # Sync debug mode does not see a copy that waits inside the driver; this does: with the GPU busy for a while,
    # moving a pinned batch, packing it and selecting the loss's positions must all return before the GPU is done.
    batch = Batch(**_text_batch()).pin_memory()
    hidden = torch.randn(1, 15, 16, device="cuda")
    head = torch.nn.Linear(16, 100, bias=False).cuda()

    def queue():
        moved = batch.to("cuda")
        row = pack_padded(moved.input_ids, moved.attention_mask, moved.labels, host=moved.on_host())
        return row, lm_loss(hidden, row.labels, head, "chunked", 4, host_labels=row.host_labels)

    queue()  # warm-up: a kernel's first launch loads its module, which may wait for the device
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time, queued
    busy = torch.cuda.Event()
    busy.record()
    row, out = queue()
    assert not busy.query(), "the host waited for the GPU"
    torch.cuda.synchronize()
    reference = pack_padded(batch.input_ids, batch.attention_mask, batch.labels)
    assert torch.equal(row.values.cpu(), reference.values) and int(out.n_tokens) == 7

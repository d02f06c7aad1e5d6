"""The typed micro-batch: counts by hand, device moves keep every field."""

import dataclasses

import torch

from mgmlora.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Batch

X = IGNORE_INDEX


def _batch():
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 7, 8], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([[X, X, 7, 8], [X, 6, X, X]])
    return Batch(ids, mask, labels, torch.tensor(9), window_end=True,
                 model_inputs={"pixels": torch.zeros(2, 3, 4, 4)})


def test_supervised_tokens_and_images_are_counted_after_the_causal_shift():
    batch = _batch()
    # by hand: labels[:, 1:] = [[X, 7, 8], [6, X, X]] -> 3 targets; one image placeholder
    assert int(batch.supervised_tokens()) == 3
    assert int(batch.image_count()) == 1
    assert len(batch) == 2


def test_to_and_pin_memory_return_a_batch_with_every_field():
    batch = _batch()
    moved = batch.to("cpu")
    assert moved is not batch and isinstance(moved, Batch)
    for name in ("input_ids", "attention_mask", "labels", "window_tokens"):
        assert torch.equal(getattr(moved, name), getattr(batch, name))
    assert moved.model_inputs.keys() == batch.model_inputs.keys() == {"pixels"}
    assert torch.equal(moved.model_inputs["pixels"], batch.model_inputs["pixels"])
    assert moved.model_inputs is not batch.model_inputs and moved.window_end is True
    if torch.cuda.is_available():  # pinning needs an accelerator runtime
        assert batch.pin_memory().input_ids.is_pinned()


def test_a_batch_moved_off_the_cpu_keeps_its_cpu_copy_for_reading_shapes_without_a_sync():
    batch = _batch()
    assert batch.on_host() is batch  # on the CPU a batch is its own host copy
    assert batch.to("cpu").host is None
    moved = batch.to("meta")  # any device other than the CPU
    assert moved.input_ids.is_meta and moved.model_inputs["pixels"].is_meta
    host = moved.on_host()
    assert host is moved.host and host.input_ids is batch.input_ids and host.labels is batch.labels
    assert host.model_inputs == {} and host.host is None  # only the ids, mask and labels are kept
    assert moved.to("meta").on_host() is host  # a second move keeps it
    edited = dataclasses.replace(moved, labels=torch.zeros(2, 4, dtype=torch.long, device="meta"))
    assert edited.host is None  # a batch built from another never carries the other's (now stale) CPU copy

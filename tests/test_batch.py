"""The typed micro-batch: counts by hand, device moves keep every field."""

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

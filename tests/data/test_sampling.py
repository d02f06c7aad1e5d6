import pytest
import torch

from mgmlora.data.sampling import WindowBatchSampler

COUNTS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]


def _batches(sampler):
    return [[(k.index, k.window_tokens) for k in batch] for batch in sampler]


def test_window_tokens_is_the_sum_over_the_window_on_all_ranks():
    world, bs, acc = 2, 2, 2
    per_rank = [_batches(WindowBatchSampler(COUNTS, bs, acc, seed=3, rank=r, world_size=world)) for r in range(world)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 11 samples, 4 per global batch, padded by wrap-around
    for start in range(0, 3, acc):
        window = [b for rank in per_rank for b in rank[start:start + acc]]
        total = sum(COUNTS[i] for batch in window for i, _ in batch)
        assert {w for batch in window for _, w in batch} == {total}


def test_ranks_are_disjoint_and_cover_the_data():
    seen = [i for r in range(3) for b in _batches(WindowBatchSampler(COUNTS, 1, 1, seed=0, rank=r, world_size=3))
            for i, _ in b]
    assert sorted(set(seen)) == list(range(len(COUNTS)))
    assert len(seen) == 12  # padded to a multiple of world_size * batch_size


def test_same_seed_same_order_and_epochs_differ():
    a = WindowBatchSampler(COUNTS, 2, seed=7)
    b = WindowBatchSampler(COUNTS, 2, seed=7)
    assert _batches(a) == _batches(b)
    b.set_epoch(1)
    assert _batches(a) != _batches(b)
    assert _batches(WindowBatchSampler(COUNTS, 2, shuffle=False))[0] == [(0, 4), (1, 4)]


def test_resume_skips_exactly_the_consumed_batches():
    full = _batches(WindowBatchSampler(COUNTS, 1, 4, seed=1))
    resumed = WindowBatchSampler(COUNTS, 1, 4, seed=1)
    resumed.resume_from(epoch=0, batches_consumed=4)
    assert _batches(resumed) == full[4:]
    resumed.set_epoch(1)  # other epochs are complete
    assert len(_batches(resumed)) == len(full)


def test_drop_last_and_len():
    dropped = WindowBatchSampler(COUNTS, 4, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 2
    assert len(WindowBatchSampler(COUNTS, 4)) == 3


def test_invalid_arguments():
    with pytest.raises(ValueError):
        WindowBatchSampler(COUNTS, 0)
    with pytest.raises(ValueError):
        WindowBatchSampler(COUNTS, 1, rank=2, world_size=2)


def test_whole_windows_keeps_only_complete_accumulation_windows():
    sampler = WindowBatchSampler(COUNTS, 1, accumulate=4, whole_windows=True)  # 11 batches -> 2 whole windows
    batches = _batches(sampler)
    assert len(sampler) == len(batches) == 8
    for start in (0, 4):
        window = batches[start:start + 4]
        assert {w for b in window for _, w in b} == {sum(COUNTS[i] for b in window for i, _ in b)}
    assert len(WindowBatchSampler(COUNTS, 1, accumulate=4)) == 11  # plain Lightning steps on the partial window
    with pytest.raises(ValueError, match="fewer than one accumulation window \\(20\\)"):
        WindowBatchSampler(COUNTS, 1, accumulate=20, whole_windows=True)



@pytest.mark.parametrize("limit,runs,windows", [
    (6, 6, [(0, 4), (4, 6)]),  # Lightning stops the epoch after 6 of 11: the last window is micro-batches 4-5
    (0.5, 5, [(0, 4), (4, 5)]),  # a share: int(11 * 0.5) = 5, as Lightning counts it
    (2.0, 11, [(0, 4), (4, 8), (8, 11)]),  # overfit_batches=2.0 sets 2.0; the loader still ends the epoch at 11
    (1.0, 11, [(0, 4), (4, 8), (8, 11)]),  # Lightning's default: the whole epoch
    (8, 8, [(0, 4), (4, 8)]),
])
def test_the_trainer_s_batch_limit_cuts_the_windows_where_the_epoch_stops(limit, runs, windows):
    sampler = WindowBatchSampler(COUNTS, 1, accumulate=4, shuffle=False)
    sampler.limit(limit)
    keys = list(sampler)
    assert len(keys) == runs and len(sampler) == 11  # Lightning limits len() itself
    for start, end in windows:
        window = keys[start:end]
        assert {k.window_tokens for b in window for k in b} == {sum(COUNTS[start:end])}  # dataset order
        assert [k.window_end for b in window for k in b] == [False] * (end - start - 1) + [True]


def test_under_deepspeed_a_limit_must_keep_whole_windows():
    sampler = WindowBatchSampler(COUNTS, 1, accumulate=4, whole_windows=True)  # 8 of 11: two whole windows
    sampler.limit(4)
    assert len(list(sampler)) == 4
    for cut in (3, 6, 0.5):  # 3, 6 and int(8 * 0.5) = 4 micro-batches
        fresh = WindowBatchSampler(COUNTS, 1, accumulate=4, whole_windows=True)
        if cut == 0.5:
            fresh.limit(cut)
            assert len(list(fresh)) == 4
            continue
        with pytest.raises(ValueError, match=f"stops each epoch after {cut} micro-batch.*multiple of accumulate"):
            fresh.limit(cut)

def test_rank_batches_are_slices_of_the_seeded_global_batches():
    world, bs, epoch = 3, 2, 4
    order = torch.randperm(len(COUNTS), generator=torch.Generator().manual_seed(9 + epoch)).tolist()
    order += order[: -len(order) % (world * bs)]  # 11 -> 12: wrapped around
    for rank in range(world):
        sampler = WindowBatchSampler(COUNTS, bs, seed=9, rank=rank, world_size=world)
        sampler.set_epoch(epoch)
        expected = [order[g + rank * bs : g + (rank + 1) * bs] for g in range(0, len(order), world * bs)]
        assert [[i for i, _ in b] for b in _batches(sampler)] == expected


class _Indices:
    """A dataset that returns each key's sample index."""

    def __len__(self):
        return 12

    def __getitem__(self, key):
        return key.index


def test_a_resumed_loader_with_workers_continues_the_checkpoints_epoch():
    """Lightning starts the resumed epoch's iterator before `set_epoch`; with workers it draws indices at once.

    Without the checkpoint's epoch set on load, the resumed epoch 1 ran epoch 0's permutation from its start.
    """
    from mgmlora.data.datamodule import _ResumableLoader
    from mgmlora.data.sampling import WindowBatchSampler

    def loader():
        sampler = WindowBatchSampler([1] * 12, batch_size=2, accumulate=2, shuffle=True, seed=0)
        return _ResumableLoader(_Indices(), batch_sampler=sampler, collate_fn=list, num_workers=1,
                                position_fn=lambda: {})

    expected = loader()
    expected.batch_sampler.set_epoch(1)
    expected = list(expected)[2:]  # epoch 1 after its first two micro-batches
    resumed = loader()
    resumed.load_state_dict({"epoch": 1, "batches_consumed": 2})
    iterator = iter(resumed)  # as Lightning's fit loop does on a restart: the iterator first ...
    resumed.batch_sampler.set_epoch(1)  # ... then the epoch
    assert list(iterator) == expected

import random

import lightning as L
import pytest
import torch

from mgmlora.data.datamodule import ChatDataModule
from mgmlora.data.sampling import BalancedWindowBatchSampler, balance_by_cost
from mgmlora.training.resume import resume_differences
from tests.conftest import connect_data
from tests.training.test_module import _grads, _module, _subset

_rng = random.Random(3)
COSTS = [_rng.randint(600, 2100) for _ in range(203)]  # MGM-like: 576 image + 100-1500 text positions
SUPERVISED = [_rng.randint(1, c - 576) for c in COSTS]
WINDOW, ACC = 16, 5


def _sampler(rank=0, world=1, **kwargs):
    kwargs = {"window_samples": WINDOW, "accumulate": ACC, "seed": 7, **kwargs}
    return BalancedWindowBatchSampler(SUPERVISED, COSTS, rank=rank, world_size=world, **kwargs)


def _permutation(seed, epoch, n=len(COSTS)):
    """The seeded global order, drawn here the way torch.randperm draws it (independent of the sampler)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def _windows(world=1, epoch=0, **kwargs):
    """Per window: the micro-batches of every rank (rank r's i-th at [i][r]) as lists of WindowKeys."""
    per_rank = []
    for rank in range(world):
        sampler = _sampler(rank, world, **kwargs)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    steps = len(per_rank[0])
    assert all(len(r) == steps for r in per_rank) and steps % ACC == 0
    return [[[per_rank[r][s] for r in range(world)] for s in range(w, w + ACC)] for w in range(0, steps, ACC)]


def test_balance_by_cost_on_a_hand_worked_example():
    # costliest first into the lightest group: 5->g0, 4->g1, 3(i=2)->g1 (4<5), 3(i=3)->g0 (5<7), 2->g1 (7<8), 1->g0
    assert balance_by_cost([0, 1, 2, 3, 4, 5], [5, 4, 3, 3, 2, 1], 2) == [[0, 3, 5], [1, 2, 4]]
    assert balance_by_cost([2, 0], [1, 1, 1], 2) == [[0], [2]]
    with pytest.raises(ValueError, match="cannot fill"):
        balance_by_cost([0], [1], 2)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_window_is_the_next_slice_of_the_permutation_with_its_token_count(world):
    order = _permutation(7, 0)
    per_window = WINDOW * world
    order += order[: -len(order) % per_window]  # wrap-around fill, as DistributedSampler does
    windows = _windows(world)
    assert len(windows) == len(order) // per_window
    for w, window in enumerate(windows):
        keys = [k for step in window for batch in step for k in batch]
        expected = order[w * per_window : (w + 1) * per_window]
        assert sorted(k.index for k in keys) == sorted(expected)
        assert {k.window_tokens for k in keys} == {sum(SUPERVISED[i] for i in expected)}
        assert all(len(batch) >= 1 for step in window for batch in step)


def test_window_end_marks_only_the_last_micro_batch_of_each_window():
    for window in _windows(2):
        for s, step in enumerate(window):
            assert all(k.window_end == (s == ACC - 1) for batch in step for k in batch)


def test_micro_batches_stay_within_the_list_scheduling_bound_and_beat_consecutive_chunks():
    worst_balanced, worst_chunked = 0, 0
    for window in _windows(1):
        batches = [[k.index for k in step[0]] for step in window]
        sums = [sum(COSTS[i] for i in b) for b in batches]
        samples = [i for b in batches for i in b]
        # greedy list scheduling's guarantee: no group exceeds the mean by more than one sample's cost
        assert max(sums) <= sum(sums) / ACC + max(COSTS[i] for i in samples)
        worst_balanced = max(worst_balanced, max(sums))
        chunks = [samples[i::ACC] for i in range(ACC)]  # any other split of the same samples
        worst_chunked = max(worst_chunked, max(sum(COSTS[i] for i in c) for c in chunks))
    assert worst_balanced < worst_chunked


def test_ranks_hold_disjoint_samples_and_agree_on_length():
    for window in _windows(3):
        for step in window:
            indices = [k.index for batch in step for k in batch]
            assert len(indices) == len(set(indices))


def test_drop_last_drops_the_incomplete_window_and_repeats_nothing():
    windows = _windows(2, drop_last=True)
    keys = [k.index for window in windows for step in window for batch in step for k in batch]
    assert len(keys) == len(set(keys)) == len(COSTS) // (2 * WINDOW) * 2 * WINDOW


def test_epochs_and_seeds_differ_and_repeat():
    first = [[k.index for k in b] for b in _sampler()]
    assert first == [[k.index for k in b] for b in _sampler()]
    other = _sampler()
    other.set_epoch(1)
    assert first != [[k.index for k in b] for b in other]
    assert first != [[k.index for k in b] for b in _sampler(seed=8)]


@pytest.mark.parametrize("consumed", [0, 3, ACC, 17])
def test_resume_skips_exactly_the_consumed_batches(consumed):
    full = [[(k.index, k.window_tokens) for k in b] for b in _sampler()]
    resumed = _sampler()
    resumed.resume_from(0, consumed)
    assert [[(k.index, k.window_tokens) for k in b] for b in resumed] == full[consumed:]
    assert len(resumed) == len(full)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="between 1 and window_samples"):
        _sampler(accumulate=WINDOW + 1)
    with pytest.raises(ValueError, match="costs for"):
        BalancedWindowBatchSampler(SUPERVISED, COSTS[:-1], WINDOW, ACC)
    with pytest.raises(ValueError, match="fewer than one window"):
        BalancedWindowBatchSampler(SUPERVISED[:5], COSTS[:5], WINDOW, ACC, drop_last=True)


def test_the_budget_check_names_the_accumulation_that_fits_every_epoch():
    epochs = range(3)

    def largest(accumulate):  # by hand: the largest micro-batch over the epochs' windows
        out = 0
        for epoch in epochs:
            sampler = _sampler(accumulate=accumulate)
            sampler.set_epoch(epoch)
            out = max(out, max(sum(COSTS[k.index] for k in batch) for batch in sampler))
        return out

    at_acc = largest(ACC)
    _sampler(max_tokens=at_acc).check_budget(epochs)  # exactly at the budget: fine
    fits = next(a for a in range(ACC + 1, WINDOW + 1) if largest(a) <= at_acc - 1)
    with pytest.raises(ValueError) as error:
        _sampler(max_tokens=at_acc - 1).check_budget(epochs)
    message = str(error.value)
    assert f"micro-batch of {at_acc} positions" in message
    assert f"set trainer.accumulate_grad_batches to {fits} or more" in message
    with pytest.raises(ValueError, match=f"a single sample holds {max(COSTS)} positions"):
        _sampler(max_tokens=max(COSTS) - 1).check_budget(epochs)


def test_a_window_in_balanced_micro_batches_gives_the_gradient_of_one_sample_per_micro_batch(tmp_path):
    path = _subset(tmp_path, 8)
    one_each, _, data = _grads(path, batch_size=1, accumulate=8)  # dataset order: samples 0..7, one per micro-batch
    balanced, _, balanced_data = _grads(path, batch_size=1, accumulate=3, window_samples=8)
    sampler = balanced_data.train_dataloader().batch_sampler
    assert isinstance(sampler, BalancedWindowBatchSampler)
    first = [[k.index for k in b] for b in list(sampler)[:3]]
    assert sorted(i for b in first for i in b) == list(range(8)) and max(len(b) for b in first) > 1
    assert one_each.keys() == balanced.keys() and len(one_each) > 0
    for name in one_each:  # float32 sums in another order (the grouping; SIMD tails follow each process's buffer
        # alignment): up to ~1.5e-4 of the tensor's largest gradient seen across processes, so tolerances scale with it
        scale = one_each[name].abs().max().item()
        torch.testing.assert_close(balanced[name], one_each[name], rtol=1e-4, atol=3e-4 * scale, msg=name)

    # The test can fail: the same micro-batches with each one's own token mean give another gradient.
    counts = [data.splits["train"][i].num_supervised for i in range(8)]
    assert len(set(counts)) > 1


def test_window_samples_refuses_a_batch_size_and_is_a_resume_setting(tmp_path):
    data = connect_data(ChatDataModule(_subset(tmp_path, 8), batch_size=2, window_samples=8), _module())
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    data.trainer = trainer
    data.setup("fit")
    with pytest.raises(ValueError, match="data.window_samples=8 with data.batch_size=2"):
        data.train_dataloader()
    assert resume_differences({"window_samples": None}, {"window_samples": 128}) == [
        "data.init_args.window_samples: checkpoint None vs now 128"]


def test_planned_epochs_follow_max_epochs_and_max_steps():
    from types import SimpleNamespace

    from mgmlora.data.datamodule import _planned_epochs

    def trainer(**kw):
        return SimpleNamespace(**{"current_epoch": 0, "global_step": 0, "max_epochs": None, "max_steps": -1,
                                  "accumulate_grad_batches": 4, **kw})

    assert _planned_epochs(trainer(max_epochs=3), 40) == range(0, 3)
    assert _planned_epochs(trainer(max_steps=25), 40) == range(0, 3)  # 10 steps per epoch: epochs 0, 1, 2
    assert _planned_epochs(trainer(max_steps=25, max_epochs=2), 40) == range(0, 2)
    assert _planned_epochs(trainer(current_epoch=2, global_step=20, max_steps=25), 40) == range(2, 3)
    assert _planned_epochs(trainer(max_epochs=-1), 40) == range(0, 100)  # unbounded: the first 100


def test_a_fit_whose_window_exceeds_max_tokens_stops_before_the_first_step(tmp_path):
    module = _module()
    data = connect_data(ChatDataModule(_subset(tmp_path, 16), window_samples=8, max_tokens=40), module)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    with pytest.raises(ValueError, match=r"data.max_tokens=40: epoch 0 has a micro-batch of \d+ positions"):
        trainer.fit(module, data)
    assert trainer.global_step == 0

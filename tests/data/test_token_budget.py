import logging
import random

import lightning as L
import pytest
import torch

from mgmlora.batch import IMAGE_TOKEN_INDEX
from mgmlora.data.datamodule import ChatDataModule
from mgmlora.data.sampling import TokenBudgetBatchSampler, WindowBatchSampler, pack_by_cost
from tests.conftest import TOKENIZER, TRAIN, connect_data
from tests.data.test_llava import _datamodule as _llava_datamodule

BUDGET, CAP = 256, 6
_rng = random.Random(0)
COSTS = [_rng.choice([_rng.randint(8, 40), _rng.randint(40, 120)]) for _ in range(300)] + [260, 450]  # 2 oversize
_rng.shuffle(COSTS)
SUPERVISED = [_rng.randint(1, c) for c in COSTS]


def _sampler(rank=0, world=1, **kwargs):
    kwargs = {"max_tokens": BUDGET, "batch_size": CAP, "seed": 5, "chunk_steps": 3, **kwargs}  # many mega-chunks
    return TokenBudgetBatchSampler(SUPERVISED, COSTS, rank=rank, world_size=world, **kwargs)


def _run(world=1, epoch=0, **kwargs):
    """Per rank, the yielded micro-batches as lists of (index, window_tokens)."""
    out = []
    for rank in range(world):
        sampler = _sampler(rank, world, **kwargs)
        sampler.set_epoch(epoch)
        out.append([[(k.index, k.window_tokens) for k in batch] for batch in sampler])
    return out


def _indices(batches):
    return [[i for i, _ in b] for b in batches]


def _greedy(order):
    """Brute-force packing: fill a micro-batch in `order` until the next sample breaks the budget or the cap."""
    batches, current = [], []
    for i in order:
        if current and (sum(COSTS[j] for j in current) + COSTS[i] > BUDGET or len(current) == CAP):
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current]


def test_pack_by_cost_on_a_hand_worked_example():
    costs = [3, 4, 5, 12, 1, 1]
    # budget 9: [3, 4] (adding 5 would make 12), [5], [12] alone (oversize), [1, 1]
    assert pack_by_cost(range(6), costs, max_tokens=9, max_samples=8) == [[0, 1], [2], [3], [4, 5]]
    assert pack_by_cost([4, 5, 0, 1], costs, max_tokens=100, max_samples=3) == [[4, 5, 0], [1]]


@pytest.mark.parametrize("world", [1, 2, 4])  # 2 and 4 ranks leave an incomplete last step with this data
def test_drop_last_never_repeats_a_sample_and_drops_less_than_one_global_step(world):
    ranks = _run(world, drop_last=True)
    seen = [i for rank in ranks for b in _indices(rank) for i in b]
    assert len(seen) == len(set(seen))
    missing = set(range(len(COSTS))) - set(seen)
    if world == 1:
        assert not missing  # one rank: nothing to drop, every sample exactly once
    else:
        assert 0 < len(missing) <= (world - 1) * CAP  # fewer than world micro-batches dropped


@pytest.mark.parametrize("world", [2, 4, 5])  # each leaves an incomplete last step with this data
def test_wrap_around_covers_every_sample_and_repeats_the_first_micro_batches(world):
    ranks = _run(world)
    flat = [b for step in zip(*[_indices(r) for r in ranks]) for b in step]  # global order, step by step
    first_seen, wrapped = set(), 0
    for batch in flat:
        if set(batch) <= first_seen:
            wrapped += 1
        first_seen |= set(batch)
    assert 0 < wrapped < world and flat[-wrapped:] == flat[:wrapped]  # the last step is filled from the start
    assert sorted(i for b in flat[:-wrapped] for i in b) == list(range(len(COSTS)))  # otherwise exactly once


def test_budget_and_cap_hold_except_for_single_oversize_samples(caplog):
    with caplog.at_level(logging.WARNING, logger="mgmlora.data.sampling"):
        (batches,) = _run()
    assert "2 sample(s) cost more than max_tokens=256" in caplog.text
    for batch in _indices(batches):
        assert len(batch) <= CAP
        assert sum(COSTS[i] for i in batch) <= BUDGET or len(batch) == 1
    alone = [b[0] for b in _indices(batches) if sum(COSTS[i] for i in b) > BUDGET]
    assert sorted(COSTS[i] for i in alone) == [260, 450]  # oversize samples are kept, each on its own


@pytest.mark.parametrize("whole_windows", [False, True])
def test_ranks_agree_on_count_len_and_window_tokens(whole_windows):
    world, acc = 3, 4
    for epoch in range(3):
        ranks = _run(world, epoch, accumulate=acc, whole_windows=whole_windows)
        sampler = _sampler(0, world, accumulate=acc, whole_windows=whole_windows)
        sampler.set_epoch(epoch)
        assert {len(r) for r in ranks} == {len(sampler)}
        if whole_windows:
            assert len(sampler) % acc == 0
        for start in range(0, len(sampler), acc):
            window = [b for rank in ranks for b in rank[start : start + acc]]
            expected = sum(SUPERVISED[i] for b in window for i, _ in b)
            assert {w for b in window for _, w in b} == {expected}


def test_len_equals_yield_in_every_epoch_and_changes_with_the_packing():
    lengths = set()
    sampler = _sampler(chunk_steps=2)
    for epoch in range(6):
        sampler.set_epoch(epoch)
        lengths.add(len(sampler))
        assert len(sampler) == len(list(sampler))
    assert len(lengths) > 1  # small chunks: the packing, hence the count, differs between epochs



def test_a_share_limit_holds_every_epoch_to_the_count_lightning_took_when_the_loader_was_built():
    sampler = _sampler(chunk_steps=2, accumulate=4)
    sampler.set_epoch(0)
    cap = int(len(sampler) * 0.5)  # Lightning's count of the loader's first epoch, kept for the later ones
    sampler.limit(0.5)
    for epoch in range(6):  # their packings, and so len(), differ (the test above)
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert len(keys) == min(len(sampler), cap)
        last = keys[len(keys) - len(keys) % 4 or len(keys) - 4:]  # the last window: the remainder, or a whole one
        assert [b[0].window_end for b in last] == [False] * (len(last) - 1) + [True]
        assert {b[0].window_tokens for b in last} == {sum(SUPERVISED[k.index] for b in last for k in b)}

def test_one_chunk_is_the_sorted_permutation_packed_greedily_then_shuffled():
    epoch = 2
    batches = _indices(_run(epoch=epoch, chunk_steps=1000)[0])
    permutation = torch.randperm(len(COSTS), generator=torch.Generator().manual_seed(5 + epoch)).tolist()
    expected = _greedy(sorted(permutation, key=COSTS.__getitem__))  # equal costs keep the permutation's order
    assert sorted(batches) == sorted(expected)
    assert batches != expected  # the micro-batch order is shuffled: long and short ones interleave


def test_same_seed_same_batches_other_epoch_or_seed_differs():
    assert _run(2) == _run(2)
    assert _run(2, epoch=1) != _run(2)
    made_up = [{tuple(sorted(b)) for b in _indices(_run(epoch=e)[0])} for e in (0, 1)]
    assert made_up[0] != made_up[1]  # sorting inside mega-chunks only: micro-batches change make-up, not just order
    assert _run(2, seed=6) != _run(2)
    batches = _indices(_run(chunk_steps=1000, shuffle=False)[0])  # one chunk, no shuffle: sorted by cost
    assert [COSTS[b[0]] for b in batches] == sorted(COSTS[b[0]] for b in batches)


@pytest.mark.parametrize("consumed", [0, 3, 8, 21])
def test_resume_skips_exactly_the_consumed_batches(consumed):
    world, acc = 2, 4
    for rank in range(world):
        full = [[(k.index, k.window_tokens) for k in b] for b in _sampler(rank, world, accumulate=acc)]
        resumed = _sampler(rank, world, accumulate=acc)
        resumed.resume_from(epoch=0, batches_consumed=consumed)
        assert [[(k.index, k.window_tokens) for k in b] for b in resumed] == full[consumed:]
        resumed.set_epoch(1)  # only the checkpointed epoch is partial
        assert len(list(resumed)) == len(resumed)


def _padded_and_real(batches):
    return sum(len(b) * max(COSTS[i] for i in b) for b in batches), sum(COSTS[i] for b in batches for i in b)


def test_length_grouping_reduces_padding_against_random_grouping():
    grouped = _indices(_run()[0])
    shuffled = _greedy(torch.randperm(len(COSTS), generator=torch.Generator().manual_seed(5)).tolist())
    (grouped_padded, real), (shuffled_padded, same) = _padded_and_real(grouped), _padded_and_real(shuffled)
    assert real == same == sum(COSTS)
    assert grouped_padded - real < 0.5 * (shuffled_padded - real)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="costs for"):
        TokenBudgetBatchSampler(SUPERVISED, COSTS[:-1], BUDGET)
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBudgetBatchSampler(SUPERVISED, COSTS, 0)
    with pytest.raises(ValueError, match="fewer than one accumulation window"):
        TokenBudgetBatchSampler(SUPERVISED, COSTS, 100_000, accumulate=10, whole_windows=True)


def _chat_datamodule(max_epochs=1, **kwargs):
    dm = ChatDataModule(str(TRAIN), tokenizer_path=str(TOKENIZER), batch_size=8, **kwargs)
    dm.trainer = L.Trainer(accelerator="cpu", logger=False, use_distributed_sampler=False, max_epochs=max_epochs)
    connect_data(dm).setup("fit")  # the trainer above only gives the sampler its settings (accumulate, epochs)
    return dm


def test_chat_datamodule_fills_batches_up_to_max_tokens():
    dm = _chat_datamodule(max_tokens=400)
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, TokenBudgetBatchSampler)
    batches = list(loader)
    assert len(batches) == len(loader) > 96 // 8  # fewer samples per micro-batch than batch_size allows
    for batch in batches:
        positions = int(batch.attention_mask.sum())
        assert batch.input_ids.shape[0] <= 8 and (positions <= 400 or batch.input_ids.shape[0] == 1)
        assert int(batch.window_tokens) == int((batch.labels != -100).sum())  # accumulate 1, one rank
    assert sum(b.input_ids.shape[0] for b in batches) == 96
    plain = _chat_datamodule().train_dataloader()
    assert type(plain.batch_sampler) is WindowBatchSampler and len(plain) == 96 // 8


def test_multi_epoch_token_budget_without_reloading_warns():
    with pytest.warns(UserWarning, match="reload_dataloaders_every_n_epochs: 1"):
        _chat_datamodule(max_epochs=3, max_tokens=400).train_dataloader()


@pytest.mark.filterwarnings("ignore:data.max_tokens")
def test_llava_cost_counts_the_expanded_image_positions():
    dm = _llava_datamodule(max_tokens=300)
    dm.trainer = L.Trainer(accelerator="cpu", logger=False, use_distributed_sampler=False)  # the sampler's settings
    samples, image_tokens = dm.splits["train"], dm.processor.image_tokens
    costs = dm.positions(samples)
    assert any(s.meta.get("image") for s in samples) and not all(s.meta.get("image") for s in samples)
    for sample, cost in zip(samples, costs):
        has_image = IMAGE_TOKEN_INDEX in sample.input_ids
        assert has_image == bool(sample.meta.get("image"))
        assert cost == (len(sample.input_ids) - 1 + image_tokens if has_image else len(sample.input_ids))
    sampler = dm.train_dataloader().batch_sampler
    assert sampler.costs == costs and sampler.max_tokens == 300
    for batch in sampler:
        assert sum(costs[k.index] for k in batch) <= 300 or len(batch) == 1

"""Generation metrics against values computed by hand on small strings (CJK and emoji included)."""

import pytest
import torch

from mgmlora.training.text_metrics import GenerationMetrics, words


def _scores(kind, preds, refs):
    metrics = GenerationMetrics(kind)
    metrics.update(preds, refs)
    return {k: v.item() for k, v in metrics.compute().items()}


def test_words_split_cjk_characters_keep_emoji_and_contractions_and_drop_punctuation():
    assert words("我爱你！Hello, World 😀 don't.") == ["我", "爱", "你", "hello", "world", "😀", "don't"]
    assert words("東京タワー") == ["東", "京", "タ", "ワ", "ー"]


def test_text_metrics_on_cjk_and_emoji_lines_equal_hand_computed_values():
    # ROUGE-L per line: 我爱你 / 我爱他 -> LCS 2 of 3 and 3 words: F = 2/3.
    # "the cat sat 😀" / "The cat sat on the mat 😀": LCS 4, P = 4/4, R = 4/7, F = 2PR/(P+R) = 8/11.
    s = _scores("text", ["我爱你", "the cat sat 😀"], ["我爱他", "The cat sat on the mat 😀"])
    assert s["rougeL"] == pytest.approx((2 / 3 + 8 / 11) / 2, abs=1e-6)
    assert s["len_ratio"] == pytest.approx((3 + 4) / (3 + 7))  # prediction words / reference words
    assert s["exact_match"] == 0.0
    assert s["bleu4"] == 0.0  # no 4-gram of either prediction is in its reference


def test_bleu4_of_a_longer_prediction_is_the_geometric_mean_of_the_modified_precisions():
    # 7 prediction words, 6 reference words: n-gram matches 6/7, 5/6, 4/5, 3/4; no brevity penalty (longer).
    s = _scores("text", ["the cat sat on the mat today"], ["the cat sat on the mat"])
    assert s["bleu4"] == pytest.approx((6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25, abs=1e-6)
    assert s["rougeL"] == pytest.approx(2 * (6 / 7) * 1 / (6 / 7 + 1), abs=1e-6)


def test_chrf_is_one_for_an_identical_line_and_zero_without_a_shared_character():
    assert _scores("text", ["你好，世界 🙂"], ["你好，世界 🙂"])["chrf"] == pytest.approx(1.0)
    assert _scores("text", ["xyz"], ["abc"])["chrf"] == pytest.approx(0.0)


def test_exact_match_ignores_case_punctuation_and_articles():
    s = _scores("text", ["Hold FAST!", "hold on"], ["hold fast", "hold fast"])
    assert s["exact_match"] == pytest.approx(0.5)


def test_vqa_exact_match_and_token_f1_on_short_answers():
    # "A blue square." vs "blue square": equal after lower-casing and dropping punctuation and the article.
    # "red big circle" vs "big blue circle": 2 shared words of 3 and 3 -> F1 2/3.
    # 红色圆形 vs 蓝色圆形: characters are words, 3 shared of 4 and 4 -> F1 3/4.
    s = _scores("vqa", ["A blue square.", "red big circle", "红色圆形"], ["blue square", "big blue circle", "蓝色圆形"])
    assert s["exact_match"] == pytest.approx(1 / 3)
    assert s["token_f1"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert "bleu4" not in s and "chrf" not in s


def test_reset_forgets_everything_and_mismatched_lengths_are_refused():
    metrics = GenerationMetrics("vqa")
    metrics.update(["yes"], ["no"])
    metrics.reset()
    metrics.update(["yes"], ["yes"])
    assert metrics.compute()["exact_match"].item() == 1.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metrics.update(["a", "b"], ["a"])


PREDS = ["我爱你", "the cat sat on the mat today", "Hold FAST!", "红色圆形 😀"]
REFS = ["我爱他", "the cat sat on the mat", "hold fast", "蓝色圆形 😀"]


SHARES = {"uneven": [[(0, 2), (2, 3)], [(3, 4)]], "one_empty": [[(0, 4)], []]}  # (lo, hi): one update per batch


def _rank(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for kind in ("text", "vqa"):
        for name, shares in SHARES.items():
            metrics = GenerationMetrics(kind)
            for lo, hi in shares[rank]:
                metrics.update(PREDS[lo:hi], REFS[lo:hi])
            results[f"{kind}/{name}"] = {k: v.item() for k, v in metrics.compute().items()}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.mark.integration  # two spawned processes
def test_scores_synced_over_two_gloo_ranks_equal_one_process(tmp_path):
    """Uneven shares (3 and 1 items, in batches) and an empty rank; one spawn for every case (it costs ~20 s)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "scores.pt"
    mp.spawn(_rank, args=(2, port, out), nprocs=2, join=True)
    synced = torch.load(out, weights_only=True)
    for key, scores in synced.items():
        assert scores == pytest.approx(_scores(key.split("/")[0], PREDS, REFS), abs=1e-6), key
        assert scores["rougeL"] > 0 and scores["exact_match"] > 0

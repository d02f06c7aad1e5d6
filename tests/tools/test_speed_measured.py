"""Every row of the measured-speed table is what its result file under bench/results says."""

import importlib.util
import json
import math
import shlex

import pytest

from mgmlora.tools.speed_measured import MEASURED, shipped_4bit_recipe
from tests.conftest import ROOT

RESULTS = ROOT / "bench" / "results"


def _train_step():
    spec = importlib.util.spec_from_file_location("train_step", ROOT / "bench" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("row", MEASURED, ids=lambda r: f"{r.source}:{r.variant or r.recipe}")
def test_each_row_states_its_files_figures_and_setting(row):
    result = json.loads((RESULTS / row.source).read_text())
    if row.variant is not None:  # one variant of bench/train_step.py
        rec = result["variants"][row.variant]
        impl, flags, _ = _train_step().parse_variant(row.variant)
        assert result["model"] == row.model
        assert (impl, "nockpt" not in flags, rec["samples_per_step"]) == (row.loss, row.gradient_checkpointing,
                                                                           row.batch_size)
        assert bool(result["lora"].get("target_experts")) is row.target_experts
        # the row length: the longest sample, or the padded row (MGM: image + text, less the one shifted position)
        longest = max(max(rec["sample_lengths"]), math.ceil(rec["padded_positions_per_step"] / rec["samples_per_step"]))
        assert longest in (row.max_length - 1, row.max_length)
        tokens, peak = rec["tokens_per_s"], rec["peak_alloc_gib"]
    else:  # a real fit of a shipped config through bench/fit_smoke.py
        args = shlex.split(result["command"])
        assert row.recipe == args[args.index("--config") + 1], "the run launched the row's recipe"
        tokens, peak = result["tokens_per_s_median"], result["peak_mem_alloc_gib"]
        assert not result["oom"] and result["world_size"] == 1
    assert row.tokens_per_s == pytest.approx(tokens, abs=0.051)
    assert row.peak_gib == pytest.approx(peak, abs=0.0051)


def test_no_two_rows_describe_the_same_setting():
    keys = [(r.model, r.quantized, r.llm, r.target_experts, r.loss, r.gradient_checkpointing, r.batch_size,
             r.max_length) for r in MEASURED]
    assert len(keys) == len(set(keys))


def test_the_4bit_recipe_is_named_per_model():
    assert shipped_4bit_recipe("qwen3-30b-a3b") == "configs/qwen3-30b-a3b_qlora_chameleons.yaml"
    assert shipped_4bit_recipe("mgm-2b") == "configs/mgm2b_qlora.yaml"
    assert shipped_4bit_recipe("qwen3-8b") is None
    assert all((ROOT / r.recipe).is_file() for r in MEASURED if r.recipe)

"""bench/train_step.py runs on CPU with a tiny model, and its fast paths start on the plain path's loss curve."""

import json
import shutil
import subprocess
import sys

from tests.conftest import ROOT


def test_train_step_benchmark_writes_every_variant_and_the_fast_path_tracks_the_plain_one(tmp_path):
    out = tmp_path / "bench.json"
    # inductor needs a C++ compiler on the CPU; without one, tests/test_fastpath.py covers compile with aot_eager
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    variants = "plain,chunked,chunked+packing,plainx4,chunked+nocast+fused+nockpt"
    variants += ",chunked+compile" if compiler else ""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--model", "tiny-qwen3",
                           "--variants", variants, "--warmup", "0", "--steps", "4",
                           "--lr", "1e-3", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    variants = result["variants"]
    assert set(variants) == {"plain", "chunked", "chunked+packing", "plainx4", "chunked+nocast+fused+nockpt"} | (
        {"chunked+compile"} if compiler else set())
    for name, rec in variants.items():
        assert rec["tokens_per_s"] > 0 and rec["flops_per_token"] > 0 and len(rec["losses"]) == 4, name
    # same weights, same batches, fp32: the fast paths follow the plain path step by step
    assert variants["chunked"]["loss_max_rel_diff_vs_plain"] < 1e-4
    assert variants["chunked+packing"]["loss_max_rel_diff_vs_plain"] < 1e-4
    assert variants["chunked+nocast+fused+nockpt"]["loss_max_rel_diff_vs_plain"] < 1e-4  # each switch is exact
    if compiler:
        assert variants["chunked+compile"]["loss_max_rel_diff_vs_plain"] < 1e-3  # inductor reorders float sums
    assert variants["plainx4"]["samples_per_step"] == 4 and "loss_max_rel_diff_vs_plain" not in variants["plainx4"]
    assert variants["plain"]["padded_positions_per_step"] >= variants["plain"]["positions_per_step"]
    assert "plain" in proc.stdout and "x plain" in proc.stdout  # the printed table

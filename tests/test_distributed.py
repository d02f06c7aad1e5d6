"""Loss normalisation across data-parallel ranks (2 CPU processes, gloo)."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TRAIN

pytestmark = pytest.mark.slow
SCRIPT = ROOT / "tests" / "scripts" / "grad_after_one_step.py"


def _grads(tmp_path, name, *args):
    out = tmp_path / f"{name}.pt"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--train_path", str(tmp_path / "train.jsonl"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


def test_two_ranks_with_accumulation_match_one_process_with_the_whole_batch(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:4]))
    single = _grads(tmp_path, "single", "--batch_size", "4")
    ddp = _grads(tmp_path, "ddp", "--devices", "2", "--batch_size", "1", "--accumulate", "2")
    assert single.keys() == ddp.keys() and single
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-7, msg=name)

"""The notices mgmlora.quiet drops stay dropped in a real tool run, and a non-terminal gets no redrawn bars."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT

DROPPED = ["`base_model_name_or_path` was renamed", "Setting accelerator to CPU", "Writing model shards", "\r",
           "Skipping setting a default `ModelSummary`"]


@pytest.mark.integration
def test_export_merge_prints_only_what_concerns_the_user(tmp_path):
    def tool(*args):
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    fit = tool("bin/main.py", "fit", "--config", "configs/demo_chat.yaml", "--trainer.max_steps", "2",
               "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))
    assert "trained 2 optimizer steps" in fit and not [notice for notice in DROPPED if notice in fit], fit
    adapter = tmp_path / "runs" / "demo_chat" / "version_0" / "adapter"
    out = tool("bin/export.py", "--checkpoint", str(adapter), "--output", str(tmp_path / "merged"), "--merge")
    assert "merged model written to" in out
    assert not [notice for notice in DROPPED if notice in out], out

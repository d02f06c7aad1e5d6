"""Loss normalisation across data-parallel ranks (2 CPU processes, gloo)."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TRAIN

pytestmark = pytest.mark.integration
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


def test_torchrun_launch_of_the_cli_trains_on_two_ranks_and_writes_one_adapter(tmp_path):
    """The multi-node launch path as far as one host allows: torchrun (1 node x 2 processes) starting bin/main.py.

    Lightning picks up torchrun's environment (ranks, world size, master address); with --nnodes N on N hosts and
    --trainer.num_nodes N the same command is the multi-node launch documented in docs/usage.md.
    """
    port = 29500 + (hash(str(tmp_path)) % 400)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_port",
           str(port), str(ROOT / "bin" / "main.py"), "fit", "--config", "configs/demo_chat.yaml",
           "--trainer.devices", "2", "--trainer.num_nodes", "1", "--trainer.strategy", "ddp",
           "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "GLOBAL_RANK: 1" in proc.stderr + proc.stdout or "MEMBER: 2/2" in proc.stderr + proc.stdout
    runs = sorted((tmp_path / "demo_chat").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # one logger, one adapter: rank 0 writes, rank 1 does not
    assert (runs[0] / "adapter" / "adapter_model.safetensors").is_file()

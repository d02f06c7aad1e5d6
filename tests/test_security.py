"""No code from a checkpoint runs: pickled payloads are refused, and a checkpoint cannot switch on remote code.

Each payload would create a file if it ran; the tests assert the file does not exist and the run fails with a
one-line error naming the file.
"""

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from mgmlora.training.checkpoint import UnsafeCheckpointError
from tests.conftest import ROOT

ENV = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false")


def _payload(marker):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return Payload()


def _deepspeed_dir(path, marker, poisoned="checkpoint/mp_rank_00_model_states.pt"):
    """A DeepSpeed checkpoint directory as Lightning writes it, with a payload in one file."""
    (path / "checkpoint").mkdir(parents=True)
    (path / "latest").write_text("checkpoint")
    torch.save({"module": {}, "global_steps": 2}, path / "checkpoint" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"loss_scaler": _payload(marker)}}, path / poisoned)
    return path


def test_deepspeed_check_refuses_a_payload_in_any_file_deepspeed_reads(tmp_path):
    from mgmlora.training.strategies import check_deepspeed_checkpoint

    marker = tmp_path / "payload_ran"
    ckpt = _deepspeed_dir(tmp_path / "step=2.ckpt", marker, "checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: refused to load: "
                                                     r"it needs posix\.system"):
        check_deepspeed_checkpoint(ckpt)
    assert not marker.exists()

    (ckpt / "latest").write_text("../elsewhere")  # DeepSpeed would read the files of a directory nobody checked
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(UnsafeCheckpointError, match=r"latest: names '\.\./elsewhere', which is not a directory inside"):
        check_deepspeed_checkpoint(ckpt)


def test_deepspeed_check_trusts_only_deepspeeds_own_bookkeeping_types(tmp_path):
    from argparse import Namespace

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from mgmlora.training.strategies import check_deepspeed_checkpoint

    ckpt = tmp_path / "step=2.ckpt"
    (ckpt / "checkpoint").mkdir(parents=True)
    (ckpt / "latest").write_text("checkpoint")
    optim = ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                         "state": {0: torch.ones(3)}}}, optim)
    check_deepspeed_checkpoint(ckpt)  # what DeepSpeed 0.19 writes for a ZeRO-2 run loads
    torch.save({"args": Namespace(lr=1.0)}, optim)
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace"):
        check_deepspeed_checkpoint(ckpt)


@pytest.mark.integration
def test_resuming_a_poisoned_deepspeed_checkpoint_fails_before_deepspeed_reads_it(tmp_path):
    marker = tmp_path / "payload_ran"
    ckpt = _deepspeed_dir(tmp_path / "step=2.ckpt", marker)
    script = ROOT / "tests" / "scripts" / "ds_fit_resume.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "2", "tiny-qwen3", "--resume_from", str(ckpt)],
                          capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path)
    assert not marker.exists(), "DeepSpeed unpickled the payload"
    assert proc.returncode != 0
    error = proc.stderr.strip().splitlines()[-1]
    assert "mgmlora.training.checkpoint.UnsafeCheckpointError: " in error and "mp_rank_00_model_states.pt" in error


def _parsed_model_path(cli_class, ckpt, monkeypatch):
    """`fit --ckpt_path <ckpt>`'s model_path as the CLI has it just before anything is instantiated."""
    from mgmlora.cli import PARSER_KWARGS
    from mgmlora.training.module import LoraLitModule

    class Parsed(Exception):
        pass

    def stop(self):  # LightningCLI's public hook right before instantiation: the config is final here
        raise Parsed(self.config)

    monkeypatch.setattr(cli_class, "before_instantiate_classes", stop)
    monkeypatch.chdir(ROOT)
    with pytest.raises(Parsed) as parsed:
        cli_class(LoraLitModule, L.LightningDataModule, subclass_mode_data=True, parser_kwargs=PARSER_KWARGS,
                  args=["fit", "--config", "configs/demo_chameleons.yaml", "--ckpt_path", str(ckpt)])
    return parsed.value.args[0]["fit"]["model"]["model"]["model_path"]


@pytest.mark.integration  # over 1 s: keeps the fast tier under CI's 2 minutes
def test_mgmcli_keeps_a_checkpoint_files_hyperparameters_out_of_the_config_that_lightning_cli_merges(tmp_path,
                                                                                                    monkeypatch):
    # MgmCLI overrides LightningCLI's private _parse_ckpt_path (its only hook before instantiation) with a no-op.
    # Upstream control: plain LightningCLI still merges through that method. If upstream moves the merge elsewhere
    # the MgmCLI assertion fails; if it stops merging, the control fails and the override can go.
    from lightning.pytorch.cli import LightningCLI

    from mgmlora.cli import MgmCLI

    ckpt = tmp_path / "foreign.ckpt"
    torch.save({"hyper_parameters": {"model": {"model_path": str(tmp_path / "elsewhere")}}}, ckpt)

    class Upstream(MgmCLI):
        _parse_ckpt_path = LightningCLI._parse_ckpt_path

    assert _parsed_model_path(Upstream, ckpt, monkeypatch) == str(tmp_path / "elsewhere")
    assert _parsed_model_path(MgmCLI, ckpt, monkeypatch) != str(tmp_path / "elsewhere")


@pytest.mark.integration
def test_a_checkpoint_file_cannot_switch_on_remote_code_or_change_paths(tmp_path):
    # A pickle-free checkpoint file whose hyperparameters turn on trust_remote_code and point model_path at a
    # directory with a configuration_*.py: LightningCLI merged such hyperparameters into the config.
    marker = tmp_path / "remote_code_ran"
    evil = tmp_path / "evil_model"
    evil.mkdir()
    (evil / "configuration_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                                "from transformers import PretrainedConfig\n"
                                                "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (evil / "config.json").write_text(json.dumps({"model_type": "evil",
                                                  "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {"model": {"model_path": str(evil), "trust_remote_code": True,
                                               "tokenizer_path": str(evil)}}}, ckpt)
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "main.py"), "fit", "--config",
                           "configs/demo_chameleons.yaml", "--trainer.max_steps", "1", "--trainer.logger", "false",
                           "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
                           "--trainer.default_root_dir", str(tmp_path),
                           "--ckpt_path", str(ckpt)],
                          cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert not marker.exists(), "code from the checkpoint's model_path ran"
    assert proc.returncode != 0
    assert "not an mgmlora checkpoint directory" in proc.stderr.strip().splitlines()[-1]

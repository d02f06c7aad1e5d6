"""A saved adapter is checked before it is applied, on every path that reads one (adapter_check.py).

Each case damages a copy of a real checkpoint one way and runs it through both kinds of reader: the training loop's
(resume with `fit --ckpt_path`, `validate`, `test`: LoraLitModule.on_load_checkpoint) and the tools' (export, merge,
generate, score and the leaderboard all go through read_run_adapter + build_trained_model).
"""

import json
import shutil

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from mgmlora.data.datamodule import ChatDataModule
from mgmlora.errors import classify
from mgmlora.tools.export import build_trained_model, export_adapter, model_args_for, read_run_adapter
from mgmlora.training.checkpoint import AdapterCheckpointIO
from tests.training.test_module import _module, _subset


@pytest.fixture
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def _edit_weights(path, change):
    weights = load_file(path / "adapter_model.safetensors")
    change(weights)
    save_file(weights, path / "adapter_model.safetensors", metadata={"format": "pt"})


def _edit_config(path, change):
    config = json.loads((path / "adapter_config.json").read_text())
    change(config)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _first_lora_a(weights):
    return next(k for k in sorted(weights) if ".lora_A." in k)


def _drop(w):
    del w[_first_lora_a(w)]


def _base_weight(w):
    key = _first_lora_a(w).replace(".lora_A.weight", ".base_layer.weight")
    w[key] = torch.zeros(4, 4)


def _reshape(w):
    key = _first_lora_a(w)
    w[key] = torch.zeros(w[key].shape[0] + 1, w[key].shape[1])


def _integer(w):
    key = _first_lora_a(w)
    w[key] = w[key].to(torch.int32)


def _truncate(path):
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


CASES = {
    "missing tensor": (lambda p: _edit_weights(p, _drop), r"1 adapter tensor\(s\) missing, e\.g\. .*lora_A"),
    "frozen base weight": (lambda p: _edit_weights(p, _base_weight), r"base_layer\.weight names a frozen base weight"),
    "shape": (lambda p: _edit_weights(p, _reshape), r"lora_A\.weight has shape \(17, "),
    "dtype": (lambda p: _edit_weights(p, _integer), r"has dtype torch\.int32, not a floating-point type"),
    "pissa init": (lambda p: _edit_config(p, lambda c: c.update(init_lora_weights="pissa")),
                   r"init_lora_weights 'pissa' is not supported"),
    "unimplemented field": (lambda p: _edit_config(p, lambda c: c.update(lora_bias=True)),
                            r"adapter config field lora_bias = True is not supported"),
    "unknown field": (lambda p: _edit_config(p, lambda c: c.update(made_up_setting=1)),
                      r"field\(s\) \['made_up_setting'\] are not LoRA settings"),
    "malformed config": (lambda p: (p / "adapter_config.json").write_text('{"r": 16,'),
                         r"adapter_config\.json: not a valid adapter_config\.json"),
    "truncated weights": (_truncate, r"adapter_model\.safetensors: unreadable safetensors file"),
}


def _damaged(checkpoint, tmp_path, case):
    copy = tmp_path / "step=2.ckpt"
    shutil.copytree(checkpoint, copy)
    CASES[case][0](copy)
    return copy


def _one_line_user_error(error):
    assert classify(error) == ("user", 1) and "\n" not in str(error)


@pytest.mark.parametrize("case", list(CASES))
def test_the_tools_refuse_a_damaged_adapter_before_applying_it(checkpoint, tmp_path, case):
    path = _damaged(checkpoint, tmp_path, case)
    with pytest.raises(Exception, match=CASES[case][1]) as refused:
        run = read_run_adapter(path)
        build_trained_model(run, model_args_for(run, dtype="float32"))
    _one_line_user_error(refused.value)


@pytest.mark.parametrize("stage", ["fit", "validate"])
@pytest.mark.parametrize("case", ["missing tensor", "frozen base weight", "shape", "pissa init", "malformed config",
                                  "truncated weights"])
def test_resume_and_evaluation_refuse_a_damaged_adapter(checkpoint, tmp_path, case, stage):
    path = _damaged(checkpoint, tmp_path, case)
    module = _module()
    data = ChatDataModule(_subset(tmp_path, 4), val_path=_subset(tmp_path, 4), batch_size=2, shuffle=False)
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        plugins=[AdapterCheckpointIO()])
    with pytest.raises(Exception, match=CASES[case][1]) as refused:
        getattr(trainer, stage)(module, datamodule=data, ckpt_path=path)
    _one_line_user_error(refused.value)
    assert trainer.global_step == 0  # nothing trained from it


def test_a_truncated_trainer_state_is_one_line(checkpoint, tmp_path):
    copy = tmp_path / "step=2.ckpt"
    shutil.copytree(checkpoint, copy)
    data = (copy / "trainer_state.pt").read_bytes()
    (copy / "trainer_state.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"trainer_state\.pt: unreadable .*truncated or damaged") as refused:
        AdapterCheckpointIO().load_checkpoint(copy)
    _one_line_user_error(refused.value)
    with pytest.raises(ValueError, match=r"trainer_state\.pt: unreadable"):
        read_run_adapter(copy)


def test_an_intact_adapter_passes_every_check_and_exports(checkpoint, tmp_path):
    run = read_run_adapter(checkpoint)
    loaded = build_trained_model(run, model_args_for(run, dtype="float32"))
    assert loaded.model is not None
    out = export_adapter(run, tmp_path / "exported")
    again = read_run_adapter(out)
    assert again.adapter.keys() == run.adapter.keys()


def test_evaluation_with_another_lora_config_names_the_keys_and_the_fix(checkpoint, tmp_path):
    module = _module(r=8)  # the checkpoint's adapter is r16 (balanced)
    data = ChatDataModule(_subset(tmp_path, 4), val_path=_subset(tmp_path, 4), batch_size=2, shuffle=False)
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, plugins=[AdapterCheckpointIO()])
    with pytest.raises(ValueError, match=r"configured LoRA \(model\.lora\.r: checkpoint 16 vs config 8.*\): set "
                                         r"these keys to the checkpoint's values") as refused:
        trainer.validate(module, datamodule=data, ckpt_path=checkpoint)
    _one_line_user_error(refused.value)

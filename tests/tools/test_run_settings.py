"""A tool rebuilds a run's settings through one function and one typed parser (mgmlora.tools.run_settings)."""

import sys

import pytest
import yaml

from mgmlora.errors import UsageError
from mgmlora.tools.export import RunAdapter
from mgmlora.tools.run_settings import run_settings
from tests.conftest import ROOT


def _run(tmp_path, config: dict | None = None, hparams: dict | None = None) -> RunAdapter:
    path = None
    if config is not None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
    return RunAdapter(tmp_path, None, {}, {}, hparams or {}, path)


def _recipe() -> dict:
    return yaml.safe_load((ROOT / "configs" / "demo_chat.yaml").read_text())


def test_the_saved_config_is_read_with_every_default_filled_in(tmp_path):
    recipe = _recipe()
    settings = run_settings(_run(tmp_path, recipe))
    assert settings.source == str(tmp_path / "config.yaml")
    assert settings.model["model"]["preset"] == recipe["model"]["model"]["preset"]
    assert settings.data["class_path"] == recipe["data"]["class_path"]
    import inspect

    from mgmlora.data.datamodule import ChatDataModule  # a default the file does not spell out is there too

    defaults = {k for k, p in inspect.signature(ChatDataModule).parameters.items() if p.default is not p.empty}
    assert defaults <= set(settings.data_init_args)
    args = settings.model_args(dtype="float32")
    assert args.dtype == "float32" and args.preset == recipe["model"]["model"]["preset"]
    assert args.gradient_checkpointing is False  # a tool never trains


def test_without_a_saved_config_the_checkpoints_record_is_the_model_section(tmp_path):
    settings = run_settings(_run(tmp_path, hparams={"model": {"preset": "tiny-qwen3", "dtype": "float32"}}))
    assert settings.data is None and settings.model_args().preset == "tiny-qwen3"
    with pytest.raises(ValueError, match="the base model is unknown"):  # a plain PEFT adapter: the base is asked for
        run_settings(_run(tmp_path)).model_args()


def test_a_tool_run_from_another_directory_names_the_tokenizer_again(tmp_path, monkeypatch):
    """The demos record a relative tokenizer_path; from elsewhere --tokenizer_path replaces it (the three tools)."""
    import dataclasses

    from mgmlora.commands.export import ExportSettings
    from mgmlora.commands.generate import GenerateSettings
    from mgmlora.commands.score import ScoreSettings
    from mgmlora.models.causal_lm import load_tokenizer

    monkeypatch.chdir(tmp_path)  # not the repository root: tests/assets/tokenizer is not here
    settings = run_settings(_run(tmp_path, _recipe()))
    with pytest.raises(FileNotFoundError, match="tokenizer directory 'tests/assets/tokenizer' does not exist.*"
                                                "--tokenizer_path"):
        load_tokenizer(settings.model_args())
    args = settings.model_args(tokenizer_path=str(ROOT / "tests" / "assets" / "tokenizer"))
    assert load_tokenizer(args) is not None and args.preset == _recipe()["model"]["model"]["preset"]
    for tool in (ExportSettings, GenerateSettings, ScoreSettings):
        assert "tokenizer_path" in {f.name for f in dataclasses.fields(tool)}, tool


def test_trust_remote_code_never_comes_from_the_run(tmp_path):
    recipe = _recipe()
    recipe["model"]["model"]["trust_remote_code"] = True
    settings = run_settings(_run(tmp_path, recipe))
    with pytest.raises(ValueError, match="Pass --trust_remote_code"):
        settings.model_args()
    assert settings.model_args(trust_remote_code=True).trust_remote_code


def test_a_data_class_outside_mgmlora_is_refused_before_its_module_is_imported(tmp_path):
    recipe = _recipe()
    recipe["data"]["class_path"] = "not_mgmlora_module_xyz.DataModule"
    with pytest.raises(UsageError, match="is not an mgmlora DataModule"):
        run_settings(_run(tmp_path, recipe))
    assert "not_mgmlora_module_xyz" not in sys.modules


def test_a_key_the_typed_signatures_refuse_names_the_file_and_the_key(tmp_path):
    recipe = _recipe()
    recipe["model"]["model"]["dtype"] = "bf16"
    with pytest.raises(UsageError, match=r"config\.yaml: .*model\.model\.dtype.*Expected a typing\.Literal"):
        run_settings(_run(tmp_path, recipe))


def test_a_data_config_replaces_the_runs_data_section(tmp_path):
    other = tmp_path / "data.yaml"
    other.write_text(yaml.safe_dump({"data": {"class_path": "mgmlora.data.datamodule.ChatDataModule",
                                              "init_args": {"train_path": "x.jsonl", "max_length": 64}}}))
    settings = run_settings(_run(tmp_path, _recipe()), other)
    assert settings.data_init_args["train_path"] == "x.jsonl" and settings.data_init_args["max_length"] == 64

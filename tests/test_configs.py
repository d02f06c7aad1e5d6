"""Every YAML in configs/ parses against the CLI, and typos are rejected at parse time."""

import re
from pathlib import Path

import pytest
import yaml

from mgmlora.cli import main
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FRAGMENTS = sorted((ROOT / "configs" / "strategy").glob("*.yaml"))
README = ROOT / "configs" / "README.md"


def _parse(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def _documented_lora(name: str) -> str:
    """The LoRA column of configs/README.md's row for `name` (a row that refers to another config is followed)."""
    rows = {m[1]: m[2] for m in re.finditer(r"^\| `([\w.-]+\.yaml)` \| [^|]* \| ([^|]*) \|", README.read_text(), re.M)}
    cell = rows[name]
    return _documented_lora(m[1]) if (m := re.match(r"as `([\w.-]+\.yaml)`", cell)) else cell


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_to_the_lora_its_readme_row_documents(path, capsys, in_repo_root):
    code, out, err = _parse(capsys, "--config", str(path))
    assert code == 0, err
    resolved = yaml.safe_load(out)
    from mgmlora.training.lora import LoraArgs

    documented = _documented_lora(path.name)
    if documented.startswith("LLM frozen"):
        assert resolved["model"]["trainable"]["llm"] == "frozen"
        return
    preset, r = re.match(r"(conservative|balanced|aggressive|chameleons) r(\d+)", documented).groups()
    lora = resolved["model"]["lora"]
    assert (lora["preset"], LoraArgs(**lora).resolved()["r"]) == (preset, int(r)), documented
    assert resolved["model"]["trainable"]["llm"] == "lora"
    if "experts on" in documented or "attention only" in documented:
        assert lora["target_experts"] is ("experts on" in documented)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_writes_every_key_and_a_launch_header(path):
    text = path.read_text()
    assert "python bin/main.py fit --config configs/" in text.split("seed_everything")[0]
    raw = yaml.safe_load(text)
    sections = {"model": ["model", "lora", "optim", "trainable", "speed"], "data": ["class_path", "init_args"]}
    for section, keys in sections.items():
        assert set(keys) <= set(raw[section])
    from dataclasses import fields

    from mgmlora.models.args import ModelArgs
    from mgmlora.training.lora import LoraArgs
    from mgmlora.training.loss import SpeedArgs
    from mgmlora.training.optim import OptimArgs
    from mgmlora.training.trainable import Trainability

    classes = {"model": ModelArgs, "lora": LoraArgs, "optim": OptimArgs, "trainable": Trainability, "speed": SpeedArgs}
    for key, cls in classes.items():
        assert set(raw["model"][key]) == {f.name for f in fields(cls)}, f"{path.name}: model.{key} keys"


@pytest.mark.parametrize("override,message", [
    (["--model.lora.preset", "balance"], "Expected a typing.Literal\\['conservative', 'balanced'"),
    (["--model.lora.rr", "3"], "unrecognized arguments: --model.lora.rr"),
    (["--trainer.max_stepz", "3"], "max_stepz"),
    (["--model.model.dtype", "bf16"], "Expected a typing.Literal\\['bfloat16', 'float16', 'float32'\\]"),
    (["--model.model.preset", "qwen-3"], "tiny-qwen3"),
    (["--data.init_args.ablation", "context"], "context_only"),
    (["--data.init_args.split", "by_user"], "held_out_users"),
])
def test_typos_are_rejected_with_the_valid_names(override, message, capsys, in_repo_root):
    code, _, err = _parse(capsys, "--config", "configs/demo_chameleons.yaml", *override)
    assert code == 2
    assert __import__("re").search(message, err), err


def test_preset_literal_lists_every_registry_preset():
    from typing import get_args

    from mgmlora.models.args import PresetName
    from mgmlora.models.registry import MGM_PRESETS, PRESETS

    assert set(get_args(PresetName)) == set(PRESETS) | set(MGM_PRESETS)


def test_configs_readme_lists_every_config():
    table = (ROOT / "configs" / "README.md").read_text()
    for path in CONFIGS + FRAGMENTS:
        assert str(Path(path).relative_to(ROOT / "configs")) in table


@pytest.mark.parametrize("path", FRAGMENTS, ids=[p.name for p in FRAGMENTS])
def test_strategy_fragments_compose_and_build(path, capsys, in_repo_root):
    code, out, err = _parse(capsys, "--config", "configs/demo_chameleons.yaml", "--config", str(path))
    assert code == 0, err
    strategy = yaml.safe_load(out)["trainer"]["strategy"]
    assert strategy["class_path"] == "mgmlora.training.strategies.MgmDeepSpeedStrategy"
    assert f"--config configs/strategy/{path.name}" in path.read_text()
    from mgmlora.training.strategies import MgmDeepSpeedStrategy

    built = MgmDeepSpeedStrategy(**{k: v for k, v in strategy["init_args"].items() if v is not None})
    zero = built.config["zero_optimization"]
    assert zero["stage"] == (3 if "zero3" in path.name else 2)
    assert bool(zero.get("offload_optimizer")) == ("offload" in path.name)
    assert built.config.get("zero_force_ds_cpu_optimizer", True) is ("offload" not in path.name)


def test_invalid_strategy_combination_is_rejected_before_any_model_loads(capsys, in_repo_root):
    from mgmlora.training.strategies import MgmDeepSpeedStrategy

    with pytest.raises(ValueError, match="offload_parameters: true needs stage: 3 \\(got stage: 2\\)"):
        MgmDeepSpeedStrategy(stage=2, offload_parameters=True)


def test_a_typo_inside_a_yaml_file_is_rejected(tmp_path, capsys, in_repo_root):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  lora:\n    lora_alpah: 3\n")
    code, _, err = _parse(capsys, "--config", "configs/demo.yaml", "--config", str(typo))
    assert code == 2 and "does not accept option" in err and "lora_alpah" in err


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_writes_every_generation_eval_setting(path):
    import inspect

    from mgmlora.training.generation_eval import GenerationEval

    callbacks = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
    [gen] = [c for c in callbacks if c["class_path"] == "mgmlora.training.generation_eval.GenerationEval"]
    assert set(gen["init_args"]) == set(inspect.signature(GenerationEval).parameters), path.name
    monitored = {c["init_args"].get("monitor") for c in callbacks if "monitor" in c.get("init_args", {})}
    if any(m and m.startswith("val_gen/") for m in monitored):
        assert gen["init_args"]["enabled"] and gen["init_args"]["every_n_val"] == 1, path.name

"""Every YAML in configs/ parses against the CLI as its header launches it, typos are rejected at parse time, and a
variant differs from its base recipe in the keys that name it and nothing else."""

import copy
import functools
import os
import re
from pathlib import Path

import pytest
import yaml

from mgmlora.cli import main
from tests.conftest import ROOT, launch_args, launch_files

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FRAGMENTS = sorted((ROOT / "configs" / "strategy").glob("*.yaml"))
README = ROOT / "configs" / "README.md"


def _merge(base: dict, overlay: dict) -> dict:
    """`overlay` over `base` as jsonargparse composes two --config files: mappings merge, anything else replaces."""
    merged = dict(base)
    for key, value in overlay.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def written(path: Path) -> dict:
    """What the launch command's files write, composed (the YAML text, before the CLI fills defaults)."""
    return functools.reduce(_merge, (yaml.safe_load(f.read_text()) for f in launch_files(path)), {})


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
def test_config_parses_to_the_lora_its_readme_row_documents(path):
    resolved = _effective(path.name)  # `fit --print_config` of its header's launch command: exit 0
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
    assert launch_files(path)[-1] == path, "the header's launch command ends with the config itself"
    raw = written(path)
    assert "seed_everything" in raw
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

    callbacks = written(path)["trainer"]["callbacks"]
    [gen] = [c for c in callbacks if c["class_path"] == "mgmlora.training.generation_eval.GenerationEval"]
    assert set(gen["init_args"]) == set(inspect.signature(GenerationEval).parameters), path.name
    monitored = {c["init_args"].get("monitor") for c in callbacks if "monitor" in c.get("init_args", {})}
    if any(m and m.startswith("val_gen/") for m in monitored):
        assert gen["init_args"]["enabled"] and gen["init_args"]["every_n_val"] == 1, path.name


# ---- recipes that cannot drift -------------------------------------------------------------------------------------
# Each variant and the base recipe it is compared with, with the difference it declares: dotted key -> value in the
# variant's effective config. Written here from the variants' headers and configs/README.md, not read from the YAML.
# A variant that is an overlay is launched as `--config <base> --config <variant>`; a standalone one (a recipe other
# commands name alone) writes every key and is held to the same difference.
QLORA = {"quant_type": "nf4", "bits": None, "expert_products": "dequantized", "double_quant": True,
         "compute_dtype": "bfloat16", "backend": "auto"}
LOGGER = "trainer.logger.init_args.name"
VARIANTS = {
    "mgm2b_lora_r8.yaml": ("mgm2b_lora.yaml", {"model.lora.preset": "conservative", LOGGER: "mgm2b_lora_r8"}),
    "mgm2b_lora_r32.yaml": ("mgm2b_lora.yaml", {"model.lora.preset": "aggressive", LOGGER: "mgm2b_lora_r32"}),
    "mgm2b_lora_packed.yaml": ("mgm2b_lora.yaml", {
        "data.init_args.window_samples": 128, "data.init_args.max_tokens": 4608, "trainer.accumulate_grad_batches": 56,
        "model.speed.loss_chunk_size": 1024, LOGGER: "mgm2b_lora_packed"}),
    "mgm2b_lora_packed_fp8.yaml": ("mgm2b_lora.yaml", {
        "model.model.quantization": {"quant_type": "fp8", "bits": None, "expert_products": "dequantized",
                                     "double_quant": True, "compute_dtype": None, "backend": "auto"},
        "data.init_args.window_samples": 128, "data.init_args.max_tokens": 4480, "trainer.accumulate_grad_batches": 48,
        "model.speed.loss": "compiled", "model.speed.loss_chunk_size": 1024, LOGGER: "mgm2b_lora_packed_fp8"}),
    "mgm2b_qlora.yaml": ("mgm2b_lora.yaml", {
        "model.model.quantization": QLORA, "model.model.gradient_checkpointing": True, "model.speed.compile": False,
        "model.speed.loss": "liger", LOGGER: "mgm2b_qlora"}),
    "qwen3-30b-a3b_qlora_chameleons.yaml": ("qwen3-30b-a3b_lora_chameleons.yaml", {
        "model.model.quantization": QLORA, "trainer.devices": 1, "trainer.strategy": "auto",
        "trainer.accumulate_grad_batches": 8, "model.speed.compile": False, LOGGER: "qwen3-30b-a3b_qlora_chameleons"}),
    "qwen3-30b-a3b_lora_chameleons_fp8.yaml": ("qwen3-30b-a3b_lora_chameleons.yaml", {
        "model.model.quantization": {"quant_type": "fp8", "bits": None, "expert_products": "dequantized",
                                     "double_quant": True, "compute_dtype": None, "backend": "auto"},
        "model.speed.keep_attention_outputs": True,
        "trainer.devices": 1, "trainer.strategy": "auto", "data.init_args.batch_size": 64,
        LOGGER: "qwen3-30b-a3b_lora_chameleons_fp8"}),
    "demo_moe.yaml": ("demo_chameleons.yaml", {
        "model.model.preset": "tiny-qwen3-moe", "model.lora.preset": "chameleons", "model.lora.target_experts": True,
        LOGGER: "demo_moe"}),
}


@functools.cache
def _effective(name: str) -> dict:
    """`name`'s effective config: what `fit --print_config` prints for the launch command in its header.

    Parsed once per test session (about 1 s each on CI's cores: the CLI's parser is built every time); a copy each call.
    """
    return copy.deepcopy(_printed_config(name))


@functools.cache
def _printed_config(name: str) -> dict:
    import contextlib
    import io

    out, cwd = io.StringIO(), os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            main(["fit", *launch_args(ROOT / "configs" / name), "--print_config"])
    finally:
        os.chdir(cwd)
    assert exit_info.value.code == 0, name
    return yaml.safe_load(out.getvalue())


def _flat(tree, prefix=""):
    """{dotted key: leaf value}; lists are leaves."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def _at(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def _declared(key: str, declared: dict) -> bool:
    return any(key == path or key.startswith(path + ".") for path in declared)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_variant_differs_from_its_base_in_the_declared_keys_and_nothing_else(name):
    base_name, declared = VARIANTS[name]
    variant, base = _effective(name), _effective(base_name)
    flat_variant, flat_base = _flat(variant), _flat(base)
    differing = sorted(k for k in flat_variant.keys() | flat_base.keys() if flat_variant.get(k, KeyError) !=
                       flat_base.get(k, KeyError))
    print(f"{name} against {base_name}:", *(f"  {k}: {flat_base.get(k)!r} -> {flat_variant.get(k)!r}"
                                             for k in differing), sep="\n")
    assert [k for k in differing if not _declared(k, declared)] == [], "undeclared differences"
    assert {path: _at(variant, path) for path in declared} == declared


OVERLAYS = sorted(name for name in VARIANTS if len(launch_files(ROOT / "configs" / name)) > 1)


def test_the_variants_named_in_the_issue_are_overlays():
    assert {"mgm2b_lora_r8.yaml", "mgm2b_lora_r32.yaml", "mgm2b_lora_packed.yaml"} <= set(OVERLAYS)


@pytest.mark.parametrize("name", OVERLAYS)
def test_an_overlay_writes_only_its_declared_keys(name):
    path = ROOT / "configs" / name
    base_name, declared = VARIANTS[name]
    assert launch_files(path) == [ROOT / "configs" / base_name, path]
    flat_base, written_keys = _flat(_effective(base_name)), _flat(yaml.safe_load(path.read_text()))
    # A key equal to the base's (a class_path that addresses init_args) changes nothing; any other must be declared.
    extra = [k for k, v in written_keys.items() if flat_base.get(k) != v and not _declared(k, declared)]
    assert extra == []


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_a_config_launched_with_a_base_is_a_declared_variant(path):
    files = launch_files(path)
    if len(files) > 1:
        assert path.name in VARIANTS and files[0].name == VARIANTS[path.name][0]
        assert "seed_everything" not in yaml.safe_load(path.read_text()), "an overlay writes only its difference"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_no_recipe_logs_a_placeholder_hp_metric(path):
    """Lightning's TensorBoardLogger writes hp_metric = -1 at step 0 unless told not to: a figure nothing measured."""
    tree: dict = {}
    for file in launch_files(path):  # the launch command's files composed, as jsonargparse composes them
        tree = _merge(tree, written(file))
    logger = tree["trainer"]["logger"]
    for one in logger if isinstance(logger, list) else [logger]:
        if one and one["class_path"].endswith("TensorBoardLogger"):
            assert one["init_args"]["default_hp_metric"] is False, path.name

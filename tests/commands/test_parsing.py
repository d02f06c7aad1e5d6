"""Every tool's command line comes from its typed settings (mgmlora.commands.parsing) and refuses what it can't use."""

import importlib
import types
import typing
from argparse import ArgumentError
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
from jsonargparse.typing import PositiveInt

from mgmlora.commands import COMMANDS
from mgmlora.commands.parsing import parse_settings
from mgmlora.errors import one_line


@dataclass
class Example:
    checkpoint: str
    """where the run is"""
    output: Path | None = None
    merge: bool = False
    sample: bool | None = None
    dtype: Literal["bfloat16", "float32"] | None = None
    n: PositiveInt = 5
    names: list[str] | None = None


def _parse(*argv):
    return parse_settings(Example, list(argv), "an example")


def test_each_field_becomes_the_flag_its_type_describes():
    got = _parse("--checkpoint", "c", "--output", "o", "--merge", "--sample", "false", "--dtype", "float32",
                 "--n", "2", "--names", "a", "b")
    assert got == Example("c", Path("o"), True, False, "float32", 2, ["a", "b"])
    assert _parse("--checkpoint", "c") == Example("c")  # defaults: None means "the run's own value"


@pytest.mark.parametrize("argv,message", [
    (["--checkpoint", "c", "--outp", "o"], "unrecognized arguments: --outp o"),  # no prefix matching
    (["--checkpoint", "c", "--merg"], "unrecognized arguments: --merg"),
    (["--checkpoint", "c", "--colour", "red"], "unrecognized arguments: --colour red"),
    (["--checkpoint", "c", "--dtype", "bf16"], "argument --dtype: invalid choice: 'bf16' (choose from 'bfloat16', "
                                               "'float32')"),
    (["--checkpoint", "c", "--n", "0"], 'Parser key "n": Not of type PositiveInt: 0 does not conform to '
                                        "restriction v>0"),
    (["--output", "o"], "the following arguments are required: checkpoint"),
])
def test_a_flag_the_settings_do_not_accept_is_one_line(argv, message):
    with pytest.raises(ArgumentError) as error:
        _parse(*argv)
    assert one_line(error.value) == message


def _settings_classes():
    for name, module in COMMANDS.items():
        for value in vars(importlib.import_module(f"mgmlora.commands.{module}")).values():
            if is_dataclass(value) and value.__module__ == f"mgmlora.commands.{module}":
                yield name, value


def _literal(hint):
    args = get_args(hint) if get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((a for a in args if get_origin(a) is Literal), None)


CHOICES = [(name, cls, f.name, _literal(typing.get_type_hints(cls)[f.name]))
           for name, cls in _settings_classes() for f in fields(cls)
           if _literal(typing.get_type_hints(cls)[f.name]) is not None]


def test_the_closed_choices_of_every_tool_are_literals():
    # dtype, preset and the prompt settings of generate / score / export, the split of show-samples ...
    named = {(name, field) for name, _, field, _ in CHOICES}
    assert {("export", "dtype"), ("export", "preset"), ("generate", "dtype"), ("generate", "prompt_role"),
            ("generate", "image_aspect_ratio"), ("score", "dtype"), ("score", "metrics"),
            ("show-samples", "split")} <= named


@pytest.mark.parametrize("name,cls,field,literal", CHOICES, ids=[f"{c[0]}-{c[2]}" for c in CHOICES])
def test_every_tool_refuses_a_value_outside_a_closed_choice_in_one_line(name, cls, field, literal):
    required = [a for f in fields(cls) if f.default is f.default_factory is MISSING
                for a in (f"--{f.name}", "x")]
    with pytest.raises(ArgumentError) as error:
        parse_settings(cls, [*required, f"--{field}", "not-a-choice"], name)
    message = one_line(error.value)
    assert message.startswith(f"argument --{field}: invalid choice: 'not-a-choice' (choose from ")
    assert all(repr(choice) in message for choice in get_args(literal))


@pytest.mark.parametrize("tool,argv,message", [
    ("estimate", ["--gpu_memory", "24"], "unrecognized arguments: --gpu_memory 24"),  # abbreviated own flag
    ("show_samples", ["--split", "dev"], "argument --split: invalid choice: 'dev' (choose from 'train', 'val', "
                                         "'test')"),
])
def test_a_tool_over_a_recipe_parses_its_flags_with_the_recipes_in_one_parser(tool, argv, message, in_repo_root):
    module = importlib.import_module(f"mgmlora.commands.{tool}")
    with pytest.raises(ArgumentError) as error:
        module.main(["--config", "configs/demo_chat.yaml", *argv])
    assert one_line(error.value).startswith(message)


def test_the_tools_that_read_a_config_take_the_config_a_run_saved(tmp_path, in_repo_root):
    """<log_dir>/config.yaml holds fit's own keys (ckpt_path, weights_only): `fit --config` takes it, so do they."""
    from mgmlora.cli import parse_config

    saved = tmp_path / "config.yaml"
    saved.write_text(Path("configs/demo_chameleons.yaml").read_text() + "ckpt_path: null\nweights_only: null\n")
    config = parse_config(["--config", str(saved)])
    assert "ckpt_path" not in config and "weights_only" not in config
    assert config["data"]["init_args"]["ablation"] == "context_only"
    estimate = importlib.import_module("mgmlora.commands.estimate")
    estimate.main(["--config", str(saved), "--gpu_memory_gib", "1"])
    with pytest.raises(ArgumentError):  # still one parser: a typo of those keys is refused
        parse_config(["--config", str(saved), "--ckpt_pat", "x"])

"""A run's settings, rebuilt for a tool: one function, one parser, the run's own saved config first.

Every tool that works on a run (export, merge, generate, score, the leaderboard) asks `run_settings` what the run
trained with. Its source is the LightningCLI config the run saved (`<log_dir>/config.yaml`, or `training_config.yaml`
inside an exported adapter). A checkpoint made without the CLI has none; then the `model` section comes from what the
LightningModule recorded in the checkpoint (its `hyper_parameters`: the same section, the same types). A tool's
`--data_config` replaces the `data` section.

Either way the sections go through one jsonargparse parser built from the same typed signatures LightningCLI uses
(`LoraLitModule`'s, a `TokenizedDataModule` subclass's): unknown keys and values outside a `Literal` are refused, and
every default is filled in, exactly as the run saw them. Only the `model` and `data` sections are read: nothing in a
saved config (a callback, a logger) is imported, and a data class outside `mgmlora.data` is refused before its module
is imported.
"""

from __future__ import annotations

from argparse import ArgumentError
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from jsonargparse import ArgumentParser

from mgmlora.data.datamodule import DATA_PACKAGE, TokenizedDataModule
from mgmlora.errors import UsageError, one_line
from mgmlora.models.args import ModelArgs
from mgmlora.training.module import LoraLitModule

if TYPE_CHECKING:
    from mgmlora.tools.export import RunAdapter



@dataclass(frozen=True)
class RunSettings:
    """What a run trained with, every default filled in.

    Attributes:
        source: where the settings were read (a config file, or the checkpoint's recorded hyperparameters).
        model: `LoraLitModule`'s arguments (`model`, `lora`, `optim`, `trainable`, `speed`, ...) as plain dicts.
        data: the DataModule as `{class_path, init_args}`; None when neither the run nor `--data_config` names one.
    """

    source: str
    model: dict
    data: dict | None

    def model_args(self, model_path: str | None = None, preset: str | None = None, dtype: str | None = None,
                   trust_remote_code: bool = False, tokenizer_path: str | None = None) -> ModelArgs:
        """The run's base model (`model.model`) with a tool's overrides (e.g. local weights on another machine).

        `tokenizer_path` replaces the run's (a relative one, as the demos record, resolves against the current
        directory: from elsewhere the tool names it again).

        `trust_remote_code` comes from the caller (the user's command line) only, never from the run's settings: a
        checkpoint must not be able to make a model directory's Python code run. A run trained with it on is refused
        until the user passes it again. Gradient checkpointing is off: a tool never trains.

        Raises:
            ValueError: a run trained with trust_remote_code the caller did not pass, or no base model at all.
        """
        saved = dict(self.model.get("model") or {})
        if saved.get("trust_remote_code") and not trust_remote_code:
            raise ValueError(f"{self.source}: this run was trained with model.trust_remote_code: true; settings read "
                             "from a checkpoint never switch it on. Pass --trust_remote_code if you trust the code in "
                             f"{model_path or saved.get('model_path')}.")
        overrides = {"model_path": model_path, "preset": preset, "dtype": dtype, "tokenizer_path": tokenizer_path}
        saved.update({k: v for k, v in overrides.items() if v is not None})
        saved.update(trust_remote_code=trust_remote_code, gradient_checkpointing=False)
        if not saved.get("model_path") and not saved.get("preset"):
            raise ValueError(f"{self.source}: the base model is unknown (no hyperparameters or config.yaml found); "
                             "pass --model_path (a local Hugging Face / MGM directory) or --preset.")
        known = {f.name for f in fields(ModelArgs)}
        return ModelArgs(**{k: v for k, v in saved.items() if k in known})

    @property
    def data_init_args(self) -> dict:
        """The DataModule's arguments (every default filled in); {} when no data section is known."""
        return dict((self.data or {}).get("init_args") or {})


def _parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LoraLitModule, "model", fail_untyped=False)
    parser.add_subclass_arguments(TokenizedDataModule, "data", required=False)
    return parser


def _sections(path: Path) -> dict:
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: not a config (a YAML mapping with `model` and `data` sections).")
    return raw


def run_settings(run: RunAdapter, data_config: str | Path | None = None) -> RunSettings:
    """The settings `run` trained with (see the module docstring for the sources), validated and completed.

    Raises:
        UsageError: a data class outside mgmlora.data; a key or value the typed
            signatures refuse (the message names the file and the key).
    """
    if run.run_config is not None:
        source, raw = str(run.run_config), _sections(run.run_config)
        model = raw.get("model")
    else:
        source, model = f"{run.source} (recorded hyperparameters)", run.hparams or None
        raw = {}
    data = raw.get("data")
    if data_config is not None:
        data, source = _sections(Path(data_config)).get("data"), f"{source} + {data_config}"
    if model is None:  # a plain PEFT adapter: the defaults, and the base from the command line (model_args)
        model = {"model": {}}
    if data is not None:
        if not isinstance(data, dict) or "class_path" not in data:
            raise UsageError(f"{data_config or source}: the data section is not `{{class_path, init_args}}`.")
        if not str(data["class_path"]).startswith(DATA_PACKAGE):  # a config must not make arbitrary code run
            raise UsageError(f"{data_config or source}: data.class_path {data['class_path']!r} is not an mgmlora "
                             "DataModule (mgmlora.data.*); pass --data_config with one.")
    try:
        parsed = _parser().parse_object({"model": model, "data": data}).as_dict()
    except ArgumentError as error:
        raise UsageError(f"{source}: {one_line(error)}") from None
    return RunSettings(source, parsed["model"], parsed.get("data"))


__all__ = ["RunSettings", "run_settings"]

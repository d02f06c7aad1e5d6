"""The LightningCLI behind `bin/main.py` (fit / validate / test; generation is `bin/generate.py`).

Every key of the YAML is checked at parse time against typed signatures: a typo in a key, or a value outside a
`Literal` (e.g. `lora.preset: balance`), is rejected with the valid names before any model loads. The resolved
config is written next to the run (`<log_dir>/config.yaml`).
"""

from __future__ import annotations

import os
import sys

import torch  # noqa: E402

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    # Without it, `import deepspeed` on a CPU-only machine prints a [WARNING] line to stdout, which corrupts
    # `--print_config > file.yaml` for configs that name a DeepSpeed strategy.
    os.environ["DS_ACCELERATOR"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
from jsonargparse import set_parsing_settings  # noqa: E402
from lightning.fabric.plugins import CheckpointIO  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.strategies import DeepSpeedStrategy  # noqa: E402

from mgmlora.checkpoint import AdapterCheckpointIO  # noqa: E402
from mgmlora.module import LoraLitModule  # noqa: E402
from mgmlora.preemption import PreemptionCheckpoint  # noqa: E402

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # dataclass attribute docstrings become --help text


class MgmCLI(LightningCLI):
    """LightningCLI with mgmlora's defaults: adapter-only checkpoints and an overwritable saved config."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """The subcommands: fit, validate and test.

        Generation has its own entry point (`bin/generate.py`: sampling settings, batched left-padded generation, the
        Chameleons leaderboard), so `predict` is not offered half-working.
        """
        commands = dict(LightningCLI.subcommands())
        commands.pop("predict", None)
        return commands

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Adds AdapterCheckpointIO (unless a CheckpointIO is named, or DeepSpeed) and PreemptionCheckpoint."""
        plugins = kwargs.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        strategy = kwargs.get("strategy")
        deepspeed = isinstance(strategy, DeepSpeedStrategy) or (isinstance(strategy, str) and "deepspeed" in strategy)
        if not deepspeed and not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AdapterCheckpointIO())
        kwargs["plugins"] = plugins
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, PreemptionCheckpoint) for c in trainer.callbacks):  # SIGTERM/SIGINT: save, exit 143
            trainer.callbacks.append(PreemptionCheckpoint())
        return trainer


class _ParseOnly(MgmCLI):
    """Parses and checks a run's configs and overrides exactly as `bin/main.py` does, and instantiates nothing."""

    def _set_seed(self) -> None:  # no global RNG side effect: only the config is wanted
        pass

    def instantiate_classes(self) -> None:  # no model, data or trainer: nothing loads, no GPU is needed
        pass


def parse_config(args: list[str]) -> dict:
    """The run's full config as plain dicts, every default filled in.

    `args` are `bin/main.py fit`'s, without the subcommand (e.g. `["--config", "configs/x.yaml", "--data.max_length",
    "512"]`): composed, short forms resolved and validated by LightningCLI's own parser.
    """
    cli = _ParseOnly(LoraLitModule, L.LightningDataModule, subclass_mode_data=True,
                     parser_kwargs={"parser_mode": "yaml"}, args=args, run=False)
    return cli.config.as_dict()


def main(args: list[str] | None = None, run: bool = True) -> MgmCLI:
    """Entry point: `python bin/main.py fit --config configs/demo.yaml [--trainer.max_steps 5 ...]`."""
    return MgmCLI(
        LoraLitModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "yaml"},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main(sys.argv[1:])

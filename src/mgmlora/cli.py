"""The LightningCLI behind `bin/main.py` (fit / validate / test / predict).

Every key of the YAML is checked at parse time against typed signatures: a typo in a key, or a value outside a
`Literal` (e.g. `lora.preset: balance`), is rejected with the valid names before any model loads. The resolved
config is written next to the run (`<log_dir>/config.yaml`).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
from jsonargparse import set_parsing_settings  # noqa: E402
from lightning.fabric.plugins import CheckpointIO  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from mgmlora.checkpoint import AdapterCheckpointIO  # noqa: E402
from mgmlora.module import LoraLitModule  # noqa: E402

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # dataclass attribute docstrings become --help text


class MgmCLI(LightningCLI):
    """LightningCLI with mgmlora's defaults: adapter-only checkpoints and an overwritable saved config."""

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Adds AdapterCheckpointIO unless the config names a CheckpointIO of its own."""
        plugins = kwargs.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AdapterCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


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

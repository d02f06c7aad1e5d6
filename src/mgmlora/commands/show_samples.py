"""`mgmlora show-samples`: the samples a config trains on, one JSON line each, before spending GPU hours.

    mgmlora show-samples --config configs/demo.yaml [--split train|val|test] [--n 5] [--data.max_length 512 ...]

Each line: user_hash (persona data) or id (image-text data), text (the full decoded sequence; an image placeholder
shows as <image>), target (the decoded supervised tokens only), num_tokens, num_label_tokens (before image
expansion; each image adds the model's image tokens, all unsupervised). Only the tokenizer and config files are
read, never the model weights. The config, its overrides and this tool's flags are parsed by `mgmlora fit`'s parser
with the flags below added (mgmlora.cli.parse_config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from jsonargparse.typing import PositiveInt

from mgmlora.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mgmlora.cli import parse_config
from mgmlora.commands.parsing import add_settings
from mgmlora.data.datamodule import datamodule_from_section
from mgmlora.models import model_info
from mgmlora.models.args import ModelArgs
from mgmlora.models.causal_lm import load_tokenizer


@dataclass
class ShowSettings:
    """`mgmlora show-samples`' own flags (the config and its overrides are `mgmlora fit`'s)."""

    split: Literal["train", "val", "test"] = "train"
    """which split to show"""
    n: PositiveInt = 3
    """how many samples"""


def datamodule_from(config: dict):
    """The config's DataModule with the config's tokenizer attached (no trainer, no model)."""
    datamodule = datamodule_from_section(config["data"])
    model_args = ModelArgs(**config["model"]["model"])
    # data.tokenizer_path set: connect loads that one (a preset without model_path bundles no tokenizer)
    tokenizer = None if datamodule.hparams.get("tokenizer_path") else load_tokenizer(model_args)
    datamodule.connect(tokenizer, model_info(model_args), model_args.trust_remote_code)
    return datamodule


def _decode(tokenizer, ids: list[int]) -> str:
    pieces, chunk = [], []
    for t in ids + [None]:
        if t is None or t == IMAGE_TOKEN_INDEX:
            pieces.append(tokenizer.decode(chunk))
            chunk = []
        else:
            chunk.append(t)
    return "<image>".join(pieces)


def main(argv: list[str] | None = None) -> list[dict]:
    """`mgmlora show-samples ...`: prints and returns the first `n` samples of a split."""
    config = parse_config(argv, lambda parser: add_settings(parser, ShowSettings))
    settings = ShowSettings(split=config.pop("split"), n=config.pop("n"))
    datamodule = datamodule_from(config)
    datamodule.setup("test" if settings.split == "test" else "fit")
    tok = datamodule.tokenizer
    rows = []
    for sample in datamodule.splits.get(settings.split, [])[: settings.n]:
        label_ids = [t for t in sample.labels if t != IGNORE_INDEX]
        meta = sample.meta or {}
        source = {"id": meta["id"]} if "id" in meta else {"user_hash": meta.get("user_hash")}
        row = {**source, "text": _decode(tok, sample.input_ids),
               "target": tok.decode(label_ids), "num_tokens": len(sample.input_ids),
               "num_label_tokens": len(label_ids)}
        print(json.dumps(row, ensure_ascii=False))
        rows.append(row)
    return rows


__all__ = ["ShowSettings", "datamodule_from", "main"]

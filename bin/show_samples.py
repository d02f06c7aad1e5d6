#!/usr/bin/env python
"""Print the samples a config trains on, one JSON line each, before spending GPU hours.

    python bin/show_samples.py --config configs/demo.yaml [--split train|val|test] [--n 5] [--data.max_length 512 ...]

Each line: user_hash (persona data) or id (image-text data), text (the full decoded sequence; an image placeholder
shows as <image>), target (the decoded supervised tokens only), num_tokens, num_label_tokens (before image
expansion; each image adds the model's image tokens, all unsupervised). Only the tokenizer and config files are
read, never the model weights.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing

from mgmlora.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from mgmlora.cli import parse_files  # noqa: E402
from mgmlora.errors import run  # noqa: E402
from mgmlora.models import model_info  # noqa: E402
from mgmlora.models.args import ModelArgs  # noqa: E402
from mgmlora.models.causal_lm import load_tokenizer  # noqa: E402
from mgmlora.tools.args import positive_int  # noqa: E402


def build_datamodule(config_paths: list[str], overrides: list[str] | None = None):
    """The config's DataModule with the config's tokenizer attached (no trainer, no model).

    The configs and overrides are parsed by `bin/main.py`'s own parser (composition, short forms, validation).
    """
    config = parse_files(config_paths, overrides)
    module_name, _, class_name = config["data"]["class_path"].rpartition(".")
    data_cls = getattr(importlib.import_module(module_name), class_name)
    datamodule = data_cls(**config["data"].get("init_args", {}))
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
    """Prints and returns the first `n` samples of a split."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, action="append", help="repeatable, composed in order")
    parser.add_argument("--split", choices=["train", "val", "test"], default="train")
    parser.add_argument("--n", type=positive_int, default=3)
    args, overrides = parser.parse_known_args(argv)  # the rest: bin/main.py overrides, e.g. --data.max_length 512
    datamodule = build_datamodule(args.config, overrides)
    datamodule.setup("test" if args.split == "test" else "fit")
    tok = datamodule.tokenizer
    rows = []
    for sample in datamodule.splits.get(args.split, [])[: args.n]:
        label_ids = [t for t in sample.labels if t != IGNORE_INDEX]
        meta = sample.meta or {}
        source = {"id": meta["id"]} if "id" in meta else {"user_hash": meta.get("user_hash")}
        row = {**source, "text": _decode(tok, sample.input_ids),
               "target": tok.decode(label_ids), "num_tokens": len(sample.input_ids),
               "num_label_tokens": len(label_ids)}
        print(json.dumps(row, ensure_ascii=False))
        rows.append(row)
    return rows


if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)

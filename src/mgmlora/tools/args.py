"""Argument checks shared by the `bin/` tools, run before any work starts.

Two kinds of mistake cost hours or destroy data if they are caught late: a count that makes no sense (`--n 0` wrote
empty continuations and then poisoned a rerun), and an output path that is one of the inputs (`--merge --output`
pointed at the base model overwrote its weights; sampling a file onto itself replaced 70 items by 6). Counts are
checked by argparse itself (`type=positive_int`), so the usual `error: argument --n: ...` line appears at once; paths
are checked by `refuse_overwrite` before anything is loaded.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path


class OutputPathError(ValueError):
    """An output path would overwrite or write inside one of the tool's inputs; the message names both and the fix."""


def positive_int(text: str) -> int:
    """Argparse `type` for counts (>= 1)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """Argparse `type` for counts where 0 means "off" (e.g. `top_k`)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """Argparse `type` for sizes and budgets (> 0)."""
    value = float(text)
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def refuse_overwrite(outputs: Mapping[str, str | Path | None], files: Mapping[str, str | Path | None] | None = None,
                     folders: Mapping[str, str | Path | None] | None = None) -> None:
    """Raises OutputPathError when an output is an input file, or is (or lies inside) an input folder.

    Paths are compared after resolving symlinks and `..`, so `out/../base` is caught as `base`.

    Args:
        outputs: what the tool will write, by the flag that names it (e.g. {"--output": "out/merged"}).
        files: input files, by flag; an output equal to one is refused.
        folders: input directories (base model, checkpoint); an output equal to one or inside one is refused.
    """
    for out_flag, out in outputs.items():
        if out is None:
            continue
        target = Path(out).resolve()
        for in_flag, src in (files or {}).items():
            if src is not None and target == Path(src).resolve():
                raise OutputPathError(f"{out_flag} {str(out)!r} is the input {in_flag} {str(src)!r}: writing it would "
                                      f"destroy the input. Choose another {out_flag}.")
        for in_flag, src in (folders or {}).items():
            if src is not None and _inside(target, Path(src).resolve()):
                raise OutputPathError(f"{out_flag} {str(out)!r} is inside the input {in_flag} {str(src)!r}: writing "
                                      f"there would overwrite or mix with its files. Choose an {out_flag} outside it.")

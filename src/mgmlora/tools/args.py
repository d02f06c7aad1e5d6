"""Output-path checks shared by the tools, run before any work starts.

An output path that is one of the inputs destroys data if it is caught late (`--merge --output` pointed at the base
model would overwrite its weights; sampling a file onto itself would replace the items by a sample). Paths are
checked by `refuse_overwrite` before anything is loaded; counts are checked by each tool's parser, through the
restricted types of its settings (mgmlora.commands.parsing).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mgmlora.errors import UsageError


class OutputPathError(UsageError, ValueError):
    """An output path would overwrite or write inside one of the tool's inputs; the message names both and the fix."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def refuse_overwrite(outputs: Mapping[str, str | Path | None], files: Mapping[str, str | Path | None] | None = None,
                     folders: Mapping[str, str | Path | None] | None = None) -> None:
    """Raises OutputPathError when an output is an input file, is (or lies inside) an input folder, or holds an input.

    An output that holds an input would take it along when `--overwrite` replaces the output directory whole.

    Paths are compared after resolving symlinks and `..`, so `out/../base` is caught as `base`.

    Args:
        outputs: what the tool will write, by the flag that names it (e.g. {"--output": "out/merged"}).
        files: input files, by flag; an output equal to one is refused.
        folders: input directories (base model, checkpoint); an output equal to one or inside one is refused.
        Any input inside an output is refused.
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
        # an output directory is replaced whole (--overwrite): one that holds an input would delete it
        for in_flag, src in {**(files or {}), **(folders or {})}.items():
            if src is not None and target != Path(src).resolve() and _inside(Path(src).resolve(), target):
                raise OutputPathError(f"{out_flag} {str(out)!r} holds the input {in_flag} {str(src)!r}: replacing it "
                                      f"would delete the input. Choose an {out_flag} that does not contain it.")


def refuse_finished_output(outputs: Mapping[str, Path], overwrite: bool) -> None:
    """Refuses outputs of a resumable tool (score, leaderboard) that exist while no progress file belongs to them.

    A progress file means an interrupted run that may continue (the tool checks its settings); without one, the files
    are a finished run's or the user's own, and only `overwrite` replaces them.

    Args:
        outputs: the tool's files by role (`leaderboard.output_files`): "--output", "summary file", "progress file".
        overwrite: the tool's --overwrite flag.
    """
    for role in ("--output", "summary file", "progress file"):
        if outputs[role].is_dir():  # found before the model loads, not when the finished output is renamed onto it
            raise UsageError(f"{role} {str(outputs[role])!r} is a directory; --output names the file to write "
                             "(e.g. out/preds.jsonl).")
    if overwrite or outputs["progress file"].exists():
        return
    for role in ("--output", "summary file"):
        if outputs[role].exists():
            raise UsageError(f"{role} {str(outputs[role])!r} exists and no progress file "
                             f"({outputs['progress file'].name}) is beside it, so it is a finished run's output or a "
                             "file of yours, not a run to resume: pass --overwrite to replace it, or choose another "
                             "--output.")

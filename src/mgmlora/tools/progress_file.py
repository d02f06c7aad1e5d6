"""Resumable outputs: a JSONL progress file whose first line records the settings, then one finished entry per line.

Shared by the Chameleons leaderboard (mgmlora.tools.leaderboard) and checkpoint scoring (mgmlora.tools.score). Each
finished entry is appended and flushed to disk as soon as its batch is done; a rerun reads the entries back and does
only the rest. A line cut by an interruption is skipped (its entry is made again) and closed before new lines go in.
The file belongs to one set of settings: a rerun with other settings is refused (ProgressMismatchError, naming what
differs) instead of mixing outputs made two ways. A run that finishes deletes its progress file (`discard`) once its
outputs are written: only an interrupted run leaves one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mgmlora.errors import disk_full, is_disk_full


def adapter_digest(path: str | Path) -> str:
    """SHA-256 over the names and bytes of the weight and config files in a checkpoint or adapter directory.

    Covers what decides the model's outputs: adapter_config.json, the adapter and trainables safetensors, the run's
    settings, and DeepSpeed's model-states files; not the optimizer state, which a checkpoint also holds.
    """
    folder = Path(path)
    names = ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors",
             "mgmlora_run.json")
    files = [folder / n for n in names if (folder / n).is_file()]
    files += sorted((folder / "checkpoint").glob("*model_states.pt"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class ProgressMismatchError(ValueError):
    """A progress file was written with other settings than this run's; the message names them and the fix."""


def read_entries(path: Path, settings: dict) -> list[dict]:
    """The entries of the progress file `path` made with exactly `settings` ([] when there is none yet).

    Cheap, so callers run it before loading a model: a mismatch is refused at once.

    Raises:
        ProgressMismatchError: when the file was written with other settings, or records none.
    """
    if not path.is_file() or not path.stat().st_size:
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        recorded = json.loads(lines[0]).get("settings")
    except (json.JSONDecodeError, AttributeError):
        recorded = None
    fix = f"Write to a new --output, or delete {path} to make every entry again with the current settings."
    if not isinstance(recorded, dict):
        raise ProgressMismatchError(f"{path}: the progress file does not record the settings it was made with, so "
                                    f"its entries cannot be trusted to match this run. {fix}")
    differ = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
    if differ:
        changes = "; ".join(f"{k}: {recorded.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
        raise ProgressMismatchError(f"{path}: made with other settings ({changes}). {fix}")
    entries = []
    for line in lines[1:]:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interruption: that entry is made again
            continue
    return entries


@contextmanager
def appending(path: Path, settings: dict) -> Iterator:
    """Opens `path` for appending entries (writing the settings line first when the file is new).

    Yields `write(entries)`, which appends the entries and forces them to disk before returning. A write the disk
    cannot take is cut off again (the file keeps its complete entries only) and raised as DiskFullError.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.is_file() or not path.stat().st_size
    cut = not fresh and not path.read_bytes().endswith(b"\n")
    with path.open("ab", buffering=0) as log:  # unbuffered: nothing is left to flush after a failed write

        def append(text: str) -> None:
            data, size = text.encode("utf-8"), os.fstat(log.fileno()).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[log.write(view):]
                os.fsync(log.fileno())
            except Exception as error:
                os.ftruncate(log.fileno(), size)
                if is_disk_full(error):
                    raise disk_full(path, len(data) - len(view), len(data)) from None
                raise

        if fresh:
            append(json.dumps({"settings": settings}, ensure_ascii=False) + "\n")
        if cut:
            append("\n")  # close a line cut by an interruption, so the next entry starts on its own line

        def write(entries: list[dict]) -> None:
            append("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))

        yield write


def discard(path: Path) -> None:
    """Deletes the progress file `path` of a finished run, after its outputs are written (the module docstring)."""
    path.unlink(missing_ok=True)


def write_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` through a hidden temporary file beside it, so a reader never sees half a file.

    On any failure the temporary file is deleted and `path` is unchanged; a full disk is DiskFullError.
    """
    data = text.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except Exception as error:
        written = tmp.stat().st_size if tmp.is_file() else 0
        tmp.unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full(path, written, len(data)) from None
        raise


__all__ = ["adapter_digest", "ProgressMismatchError", "appending", "discard", "read_entries", "write_atomically"]

"""Output directories of the tools: never written into what a user already has, never left half-written.

`export` and `merge` write a directory of files. Written straight into `--output`, a second export over a first mixed
the two (a merge with fewer shards left the old shards and index beside the new ones, and loaders read the stale
index), and a crash or a full disk left a directory that looked complete. So:

- `check_output_dir`: an existing `--output` that is a file, or a non-empty directory, is refused before any work,
  unless `--overwrite` is given;
- `writing_dir`: the output is written into a fresh hidden sibling (`.<name>.tmp-xxxxxxxx`, the names
  mgmlora.training.checkpoint's recovery knows) and renamed into place only when complete, replacing the previous
  directory with one rename each (mgmlora.training.checkpoint.staged_dir); on any failure the sibling is deleted and the
  previous output is untouched. A full disk is reported with the path and the bytes the output needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mgmlora.errors import DiskFullError, UsageError
from mgmlora.training.checkpoint import staged_dir


def check_output_dir(out: str | Path, overwrite: bool, flag: str = "--output") -> None:
    """Refuses an `out` that exists as a file, or as a non-empty directory without `overwrite` (module docstring)."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise UsageError(f"{flag} {str(out)!r} is a dangling symlink; remove it or choose another {flag}.")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {str(out)!r} is a file, not a directory; choose another {flag}.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{flag} {str(out)!r} already holds files; choose an empty or new {flag}, or pass "
                         "--overwrite to replace it (the new output is written beside it and swapped in when "
                         "complete).")


@contextmanager
def writing_dir(out: str | Path) -> Iterator[Path]:
    """Yields a fresh sibling of `out` to write into; on success it replaces `out`, on failure it is deleted."""
    with staged_dir(Path(out)) as tmp:  # a full disk: DiskFullError naming `out` and the bytes written
        yield tmp


__all__ = ["DiskFullError", "check_output_dir", "writing_dir"]

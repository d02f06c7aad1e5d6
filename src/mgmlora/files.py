"""File modes: what mgmlora writes gets the permissions the user's umask gives, as files made with `open` do.

safetensors (0.8) writes through a private temporary file and keeps its mode 0600, and Python's `tempfile`
directories are 0700, so adapters, checkpoints and merged models came out readable by their owner alone whatever the
umask (a shared group or a serving account could not read them). `umask_modes` sets a written file, or a written
directory and everything in it, to `0o666 & ~umask` (files) and `0o777 & ~umask` (directories): 0644/0755 under the
common umask 022, 0600/0700 under a private 077.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _LOCK:  # os.umask can only be read by setting it: restore it before anything else creates a file
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def umask_modes(path: str | Path) -> None:
    """Gives `path`, and for a directory everything inside it, the modes the umask gives new files (module docstring).

    Symbolic links are left alone (their targets are not this write's).
    """
    path, mask = Path(path), current_umask()
    entries = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for entry in entries:
        if entry.is_symlink():
            continue
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


__all__ = ["current_umask", "umask_modes"]

"""Adapter-only checkpoints: a directory per checkpoint, in PEFT's format plus what resume needs.

    step=000010.ckpt/
        adapter_config.json              PEFT LoraConfig (loadable with peft.PeftModel.from_pretrained)
        adapter_model.safetensors        the adapter (and modules_to_save), never the frozen base
        non_lora_trainables.safetensors  other trained weights (MGM projector + mining), when there are any
        trainer_state.pt                 optimizer, scheduler, loop and callback state (tensors and plain containers)

The LightningModule puts the adapter under `checkpoint["peft"]` (absent without LoRA) and the other trained weights
under `checkpoint["trainables"]`, and empties `state_dict`; this CheckpointIO writes the pieces.

Crash safety. A save writes `.step=000010.ckpt.tmp-<hex8>/` beside the checkpoint and renames it into place, so a
crash mid-save never leaves a half-written checkpoint under the real name. Overwriting an existing name (`last.ckpt`)
takes two renames: the old directory to `.last.ckpt.old-<hex8>`, then the new one into place. A crash between them
leaves no `last.ckpt` for a moment: loading `last.ckpt` then reads the complete old directory, and the next save into
that directory renames it back. That save also deletes what killed saves left behind (`.*.tmp-<hex8>` directories,
superseded `.*.old-<hex8>` ones), only those names and only in its own directory: one run per checkpoint directory.
`MgmDeepSpeedStrategy` writes DeepSpeed's checkpoint directories the same way (`fresh_tmp`, `publish`, `readable`).

Loading uses `torch.load(weights_only=True)` (`safe_load`): no pickled code is executed, and a file that needs it is
refused with `UnsafeCheckpointError`.

File modes. What mgmlora writes gets the permissions the user's umask gives, as files made with `open` do
(`umask_modes`): 0644 files and 0755 directories under the common umask 022. safetensors (0.8) keeps its private
temporary file's mode 0600, and `tempfile` directories are 0700, so adapters, checkpoints and merged models were
readable by their owner alone whatever the umask; `write_tensors` and every staged directory's `publish` (adapters,
checkpoints, the tools' output directories, whatever library wrote into them) set the modes.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from peft import LoraConfig
from safetensors.torch import save

from mgmlora.errors import disk_full, is_disk_full
from mgmlora.training.adapter_check import read_lora_config, read_tensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.pt"
TRAINABLES = "non_lora_trainables.safetensors"
RUN_SETTINGS = "mgmlora_run.json"  # beside an exported adapter: the run's hyperparameters (model, lora, ...)
_DEBRIS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")  # what AdapterCheckpointIO's saves leave


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled objects that would run code (or anything else outside the allow-list)."""


class DamagedCheckpointError(ValueError):
    """A checkpoint file that is cut short or overwritten (torch's reader cannot open it)."""


def safe_load(path: Path, map_location: Any = "cpu", allowed: tuple = (), mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)`, with the classes in `allowed` trusted too; refuses anything else.

    Raises:
        UnsafeCheckpointError: naming the file and the first global the file needs that is not allowed.
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))  # torch names the global it refused
        lines = [line for line in str(err).splitlines() if line.strip()]
        what = found.group(1) if found else (lines[-1][:200] if lines else "an unsupported pickle operation")
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it needs {what}, which is not a tensor, a plain container or a type mgmlora "
            "trusts, and loading it could run code; it was not written by mgmlora, or was altered. Resume from a "
            "checkpoint your own run wrote.") from None
    except (RuntimeError, EOFError) as err:  # torch's zip reader on a file cut short or overwritten
        if not isinstance(err, EOFError) and "zip" not in str(err).lower():
            raise
        cause = (str(err).splitlines() or ["ends early"])[0][:160]
        raise DamagedCheckpointError(f"{path}: unreadable ({cause}); the file is truncated or damaged: use an "
                                     "earlier checkpoint.") from None


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it: restore it before anything else creates a file
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def umask_modes(path: str | Path) -> None:
    """Gives `path`, and for a directory everything in it, the modes the umask gives new files (module docstring).

    `0o666 & ~umask` for files, `0o777 & ~umask` for directories and for files their writer made executable (DeepSpeed's
    `zero_to_fp32.py`). Symbolic links are left alone: their targets are not this write's.
    """
    path, mask = Path(path), current_umask()
    entries = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for entry in entries:
        if not entry.is_symlink():
            executable = entry.is_dir() or entry.stat().st_mode & 0o111
            os.chmod(entry, (0o777 if executable else 0o666) & ~mask)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Writes named tensors to one safetensors file (contiguous CPU copies, PEFT's "pt" format metadata).

    The bytes go through Python's own write, so that a full disk is the plain `OSError(ENOSPC)` (adapters are small
    enough to serialise in memory first); the file gets the umask's mode (`umask_modes`).
    """
    path.write_bytes(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"format": "pt"}))
    umask_modes(path)


def write_adapter(directory: Path, config: LoraConfig | dict, tensors: dict[str, torch.Tensor]) -> None:
    """Writes a PEFT adapter directory (the same files `PeftModel.save_pretrained` writes)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = config.to_dict() if isinstance(config, LoraConfig) else config
    config = LoraConfig(**{**config, "inference_mode": True})
    config.save_pretrained(str(directory))
    write_tensors(directory / ADAPTER_WEIGHTS, tensors)


def read_adapter(directory: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Reads a PEFT adapter directory written by `write_adapter` or `PeftModel.save_pretrained`."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not an mgmlora checkpoint: {name} is missing.")
    return read_lora_config(directory / ADAPTER_CONFIG), read_tensors(directory / ADAPTER_WEIGHTS)


def _debris(directory: Path) -> list[tuple[Path, str, str]]:
    """(path, checkpoint name, "tmp" | "old") of every directory in `directory` that an interrupted save left."""
    if not directory.is_dir():
        return []
    found = [(p, m["name"], m["kind"]) for p in directory.iterdir() if (m := _DEBRIS.match(p.name)) and p.is_dir()]
    return sorted(found, key=lambda f: f[0].stat().st_mtime, reverse=True)  # newest first


def recover(directory: Path) -> list[str]:
    """Puts back checkpoints a crash left renamed away, deletes the rest of the debris; returns what it did.

    An `.old-` directory is a complete checkpoint (only complete ones are renamed away): it is renamed back when
    nothing has taken its name since, else deleted. `.tmp-` directories are deleted: they were never renamed into
    place, so they may be incomplete.
    """
    done = []
    for path, name, kind in _debris(directory):
        if kind == "old" and not (directory / name).exists():
            os.replace(path, directory / name)
            done.append(f"restored {name} from {path.name}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"deleted {path.name}")
    return done


def fresh_tmp(path: Path) -> Path:
    """A new temporary sibling of `path` to write a checkpoint into (a name `recover` knows as debris)."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def publish(tmp: Path, path: Path) -> None:
    """Renames the complete checkpoint directory `tmp` to `path`, replacing a previous `path` (see the docstring).

    Everything in it first gets the umask's modes (`umask_modes`): libraries that wrote into it (safetensors through
    transformers' `save_pretrained`, a `tempfile` directory) may have left owner-only ones.
    """
    umask_modes(tmp)
    if not path.exists():
        os.replace(tmp, path)
        return
    # No rename replaces a non-empty directory: move the old one aside first. A crash between the two renames is
    # repaired by `recover` (the old one is complete), and `readable` reads the old one meanwhile.
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def tree_size(path: Path) -> int:
    """Bytes in the files under `path` (what a failed write had put on the disk)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextmanager
def staged_dir(path: Path, needed: int | None = None) -> Iterator[Path]:
    """Yields a fresh temporary sibling of `path` to write a directory into.

    It is published as `path` when the block completes (`publish`) and deleted when it fails, so no half-written
    directory ever carries the final name. A full disk (`ENOSPC`) becomes `DiskFullError` naming `path`, the bytes
    written and `needed` (the output's size when the caller knows it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_tmp(path)
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, path)
    except Exception as error:
        if not is_disk_full(error):
            raise
        written = tree_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full(path, written, needed) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a publish


def readable(path: Path) -> Path:
    """`path`, or while a crash has left it renamed away, the complete previous checkpoint of that name."""
    if path.exists():
        return path
    olds = [p for p, name, kind in _debris(path.parent) if kind == "old" and name == path.name]
    if olds:
        rank_zero_info(f"mgmlora: {path} is missing (a save was interrupted); loading {olds[0].name}, the complete "
                       "checkpoint it replaced. The next save puts it back under its name.")
        return olds[0]
    return path


def recover_once(directory: Path, done: set[Path]) -> None:
    """`recover(directory)` unless `directory` is in `done` (this process cleaned it already); logs what it did."""
    if directory.resolve() in done:
        return
    for line in recover(directory):
        rank_zero_info(f"mgmlora: {directory}: {line} (left by an interrupted save)")
    done.add(directory.resolve())


def recover_checkpoint_dirs(callbacks: list, done: set[Path]) -> None:
    """`recover` the directory of every checkpoint callback that names one (rank 0 only; before `last` is looked up).

    A callback without `dirpath` writes under the logger's next version directory, where no earlier `last` can be.
    `done` is the run's saver's set (`AdapterCheckpointIO.recovered`, `MgmDeepSpeedStrategy.recovered`), so that its
    first save does not clean the same directory again.
    """
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) != 0:
        return
    for callback in callbacks:
        if getattr(callback, "dirpath", None):
            recover_once(Path(callback.dirpath), done)


def _tensor_bytes(tree: Any) -> int:
    """Bytes of the tensors in a nested checkpoint dict (a lower bound of its size on disk)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


class AdapterCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO that stores adapter-only checkpoints as directories (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.recovered: set[Path] = set()  # directories this run has cleaned (recover_once)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        """Atomically writes `checkpoint` to the directory `path` (first cleaning what interrupted saves left)."""
        checkpoint = dict(checkpoint)
        peft, trainables = checkpoint.pop("peft", None), checkpoint.pop("trainables", None)
        if peft is None and not trainables:
            raise RuntimeError("AdapterCheckpointIO needs the LightningModule to put its adapter under "
                               "checkpoint['peft'] or its trained weights under checkpoint['trainables'] (mgmlora's "
                               "LoraLitModule does).")
        path = Path(path)
        recover_once(path.parent, self.recovered)
        with staged_dir(path, needed=_tensor_bytes([peft, trainables, checkpoint])) as tmp:
            if peft is not None:
                write_adapter(tmp, peft["config"], peft["adapter"])
            if trainables:
                write_tensors(tmp / TRAINABLES, trainables)
            with open(tmp / TRAINER_STATE, "wb") as state:  # a Python file: a full disk is OSError(ENOSPC)
                torch.save(checkpoint, state)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Reads a checkpoint directory back into Lightning's checkpoint dict (never unpickling code)."""
        path = readable(Path(path))
        if not (path / TRAINER_STATE).is_file():
            exported = (path / RUN_SETTINGS).is_file()  # written beside every exported adapter, never in a checkpoint
            fix = (" It is an exported adapter (no trainer state): pass one of its run's checkpoints/step=N.ckpt "
                   "directories, or score the adapter with bin/score.py --checkpoint." if exported else "")
            raise FileNotFoundError(f"checkpoint {str(path)!r} is not an mgmlora checkpoint directory (expected "
                                    f"{TRAINER_STATE} and {ADAPTER_WEIGHTS} and/or {TRAINABLES} inside).{fix}")
        checkpoint = safe_load(path / TRAINER_STATE, map_location=map_location or "cpu")
        if (path / ADAPTER_CONFIG).is_file():
            config, adapter = read_adapter(path)
            checkpoint["peft"] = {"config": config, "adapter": adapter}
        if (path / TRAINABLES).is_file():
            checkpoint["trainables"] = read_tensors(path / TRAINABLES)
        return checkpoint

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Deletes a checkpoint directory (ModelCheckpoint's top-k rotation)."""
        shutil.rmtree(path, ignore_errors=True)

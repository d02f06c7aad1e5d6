"""A new fit never lands in a directory that already holds a run: it would replace that run's adapter and config.

TensorBoard's and CSV's loggers pick a fresh `version_N` by themselves, but a config that names the version (or a
ModelCheckpoint `dirpath`) sends a second fit into the first one's directory: LightningCLI rewrites its config.yaml,
the final export replaces its adapter, and checkpoints of both runs mix. `check_new_run` (called by MgmCLI before
fit) refuses that with one line naming the directory and what it holds. Continuing the run that lives there
(`fit --ckpt_path` to a checkpoint inside it) is allowed: that is the same run going on.

`fit --ckpt_path last` resumes from the newest `last` checkpoint in this fit's own checkpoint directory, which Lightning
looks up; without a ModelCheckpoint `dirpath` or logger `version` of its own that directory is a new `version_N`'s,
where no earlier `last` can be, and Lightning would only warn and train from scratch. `check_last_found` refuses that
instead, naming the newest `last` checkpoint of the logger's earlier versions to pass as the path.

`validate` and `test` of a checkpoint log into the run it comes from (`checkpoint_run`), not into a new `version_N`
beside it: MgmCLI points the logger there and names the saved config `<subcommand>_config.yaml`, so the run's own
config.yaml stays as fit wrote it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mgmlora.errors import UsageError

RUN_MARKERS = ("config.yaml", "adapter", "checkpoints", "hparams.yaml")  # what a finished or started fit leaves


def _holds(folder: Path) -> list[str]:
    """The run files in `folder` (a checkpoint directory: any entry at all)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name in RUN_MARKERS and (p.is_file() or any(p.iterdir())))


LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself


def checkpoint_file(ckpt_path: str | Path | None) -> Path | None:
    """`ckpt_path` as a path, or None when it is unset or one of the names Lightning resolves itself ("last", ...)."""
    if ckpt_path is None or str(ckpt_path) in LIGHTNING_CKPT_NAMES:
        return None
    return Path(ckpt_path)


def checkpoint_run(ckpt_path: str | Path | None) -> Path | None:
    """The run directory of a checkpoint in its default place, `<run>/checkpoints/<name>`; None for any other place.

    A run directory is one a logger wrote (config.yaml or hparams.yaml beside `checkpoints/`). A checkpoint elsewhere
    (a ModelCheckpoint `dirpath` of its own, a copied file) names no run: its evaluation logs into a new version.
    """
    path = checkpoint_file(ckpt_path)
    if path is None:
        return None
    path = path.resolve()
    run = path.parent.parent
    if path.parent.name == "checkpoints" and any((run / name).is_file() for name in ("config.yaml", "hparams.yaml")):
        return run
    return None


def check_new_run(log_dir: str | Path | None, checkpoint_dirs: Iterable[str | Path | None],
                  ckpt_path: str | Path | None) -> None:
    """Refuses a fit whose log or checkpoint directory already holds another run (module docstring).

    Args:
        log_dir: the logger's run directory (`trainer.log_dir`), None without a logger.
        checkpoint_dirs: the ModelCheckpoint callbacks' `dirpath`s.
        ckpt_path: the checkpoint the fit resumes from, if any ("last" and "best" count as continuing).
    """
    resumed = checkpoint_file(ckpt_path)
    if resumed is not None:
        resumed = resumed.resolve()
    elif ckpt_path is not None:
        return  # Lightning looks "last" up in this run's own checkpoint directory: this run going on

    def continuing(folder: Path) -> bool:
        return resumed is not None and folder.resolve() in resumed.parents

    if log_dir is not None:
        folder = Path(log_dir)
        held = _holds(folder)
        if held and not continuing(folder):
            raise UsageError(f"{folder} already holds a run ({', '.join(held)}); this fit would replace its adapter "
                             "and config. Remove trainer.logger.init_args.version (a new version_N is picked), name "
                             "another one, or resume that run with --ckpt_path <a checkpoint inside it>.")
    for dirpath in checkpoint_dirs:
        if dirpath is None:
            continue
        folder = Path(dirpath)
        entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        if entries and not continuing(folder):
            raise UsageError(f"checkpoint directory {folder} already holds {len(entries)} entries (e.g. "
                             f"{entries[0]}); this fit's checkpoints would mix with them. Point the ModelCheckpoint "
                             "dirpath elsewhere, or resume that run with --ckpt_path <a checkpoint inside it>.")


def _lasts(folder: Path) -> list[Path]:
    """The `last` checkpoints in `folder` as Lightning names them (`last.ckpt`, `last-v1.ckpt`, ...)."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name.startswith("last") and p.name.endswith(".ckpt")]


def check_last_found(log_dir: str | Path | None, checkpoint_dirs: Iterable[str | Path | None],
                     picked_version: bool) -> None:
    """Refuses `--ckpt_path last` where no `last` checkpoint can be found (module docstring).

    That is the case when every ModelCheckpoint writes under the logger's run directory (no `dirpath`) and the logger
    picked a new `version_N` for this fit. A named version or `dirpath` stays allowed even while it holds no `last`
    yet: a job script that always passes `--ckpt_path last` starts there on its first launch, as Lightning does.

    Args:
        log_dir: the logger's run directory (`trainer.log_dir`), None without a logger.
        checkpoint_dirs: the ModelCheckpoint callbacks' `dirpath`s (None: `<log_dir>/checkpoints`, set at fit).
        picked_version: whether every logger picks its version itself (no `version` configured).
    """
    dirs = list(checkpoint_dirs)
    if log_dir is None or not picked_version or not dirs or any(dirs):
        return
    earlier = [p for run in Path(log_dir).parent.glob("*/checkpoints") for p in _lasts(run)]
    hint = (f"resume with --ckpt_path {max(earlier, key=lambda p: p.stat().st_mtime)} (the newest one under "
            f"{Path(log_dir).parent})" if earlier else "pass the checkpoint to resume as --ckpt_path <path>")
    raise UsageError(f"--ckpt_path last: this fit writes its checkpoints into a new version directory ({log_dir}), "
                     f"where no last checkpoint can be, so training would start over; {hint}.")


__all__ = ["LIGHTNING_CKPT_NAMES", "check_last_found", "check_new_run", "checkpoint_file", "checkpoint_run"]

"""A new fit never lands in a directory that already holds a run: it would replace that run's adapter and config.

TensorBoard's and CSV's loggers pick a fresh `version_N` by themselves, but a config that names the version (or a
ModelCheckpoint `dirpath`) sends a second fit into the first one's directory: LightningCLI rewrites its config.yaml,
the final export replaces its adapter, and checkpoints of both runs mix. `check_new_run` (called by MgmCLI before
fit) refuses that with one line naming the directory and what it holds. Continuing the run that lives there
(`fit --ckpt_path` to a checkpoint inside it) is allowed: that is the same run going on.

`fit --ckpt_path last` resumes from the newest `last` checkpoint in this fit's own checkpoint directory, which Lightning
looks up; where it finds none it only warns and trains from scratch: always so in a new `version_N` (no ModelCheckpoint
`dirpath` or logger `version` of its own), without `save_last`, and in a named directory whose run saved no `last`,
whose adapter it would then replace. `check_last_found` refuses those cases, naming the newest checkpoint it finds.

A fit that fails before training starts (a bad data record, a missing model file), or a `validate` / `test` that
fails, leaves files in its log directory that hold nothing: an empty TensorBoard event file and, in a directory it
made, its saved config and hparams.yaml. `discard_failed_run` removes them, and then the directory, so the next
launch does not count a `version_N` holding nothing, and a run's directory does not collect an empty event file per
failed evaluation.

`validate` and `test` of a checkpoint log into the run it comes from (`checkpoint_run`), not into a new `version_N`
beside it: MgmCLI points the logger there and names the saved config `<subcommand>_config.yaml`, so the run's own
config.yaml stays as fit wrote it.
"""

from __future__ import annotations

import os
import socket
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
                  ckpt_path: str | Path | None, logger_off: bool = False) -> None:
    """Refuses a fit whose log or checkpoint directory already holds another run (module docstring).

    Args:
        log_dir: the logger's run directory (`trainer.log_dir`), None without a logger.
        checkpoint_dirs: the ModelCheckpoint callbacks' `dirpath`s.
        ckpt_path: the checkpoint the fit resumes from, if any ("last" and "best" count as continuing).
        logger_off: the fit has no logger, and `log_dir` is `trainer.default_root_dir`, where it writes instead.
    """
    resumed = checkpoint_file(ckpt_path)
    if resumed is not None:
        resumed = resumed.resolve()
    elif ckpt_path is not None:
        return  # Lightning looks "last" up in this run's own checkpoint directory: this run going on

    def continuing(folder: Path) -> bool:
        return resumed is not None and folder.resolve() in resumed.parents

    # without a logger the run directory is fixed: a resume from the fit's own checkpoint directory goes on there
    own = logger_off and any(d is not None and continuing(Path(d)) for d in checkpoint_dirs)
    if log_dir is not None:
        folder = Path(log_dir)
        held = _holds(folder)
        if held and not continuing(folder) and not own and logger_off:  # (own: only ever without a logger)
            raise UsageError(f"{folder} already holds {', '.join(held)}; with trainer.logger off this fit writes its "
                             "config.yaml, checkpoints and adapter there and would replace them. Set "
                             "trainer.default_root_dir to a new directory, turn a logger on, or resume that run with "
                             "--ckpt_path <a checkpoint inside it>.")
        if held and not continuing(folder) and not own:
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


def _checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in `folder` (any name: `last`, `step=N`, `interrupted-step=N`)."""
    return [p for p in folder.iterdir() if p.name.endswith(".ckpt")] if folder.is_dir() else []


def _is_last(path: Path) -> bool:
    return path.name.startswith("last")  # as Lightning names them: last.ckpt, last-v1.ckpt, ...


def _checkpoint_dirs(log_dir: str | Path | None, dirpaths: Iterable[str | Path | None]) -> list[Path]:
    """Where each ModelCheckpoint writes: its `dirpath`, else `<log_dir>/checkpoints` (neither: left out)."""
    return [Path(d) if d else Path(log_dir) / "checkpoints" for d in dirpaths if d or log_dir is not None]


def check_last_found(log_dir: str | Path | None, callbacks: Iterable[tuple[str | Path | None, bool]],
                     picked_version: bool) -> None:
    """Refuses `--ckpt_path last` wherever Lightning would find no `last` and train from scratch (module docstring).

    Allowed: a `last` in a checkpoint directory, or a first launch into a fixed directory that holds nothing yet (a
    job script passing `last` from its first launch on) with a ModelCheckpoint that saves a `last`. Refused: no
    ModelCheckpoint, none with `save_last`, a new `version_N` the logger picked (no `last` can be there), and a
    directory that holds a run but no `last` (training would start over on top of it). The message names the newest
    checkpoint of any name found there or in the logger's other versions, to pass instead.

    Args:
        log_dir: the first logger's run directory (`trainer.log_dir`); without a logger `trainer.default_root_dir`,
            where Lightning then writes (None: no such directory).
        callbacks: each ModelCheckpoint's (`dirpath`, `save_last`); a None dirpath writes to `<log_dir>/checkpoints`.
        picked_version: whether the first logger picks a new version for this fit (TensorBoard's or CSV's logger
            without a `version`).
    """
    callbacks = list(callbacks)
    dirs = _checkpoint_dirs(log_dir, (d for d, _ in callbacks))
    if any(_is_last(p) for d in dirs for p in _checkpoints(d)):
        return
    new_version = log_dir is not None and picked_version and bool(callbacks) and not any(d for d, _ in callbacks)
    held = [d for d in dirs if _checkpoints(d)] + ([Path(log_dir)] if log_dir and _holds(Path(log_dir)) else [])
    if callbacks and any(last for _, last in callbacks) and not new_version and not held:
        return  # a first launch into a fixed directory
    if not callbacks:
        why = "no ModelCheckpoint writes checkpoints in this fit"
    elif new_version:
        why = f"this fit writes its checkpoints into a new version directory ({log_dir}), where none can be"
    elif not any(last for _, last in callbacks):
        why = "no ModelCheckpoint saves one (set save_last: true in its init_args)"
    else:
        why = f"{held[0]} holds a run but none, so training would start over on top of it"
    searched = dirs + (list(Path(log_dir).parent.glob("*/checkpoints")) if new_version else [])
    found = [p for d in searched for p in _checkpoints(d)]
    hint = (f"resume with --ckpt_path {max(found, key=lambda p: p.lstat().st_mtime)} (the newest checkpoint found)"
            if found else "pass the checkpoint to resume as --ckpt_path <path>")
    raise UsageError(f"--ckpt_path last: no last checkpoint to resume, {why}; {hint}.")


def check_eval_checkpoint(subcommand: str, ckpt_path: str | Path | None, log_dir: str | Path | None,
                          checkpoint_dirs: Iterable[str | Path | None]) -> None:
    """Refuses `validate`/`test --ckpt_path last|best` where Lightning would find no such checkpoint.

    Lightning then only warns ("No checkpoint will be loaded") and evaluates the untrained adapter, or, for `best`
    (which only a fit in the same process can name), fails with a traceback.

    Args:
        subcommand: `validate` or `test`.
        ckpt_path: the `--ckpt_path` value.
        log_dir: the first logger's run directory (`trainer.log_dir`); without a logger `trainer.default_root_dir`.
        checkpoint_dirs: the ModelCheckpoint callbacks' `dirpath`s (None: `<log_dir>/checkpoints`).
    """
    if ckpt_path is None or str(ckpt_path) not in ("last", "best"):
        return
    if str(ckpt_path) == "best":
        raise UsageError(f"{subcommand} --ckpt_path best: only a fit in the same process knows its best checkpoint; "
                         "pass the checkpoint to evaluate as --ckpt_path <run>/checkpoints/<name>.ckpt.")
    dirs = _checkpoint_dirs(log_dir, checkpoint_dirs)
    if any(_is_last(p) for d in dirs for p in _checkpoints(d)):
        return
    where = ", ".join(str(d) for d in dirs) if dirs else "no checkpoint directory (no ModelCheckpoint)"
    raise UsageError(f"{subcommand} --ckpt_path last: no last checkpoint in {where}, so the untrained adapter would be "
                     f"evaluated; name the run's version (--trainer.logger.init_args.version) or pass the checkpoint "
                     "as --ckpt_path <run>/checkpoints/<name>.ckpt.")


def saved_config_name(subcommand: str) -> str:
    """The name a command's config is saved under in its log directory (MgmCLI saves it, a failed run removes it).

    `config.yaml` for fit; `<subcommand>_config.yaml` for an evaluation, beside the run's own.
    """
    return "config.yaml" if subcommand == "fit" else f"{subcommand}_config.yaml"


def discard_failed_run(log_dir: str | Path | None, since: float, fresh: bool,
                       config_name: str = "config.yaml") -> list[Path]:
    """Removes what a command that failed before logging a metric wrote into `log_dir`; the directory if it empties.

    That command is a fit that failed before training started, or a `validate` / `test`. What it wrote there is a
    TensorBoard event file (a header, perhaps the hyperparameters, no metric) and, past data setup, the saved config
    (`config_name`: `saved_config_name` of the subcommand) and the logger's hparams.yaml.
    Its event files are known by TensorBoard's own name for them (`events.out.tfevents.<time>.<host>.<pid>.<n>`) and
    a modification time from `since` (seconds since the epoch) on. The config, hparams.yaml and the directory itself
    (once empty) go only when the command made the directory (`fresh`): in one that existed they are a run's or the
    user's. Nothing else is touched. Returns what it removed.
    """
    if log_dir is None or not Path(log_dir).is_dir():
        return []
    folder, removed = Path(log_dir), []
    host, pid = socket.gethostname(), str(os.getpid())

    def ours(path: Path) -> bool:
        return path.is_file() and path.stat().st_mtime >= since

    for path in sorted(folder.glob("events.out.tfevents.*")):
        parts = path.name.split(".")  # events, out, tfevents, <time>, <host...>, <pid>, <n>
        if len(parts) >= 7 and parts[-2] == pid and ".".join(parts[4:-2]) == host and ours(path):
            path.unlink()
            removed.append(path)
    for name in (config_name, "hparams.yaml") if fresh else ():
        if ours(folder / name):
            (folder / name).unlink()
            removed.append(folder / name)
    if fresh and not any(folder.iterdir()):
        folder.rmdir()
        removed.append(folder)
    return removed


def remove_empty_dirs(folders: Iterable[Path]) -> None:
    """Removes each of `folders` (deepest first) that is empty now; one another process has filled stays.

    The parents a command's version claim created (mgmlora.cli): a refused or failed command leaves no empty
    directories behind. Removing is tried, not checked first, so a directory that fills in between stays.
    """
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another command's run), or already gone
            pass


__all__ = ["LIGHTNING_CKPT_NAMES", "check_eval_checkpoint", "check_last_found", "check_new_run", "checkpoint_file",
           "checkpoint_run", "discard_failed_run", "remove_empty_dirs", "saved_config_name"]

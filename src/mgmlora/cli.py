"""The LightningCLI behind `mgmlora fit|validate|test` (`bin/main.py`; generation is `mgmlora generate`).

Every key of the YAML is checked at parse time against typed signatures: a typo in a key, or a value outside a
`Literal` (e.g. `lora.preset: balance`), is rejected with the valid names before any model loads. The resolved
config is written next to the run (`<log_dir>/config.yaml`).
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from jsonargparse import ArgumentParser, Namespace, set_parsing_settings
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info

from mgmlora import offline
from mgmlora.errors import USAGE, UsageError, one_line
from mgmlora.training.callbacks import RunSummary, StepLabels
from mgmlora.training.checkpoint import AdapterCheckpointIO, recover_checkpoint_dirs
from mgmlora.training.lightning_private import claim_new_version
from mgmlora.training.module import LoraLitModule
from mgmlora.training.outcome import RunOutcome
from mgmlora.training.preemption import PreemptionCheckpoint
from mgmlora.training.progress import progress_callback
from mgmlora.training.run_dir import (
    check_eval_checkpoint,
    check_last_found,
    check_new_run,
    checkpoint_file,
    checkpoint_run,
    remove_empty_dirs,
    saved_config_name,
)
from mgmlora.training.strategies import MgmDeepSpeedStrategy, align_rank_zero

# exit_on_error=False: a parse error is raised as argparse.ArgumentError instead of printed under the parser's usage
# text (about 90 lines for `fit`, with the one line that matters at the bottom); main() and mgmlora.errors.run print
# the message alone. allow_abbrev=False: argparse's prefix matching took `--trainer.max_ste 3` as max_steps; a flag is
# either spelled out or refused.
PARSER_KWARGS = {"parser_mode": "yaml", "exit_on_error": False, "allow_abbrev": False}


def prepare_process(args: Sequence[str] | None = None) -> None:
    """What every command sets before it parses or loads anything; called by the entry points, never at import.

    Offline mode (mgmlora.offline); `DS_ACCELERATOR=cpu` on a machine without CUDA (else `import deepspeed`, which a
    config naming a DeepSpeed strategy triggers while parsing, prints a [WARNING] line to stdout and corrupts
    `--print_config > file.yaml`); no tokenizer thread pools forked into data workers; dataclass attribute docstrings
    as help text, read only when the command line (`args`, else sys.argv) asks for help: reading them parses the
    source of every class in the parser, which a run never shows.
    """
    offline.enforce()
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_parsing_settings(docstring_parse_attribute_docstrings=asks_for_help(sys.argv[1:] if args is None else args))


def asks_for_help(args: Sequence[str]) -> bool:
    """Whether a command line shows help text: `-h`, `--help`, `--<key>.help CLASS`, `--print_config=comments`."""
    printed = any(a.startswith("--print_config") for a in args)
    return any(a == "-h" or (a.startswith("--") and a.split("=", 1)[0].endswith("help"))
               or (printed and "comments" in a) for a in args)


def _picks_version(logger) -> bool:
    """Whether the first configured logger picks a new `version_N` for each fit (Lightning's default logger does).

    TensorBoard's and CSV's loggers do without a `version`; other loggers (W&B, MLflow) name their runs otherwise.
    """
    first = logger[0] if isinstance(logger, list) and logger else logger
    if first is None or first is True:
        return True  # Lightning's default TensorBoard logger
    class_path = str(getattr(first, "class_path", ""))
    init = getattr(first, "init_args", None)
    return class_path.endswith(("TensorBoardLogger", "CSVLogger")) and (init is None or init.get("version") is None)


class MgmCLI(LightningCLI):
    """LightningCLI with mgmlora's defaults: adapter-only checkpoints and an overwritable saved config."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """The subcommands: fit, validate and test.

        Generation has its own entry point (`bin/generate.py`: sampling settings, batched left-padded generation, the
        Chameleons leaderboard), so `predict` is not offered half-working.
        """
        commands = dict(LightningCLI.subcommands())
        commands.pop("predict", None)
        return commands

    def _parse_ckpt_path(self) -> None:
        """Does nothing: a checkpoint never changes the run's config.

        LightningCLI (2.6) merges the `hyper_parameters` of a `--ckpt_path` *file* into the config before anything is
        instantiated, so a checkpoint could switch on `trust_remote_code` or point `model_path` at a directory with
        code in it. mgmlora's checkpoints (and DeepSpeed's) are directories, which LightningCLI never merges, so this
        only disables the foreign case. The config comes from the YAML files and the command line alone; a checkpoint
        restores weights, optimizer, scheduler, loop, callback and random-number state, and its adapter is checked
        against the configured LoRA. Overrides a private LightningCLI method (the only hook before instantiation);
        tests/test_security.py fails if LightningCLI stops calling it.
        """

    def before_fit(self) -> None:
        """Refuses a log or checkpoint directory holding another run; puts back a `last` an interrupted save moved.

        A logger that picks its own `version_N` gets one this fit creates first, so that fits started together never
        share one (mgmlora.training.lightning_private.claim_new_version); a refusal here gives it back.

        With `--ckpt_path last`, a fit whose checkpoint directory then holds no `last` is refused
        (mgmlora.training.run_dir.check_last_found): Lightning would warn and train from scratch.

        The first check is mgmlora.training.run_dir's. For `fit --ckpt_path last` after a save was killed, the complete
        previous `last` is put back first: Lightning looks `last` up by file name before any callback runs, so a
        `last.ckpt` that an interrupted save left renamed away would not be found and training would start over
        (mgmlora.training.checkpoint.recover).
        """
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        # two fits started together under one logger directory must not pick the same version_N (lightning_private)
        claimed = self._claim_version(self.trainer)
        try:
            self._check_run_dirs(ckpt_path, claimed)
        except BaseException:
            self._give_back(claimed)  # refused before the fit began: the version it claimed goes back
            raise

    def _claim_version(self, trainer: L.Trainer) -> Path | None:
        """`claim_new_version`, noting which of the log directory's parents it is about to create (`_give_back`)."""
        root = Path(trainer.loggers[0].root_dir) if trainer.loggers and hasattr(trainer.loggers[0], "root_dir") \
            else None
        self._made_parents = []  # deepest first
        while root is not None and not root.exists() and root != root.parent:
            self._made_parents.append(root)
            root = root.parent
        return claim_new_version(trainer.loggers, trainer.global_rank)

    def _give_back(self, claimed: Path | None) -> None:
        """Removes a claimed `version_N` that is still empty, and the parents the claim created that are empty too."""
        if claimed is None or any(claimed.iterdir()):
            return
        claimed.rmdir()
        remove_empty_dirs(getattr(self, "_made_parents", []))

    def _check_run_dirs(self, ckpt_path: str | None, claimed: Path | None) -> None:
        log_dir = self.trainer.log_dir if self.trainer.loggers else None
        # Without a logger, config.yaml, checkpoints/ and adapter/ go into trainer.default_root_dir (the working
        # directory unless set): that directory is the run's, and a run (or a user's config.yaml) there is refused too.
        run_dir = log_dir if self.trainer.loggers else self.trainer.default_root_dir
        check_new_run(run_dir, [getattr(c, "dirpath", None) for c in self.trainer.checkpoint_callbacks], ckpt_path,
                      logger_off=not self.trainer.loggers)
        self._note_fresh_dirs(claimed)
        if ckpt_path == "last":
            strategy = self.trainer.strategy
            saver = strategy if isinstance(strategy, MgmDeepSpeedStrategy) else strategy.checkpoint_io
            done = saver.recovered if isinstance(saver, MgmDeepSpeedStrategy | AdapterCheckpointIO) else set()
            recover_checkpoint_dirs(self.trainer.checkpoint_callbacks, done)  # the saver then skips these
            # where a ModelCheckpoint without a dirpath keeps `last`, for any logger (not always trainer.log_dir)
            check_last_found(_default_checkpoint_dir(self.trainer).parent,
                             [(getattr(c, "dirpath", None), bool(getattr(c, "save_last", False)))
                              for c in self.trainer.checkpoint_callbacks],
                             picked_version=_picks_version(self.config[self.subcommand].trainer.get("logger")))

    def _note_fresh_dirs(self, claimed: Path | None = None) -> None:
        """Tells RunOutcome which log directories this command makes (what it wrote there may go if it fails)."""
        fresh = {Path(d) for d in (getattr(lg, "log_dir", None) for lg in self.trainer.loggers)
                 if d is not None and not Path(d).exists()}
        fresh |= {claimed} if claimed is not None else set()
        for outcome in (c for c in self.trainer.callbacks if isinstance(c, RunOutcome)):
            outcome.fresh_dirs = fresh
            outcome.made_parents = list(getattr(self, "_made_parents", [])) if claimed is not None else []

    def before_validate(self) -> None:
        """`validate --ckpt_path last|best` with no such checkpoint is refused (run_dir.check_eval_checkpoint).

        An evaluation that logs into a new `version_N` (no checkpoint of a run) creates it first, as a fit does
        (`claim_new_version`): two evaluations started together never share one; a refusal here gives it back. Nothing
        before this hook reads the logger's version (the log line saying where the evaluation logs comes after it).
        """
        claimed = self._claim_version(self.trainer)
        try:
            self._check_eval_checkpoint()
        except BaseException:
            self._give_back(claimed)
            raise
        self._note_fresh_dirs(claimed)
        if self.trainer.loggers:
            rank_zero_info(f"mgmlora: {self.subcommand} logs to {self.trainer.log_dir}")

    def before_test(self) -> None:
        """As `before_validate`."""
        self.before_validate()

    def _check_eval_checkpoint(self) -> None:
        trainer = self.trainer  # built, its model not loaded yet (LoraLitModule.configure_model)
        default = _default_checkpoint_dir(trainer)
        check_eval_checkpoint(self.subcommand, self.config[self.subcommand].get("ckpt_path"), default.parent,
                              [getattr(c, "dirpath", None) or default for c in trainer.checkpoint_callbacks])

    def before_instantiate_classes(self) -> None:
        """A `--ckpt_path` that does not exist is refused; `validate` and `test` of a checkpoint log into its run.

        The refusal comes before the model loads or a log directory is made (fit, validate and test). For validate and
        test, the logger (each logger with `save_dir`, `name` and `version`, as TensorBoard's and CSV's have) is
        pointed at the run's directory instead of a new `version_N` beside it; the config is saved there as
        `<subcommand>_config.yaml`, beside the run's own config.yaml, which stays as fit wrote it.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        ckpt = checkpoint_file(config.get("ckpt_path"))
        if ckpt is not None and not ckpt.exists():  # fit's resume too
            raise UsageError(f"--ckpt_path {str(ckpt)!r} does not exist: pass a checkpoint of the run, e.g. "
                             "<run>/checkpoints/step=N.ckpt.")  # before the model loads or a log file is written
        if self.subcommand not in ("validate", "test"):
            return
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": saved_config_name(self.subcommand)}
        run = checkpoint_run(ckpt)
        loggers = config.trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = logger.get("init_args") if isinstance(logger, Namespace) else None
            if run is not None and init is not None and {"save_dir", "name", "version"} <= set(init.keys()):
                init.save_dir, init.name, init.version = str(run.parent.parent), run.parent.name, run.name

    def instantiate_classes(self) -> None:
        """Builds model, data and trainer as LightningCLI does, then connects the data to the model.

        The DataModule gets the model's tokenizer and ModelInfo through its public `connect` (the one wiring every
        tool and test uses too), instead of reaching into the trainer's LightningModule during `setup`.
        """
        super().instantiate_classes()
        connect = getattr(self.datamodule, "connect", None)  # a plain LightningDataModule from elsewhere has none
        if connect is not None:
            connect(self.model.tokenizer, self.model.info, self.model.model_args.trust_remote_code)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Adds AdapterCheckpointIO (unless a CheckpointIO is named, or DeepSpeed) and mgmlora's run callbacks.

        Those are PreemptionCheckpoint, StepLabels (one step for every event of an optimizer step) and RunOutcome.

        Also adds StepProgressBar (optimizer steps against the run's real total; plain lines when stdout is not a
        terminal) when the run shows a progress bar and the config names none.
        """
        plugins = kwargs.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        strategy = kwargs.get("strategy")
        deepspeed = isinstance(strategy, DeepSpeedStrategy) or (isinstance(strategy, str) and "deepspeed" in strategy)
        if not deepspeed and not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AdapterCheckpointIO())
        kwargs["plugins"] = plugins
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config.get("trainer") or {}
        # None and True both mean on; a bar or summary the config names wins
        if trainer_config.get("enable_progress_bar") is not False:
            _add_unless_named(kwargs, trainer_config, ProgressBar, progress_callback)  # mgmlora.training.progress
        if trainer_config.get("enable_model_summary") is not False:
            _add_unless_named(kwargs, trainer_config, ModelSummary, RunSummary)  # no made-up FLOPs total
        _check_trainer_settings(trainer_config)
        trainer = super().instantiate_trainer(**kwargs)
        stray_rank = align_rank_zero(trainer)  # a stray RANK in the environment must not silence the logs
        if stray_rank is not None:
            rank_zero_info(f"mgmlora: {stray_rank}")
        _check_sampler_setting(trainer, trainer_config)
        if not any(isinstance(c, PreemptionCheckpoint) for c in trainer.callbacks):  # SIGTERM/INT/HUP: save, exit 128+n
            trainer.callbacks.append(PreemptionCheckpoint())
        if not any(isinstance(c, StepLabels) for c in trainer.callbacks):  # one step for all events of a step
            trainer.callbacks.append(StepLabels())
        if not any(isinstance(c, RunOutcome) for c in trainer.callbacks):  # first: its check precedes AdapterExport
            trainer.callbacks.insert(0, RunOutcome())
        return trainer


def _default_checkpoint_dir(trainer: L.Trainer) -> Path:
    """Where a ModelCheckpoint without a `dirpath` saves and looks `last` up, as Lightning resolves it.

    That is `<save_dir>/<name>/<version>/checkpoints` of the first logger (the Trainer's `default_root_dir` for a
    logger without a local `save_dir`, as MLflow's or W&B's may be), `<default_root_dir>/checkpoints` without one. Not
    `trainer.log_dir`: for loggers other than TensorBoard's and CSV's that is the bare `save_dir`.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir) / "checkpoints"
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir, str(logger.name), version, "checkpoints")


def _add_unless_named(kwargs: dict, trainer_config, kind: type, make) -> None:
    """Appends `make()` to the Trainer's callbacks unless one of them is already a `kind`."""
    callbacks = kwargs.get("callbacks", trainer_config.get("callbacks")) or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    if not any(isinstance(c, kind) for c in callbacks):
        kwargs["callbacks"] = [*callbacks, make()]


def _check_trainer_settings(trainer_config) -> None:
    """Refuses Trainer settings Lightning accepts and then fails on mid-run (0 validates never, it divides by it)."""
    interval = trainer_config.get("val_check_interval")
    if isinstance(interval, int | float) and not isinstance(interval, bool) and interval <= 0:
        raise UsageError(f"trainer.val_check_interval: {interval} is not a validation interval: use a number of "
                         "micro-batches >= 1, a fraction of the epoch in (0, 1], or trainer.limit_val_batches: 0 "
                         "to turn validation off.")


def _check_sampler_setting(trainer: L.Trainer, trainer_config) -> None:
    """Refuses Lightning's DistributedSampler on several ranks, before any weight loads (the model loads later).

    mgmlora's window sampler shards the data across ranks itself: it must, to normalise the loss over the whole
    accumulation window. Lightning's sampler on top would re-shard it. The setting is read from the config (the
    Trainer keeps it only in a private connector), the rank count from the built Trainer.
    """
    if trainer.world_size > 1 and trainer_config.get("use_distributed_sampler", True):
        raise UsageError(f"trainer.use_distributed_sampler: true with {trainer.world_size} ranks: set "
                         "trainer.use_distributed_sampler: false (mgmlora's sampler shards the data across ranks "
                         "itself, to normalise the loss over the whole accumulation window).")


FIT_ONLY_KEYS = {"ckpt_path": str, "weights_only": bool}  # `fit`'s own arguments, saved in a run's config.yaml


class _ParseOnly(MgmCLI):
    """Parses and checks a run's configs and overrides exactly as `mgmlora fit` does, and instantiates nothing."""

    extra_arguments: Callable[[ArgumentParser], None] | None = None  # a tool's own flags, beside the run's keys

    def add_arguments_to_parser(self, parser: ArgumentParser) -> None:
        # the config a run saves (<log_dir>/config.yaml, `fit --print_config`) holds `fit`'s own keys (`ckpt_path`,
        # `weights_only`): read and dropped, so a tool takes a run's config as `fit --config` does
        for key, kind in FIT_ONLY_KEYS.items():
            parser.add_argument(f"--{key}", type=kind | None, default=None, help="from a run's config; ignored")
        if self.extra_arguments is not None:
            self.extra_arguments(parser)

    def _set_seed(self) -> None:  # no global RNG side effect: only the config is wanted
        pass

    def instantiate_classes(self) -> None:  # no model, data or trainer: nothing loads, no GPU is needed
        pass


def parse_config(args: list[str], extra_arguments: Callable[[ArgumentParser], None] | None = None) -> dict:
    """The run's full config as plain dicts, every default filled in.

    `args` are `mgmlora fit`'s, without the subcommand (e.g. `["--config", "configs/x.yaml", "--data.max_length",
    "512"]`): composed, short forms resolved and validated by LightningCLI's own parser. `extra_arguments` adds a
    tool's own flags to that parser (`mgmlora estimate --gpu_memory_gib 24 --config ...`): one parser refuses unknown
    and abbreviated flags of both kinds, and their values come back in the same dict.
    """
    prepare_process(args)
    parse_only = type("_ToolParse", (_ParseOnly,), {"extra_arguments": staticmethod(extra_arguments)})
    cli = parse_only(LoraLitModule, L.LightningDataModule, subclass_mode_data=True, parser_kwargs=PARSER_KWARGS,
                     args=args, run=False)
    config = cli.config.as_dict()
    for key in FIT_ONLY_KEYS:
        config.pop(key, None)
    return config


def parse_files(paths: list[str], overrides: list[str] | None = None) -> dict:
    """`parse_config` of composed YAML files plus `--a.b value` overrides (`mgmlora fit`'s syntax)."""
    return parse_config([a for path in paths for a in ("--config", str(path))] + list(overrides or []))


def main(args: list[str] | None = None, run: bool = True) -> MgmCLI:
    """Entry point of `mgmlora fit|validate|test` (and `python bin/main.py ...`): `fit --config configs/demo.yaml`.

    A parse error (typo in a key, wrong type, value outside a Literal, missing config file) prints
    `error: <the parser's message>` on stderr and exits 2 (SystemExit), as the parser itself would, without the
    usage text; `--help` has it. Everything after parsing raises; `bin/main.py` runs this through
    `mgmlora.errors.run`, which prints user errors as one line.
    """
    prepare_process(args)
    try:
        return MgmCLI(
            LoraLitModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs=PARSER_KWARGS,
            args=args,
            run=run,
        )
    except ArgumentError as error:
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE) from None

"""DataModules: pre-tokenised samples served in accumulation-aware, rank-sharded, resumable batches.

`TokenizedDataModule` owns the loaders; a subclass only turns its files into `TokenizedSample` lists per split
(`_build_splits`). `ChatDataModule` reads chat JSONL; `ChameleonsDataModule` (chameleons_datamodule.py) reads the
persona-dialogue JSON, `LlavaDataModule` (llava_datamodule.py) LLaVA image-text JSON.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import signal
import threading

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from mgmlora.batch import Batch
from mgmlora.data.chat import ChatTokenizer, TokenizedSample, TrainOn, read_chat_lines
from mgmlora.data.collate import pad_collate
from mgmlora.data.generation_items import GenerationItem, seeded_subset, tail
from mgmlora.data.sampling import BalancedWindowBatchSampler, TokenBudgetBatchSampler, WindowBatchSampler, WindowKey
from mgmlora.errors import MgmloraError, UsageError
from mgmlora.models import ModelInfo

log = logging.getLogger(__name__)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGTERM, SIGINT and SIGHUP; the main process stops them when done.

    Training stops on those signals at a micro-batch boundary with a checkpoint (mgmlora.training.preemption). A
    scheduler or Ctrl+C signals the whole process group. A worker that died of it (torch's worker SIGTERM handler
    exits) made the main process fail with "DataLoader worker is killed by signal: Terminated" before it could save
    (measured with 2 workers). A DataLoader stops its workers itself when its iterator is released; when a run ends
    on an exception that keeps the iterator alive, `_stop_workers_at_exit` stops them.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):  # a closed terminal or ssh session (POSIX only)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _stop_workers_at_exit() -> None:
    """At interpreter exit, kills the daemon child processes still alive (DataLoader workers).

    multiprocessing's own exit hook sends daemon children SIGTERM and then joins them without a timeout; workers that
    ignore SIGTERM (`ignore_stop_signals`) never end, so a run that stopped on an error (a CUDA out-of-memory in a
    training step, seen on an H200 with 2 workers) hung after printing it instead of exiting. Registered after
    multiprocessing's hook, so it runs first (atexit is last in, first out).
    """
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if not children:
        return
    if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise for every worker killed here
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=10)


@functools.cache
def _register_worker_cleanup() -> None:
    atexit.register(_stop_workers_at_exit)


def worker_settings(num_workers: int) -> dict:
    """The DataLoader arguments of mgmlora's loaders: worker signal handling for preemption, cleanup at exit, pinning.

    On a CUDA machine batches come in pinned memory (`Batch.pin_memory`), so their copy to the GPU is queued without
    the host waiting for it (`Batch.to`).
    """
    if num_workers > 0:
        _register_worker_cleanup()
    return {"num_workers": num_workers, "worker_init_fn": ignore_stop_signals, "pin_memory": torch.cuda.is_available()}


class NoTrainingSampleError(ValueError):
    """`fit` would train on nothing: no training sample has a supervised token (the message says why, per reason).

    Without this check the run prints Lightning's "No training batches", writes an untrained adapter and exits 0.
    """


class _Samples(Dataset):
    """Pre-tokenised samples; indexed by int (evaluation) or by WindowKey (training)."""

    def __init__(self, samples: list[TokenizedSample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | WindowKey) -> tuple[TokenizedSample, WindowKey | None]:
        if isinstance(key, WindowKey):
            return self.samples[key.index], key
        return self.samples[key], None


class _ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning stores in checkpoints, so that a resumed run continues mid-epoch.

    The position is the trainer's count of *processed* batches (not what the loader has prefetched), read through
    `position_fn` when Lightning saves the checkpoint.
    """

    def __init__(self, *args, position_fn, **kwargs):
        super().__init__(*args, **kwargs)
        self._position_fn = position_fn

    def state_dict(self) -> dict[str, int]:
        """Epoch and batches already trained on in it."""
        return self._position_fn()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Makes the sampler skip the batches the checkpointed run already trained on, in the checkpoint's epoch.

        The epoch is set here too: Lightning starts the resumed epoch's iterator before it calls `set_epoch`, and with
        `num_workers > 0` the iterator draws its first indices at once, from the sampler's epoch at that moment (0).
        """
        self.batch_sampler.set_epoch(state["epoch"])
        self.batch_sampler.resume_from(state["epoch"], state["batches_consumed"])


def _warn_if_epochs_vary(trainer: L.Trainer, batches: int) -> None:
    """Warns when a token-budget run goes past this epoch with a loader that Lightning will not rebuild.

    Lightning reads the loader's length once per build and ends every epoch at it; a token-budget epoch's count
    depends on its packing, so a later epoch that packs into more micro-batches would lose its last ones.
    """
    epoch_steps = -(-batches // trainer.accumulate_grad_batches)
    more_epochs = trainer.max_epochs != 1 and (trainer.max_steps < 0
                                               or trainer.max_steps > trainer.global_step + epoch_steps)
    if more_epochs and trainer.reload_dataloaders_every_n_epochs != 1:
        rank_zero_warn(f"data.max_tokens: this epoch packs into {batches} micro-batches and the next ones may pack "
                       "into a few more, which Lightning would cut off (it ends every epoch at the count of the "
                       "epoch the loader was built for). Set trainer.reload_dataloaders_every_n_epochs: 1 to rebuild "
                       "the loader, and its count, every epoch.")


def _planned_epochs(trainer: L.Trainer, batches: int, most: int = 100) -> range:
    """The epochs the fit still runs (from the current one; at most `most`), from max_epochs and max_steps."""
    first = trainer.current_epoch
    last = first + most - 1
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        last = min(last, trainer.max_epochs - 1)
    steps = max(batches // max(trainer.accumulate_grad_batches, 1), 1)  # optimizer steps per epoch
    if trainer.max_steps is not None and trainer.max_steps > 0:
        last = min(last, first + -(-(trainer.max_steps - trainer.global_step) // steps) - 1)
    return range(first, max(last, first) + 1)


def _collate(items: list[tuple[TokenizedSample, WindowKey | None]], pad_id: int) -> Batch:
    return pad_collate([s for s, _ in items], pad_id, window=items[0][1])


def count_refusals(init_args, accumulate_grad_batches: int | None) -> list[str]:
    """Why no loader can run with these data counts (`data.init_args`) and accumulation, one entry per key; [] if none.

    One rule for `fit` (the DataModule's setup) and `bin/estimate.py`, which refuses what fit would.
    """
    bad = [f"data.init_args.{key} must be >= {low} (got {init_args.get(key)})"
           for key, low in (("batch_size", 1), ("eval_batch_size", 1), ("max_tokens", 1), ("window_samples", 1),
                            ("max_length", 1), ("num_workers", 0))
           if init_args.get(key) is not None and init_args.get(key) < low]
    if accumulate_grad_batches is not None and accumulate_grad_batches < 1:
        bad.append(f"trainer.accumulate_grad_batches must be >= 1 (got {accumulate_grad_batches})")
    return bad


class TokenizedDataModule(L.LightningDataModule):
    """Loader machinery shared by mgmlora's data sources (see the module docstring).

    Training batches come from a WindowBatchSampler, which shards data across ranks itself (set
    `trainer.use_distributed_sampler: false`) and tells the LightningModule each accumulation window's token count.
    With `max_tokens` set, a TokenBudgetBatchSampler fills micro-batches up to that many positions instead (costs
    from `positions`); with `window_samples` set, a BalancedWindowBatchSampler fixes the samples per optimizer step and
    spreads them over the window's micro-batches by position count. Subclasses call `save_hyperparameters()` with at
    least: tokenizer_path, batch_size, eval_batch_size, num_workers, shuffle, seed, drop_last; and max_tokens /
    window_samples to offer those samplers.
    """

    takes_images = False  # whether samples carry images (an MGM model trained on text-only data is refused)

    def __init__(self):
        super().__init__()
        self.splits: dict[str, list[TokenizedSample]] = {}
        self.tokenizer = None  # set by connect()
        self.info: ModelInfo | None = None  # set by connect()

    def _build_splits(self, stage: str) -> None:
        """Fills `self.splits` with the splits `stage` needs ("train", "val", "test")."""
        raise NotImplementedError

    def connect(self, tokenizer, info: ModelInfo, trust_remote_code: bool = False) -> None:
        """Hands the DataModule what it needs from the model: its tokenizer and `ModelInfo` (family, image geometry).

        `bin/main.py` (MgmCLI) calls it after building model and data; every other caller (tools, tests) calls it
        before `setup`. With `data.tokenizer_path` set, that tokenizer is loaded here with the model side's loader
        (mgmlora.models.causal_lm.load_chat_tokenizer) and used instead of `tokenizer`, which may then be None.

        Args:
            tokenizer: the model's tokenizer (LoraLitModule.tokenizer); None only with `data.tokenizer_path` set.
            info: the model's family, vocabulary and image geometry (LoraLitModule.info).
            trust_remote_code: the model config's `trust_remote_code`, for loading `data.tokenizer_path`.
        """
        path = self.hparams.get("tokenizer_path")
        if path:
            from mgmlora.models.causal_lm import load_chat_tokenizer

            tokenizer = load_chat_tokenizer(path, "data.init_args.tokenizer_path", trust_remote_code)
        elif tokenizer is None:
            raise MgmloraError(f"{type(self).__name__}.connect: no tokenizer; pass the model's tokenizer or set "
                               "data.init_args.tokenizer_path.")
        self.tokenizer, self.info = tokenizer, info
        self._check_model_family()

    def setup(self, stage: str) -> None:
        """Reads and tokenises the files the stage needs (once; later calls reuse them)."""
        if self.info is None:
            raise MgmloraError(f"{type(self).__name__}.setup({stage!r}) before connect(): call "
                               "datamodule.connect(model.tokenizer, model.info) first (bin/main.py does it).")
        self._check_counts()
        self._build_splits(stage)
        if stage == "fit":
            self._require_training_samples()
        if stage == "validate" and "val" not in self.splits:
            raise ValueError("`validate` needs a validation split (set the data's validation path or ratio).")
        if stage == "test" and "test" not in self.splits:
            raise ValueError("`test` needs data.init_args.test_path.")

    def _check_counts(self) -> None:
        """Refuses counts that no loader can run with, naming the key, before any file is read."""
        trainer = self.trainer  # None outside a fit (the tools)
        bad = count_refusals(self.hparams, trainer.accumulate_grad_batches if trainer is not None else None)
        if bad:
            raise UsageError("; ".join(bad) + ".")

    def _check_model_family(self) -> None:
        """Refuses text-only data for an image model, where every sample would silently train without its image."""
        if self.info.takes_images and not self.takes_images:
            raise ValueError(f"data.class_path {type(self).__module__}.{type(self).__name__} has no images but the "
                             f"model ({self.info.family}) takes images, so every sample would train text-only. Set "
                             "data.class_path: mgmlora.data.llava_datamodule.LlavaDataModule (LLaVA JSON; records "
                             "without an image are allowed there), or a text model in model.model.preset / "
                             "model.model.model_path.")

    def drop_reasons(self, split: str) -> dict[str, int]:
        """Records of `split` left out of it, counted per reason (a phrase that says why); sources override it."""
        return {}

    def _require_training_samples(self) -> None:
        samples = self.splits.get("train") or []
        if any(s.num_supervised for s in samples):
            return
        reasons = {reason: n for reason, n in self.drop_reasons("train").items() if n}
        why = "; ".join(f"{n} {reason}" for reason, n in reasons.items()) or "no record was dropped"
        raise NoTrainingSampleError(
            f"{self.hparams.get('train_path')}: no training sample with a supervised token ({len(samples)} samples "
            f"kept). Left out: {why}. Fix the data file, or raise data.init_args.max_length if targets are too long.")

    def _collate_fn(self):
        """Batch assembly; sources with more than text (images) override it together with `_dataset`."""
        return functools.partial(_collate, pad_id=self.tokenizer.pad_token_id)

    def _dataset(self, samples: list[TokenizedSample]) -> Dataset:
        return _Samples(samples)

    def positions(self, samples: list[TokenizedSample]) -> list[int]:
        """Positions each sample occupies in the model, for the token budget; sources that expand tokens override it."""
        return [len(s.input_ids) for s in samples]

    def _train_sampler(self) -> WindowBatchSampler:
        trainer, hp, samples = self.trainer, self.hparams, self.splits["train"]
        supervised = [s.num_supervised for s in samples]
        common = dict(accumulate=trainer.accumulate_grad_batches, shuffle=hp.shuffle, seed=hp.seed,
                      rank=trainer.global_rank, world_size=trainer.world_size, drop_last=hp.drop_last,
                      # a strategy that runs the accumulation itself (DeepSpeed) steps across epoch boundaries
                      whole_windows=trainer.strategy.handles_gradient_accumulation)
        max_tokens, window_samples = hp.get("max_tokens"), hp.get("window_samples")
        if window_samples is not None:
            if hp.batch_size != 1:
                raise ValueError(f"data.window_samples={window_samples} with data.batch_size={hp.batch_size}: the "
                                 "window's samples are spread over trainer.accumulate_grad_batches micro-batches, so "
                                 "batch_size does not apply. Leave data.batch_size at 1.")
            sampler = BalancedWindowBatchSampler(supervised, self.positions(samples), window_samples,
                                                 max_tokens=max_tokens, **common)
            sampler.limit(trainer.limit_train_batches)  # where Lightning stops each epoch
            sampler.check_budget(_planned_epochs(trainer, sampler.cap or len(sampler)))
            return sampler
        if max_tokens is None:
            sampler = WindowBatchSampler(supervised, batch_size=hp.batch_size, **common)
            sampler.limit(trainer.limit_train_batches)
            return sampler
        if hp.batch_size == 1:
            rank_zero_warn(f"data.max_tokens={max_tokens} with data.batch_size=1: batch_size caps the samples per "
                           "micro-batch, so every micro-batch holds one sample. Raise data.batch_size.")
        sampler = TokenBudgetBatchSampler(supervised, self.positions(samples), max_tokens, batch_size=hp.batch_size,
                                          **common)
        sampler.set_epoch(trainer.current_epoch)  # len() is the count of the epoch about to run
        sampler.limit(trainer.limit_train_batches)
        if sampler.cap is None:  # a cap below every epoch's count holds all of them to Lightning's count
            _warn_if_epochs_vary(trainer, len(sampler))
        return sampler

    def train_dataloader(self) -> DataLoader:
        """Window-aware, rank-sharded, seeded, resumable training batches."""
        return _ResumableLoader(self._dataset(self.splits["train"]), batch_sampler=self._train_sampler(),
                                collate_fn=self._collate_fn(), persistent_workers=self.hparams.num_workers > 0,
                                position_fn=self._position, **worker_settings(self.hparams.num_workers))

    def _eval_loader(self, split: str) -> DataLoader:
        samples = self.splits[split]
        shard = samples[self.trainer.global_rank :: self.trainer.world_size] if self.trainer else samples
        return DataLoader(self._dataset(shard), batch_size=self.hparams.eval_batch_size, shuffle=False,
                          collate_fn=self._collate_fn(), **worker_settings(self.hparams.num_workers))

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches (each rank gets a disjoint shard); empty when there is no validation split."""
        return self._eval_loader("val") if self.splits.get("val") else []

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return self._eval_loader("test")

    # -- generation-based evaluation (mgmlora.training.generation_eval, bin/score.py) -----------------------------
    def generation_items(self, split: str, max_new_tokens: int) -> list[GenerationItem]:
        """Every item of `split` (after `setup`) as a prompt + reference, in file order; sources override it.

        Prompts are fitted so that prompt + `max_new_tokens` fits the data's max_length where the source can fit
        them (Chameleons drops the oldest turns, chat the oldest exchanges).
        """
        raise NotImplementedError(f"{type(self).__name__} offers no generation items.")

    def generation_subset(self, split: str, num_samples: int | None, seed: int,
                          max_new_tokens: int) -> list[GenerationItem]:
        """The fixed, seeded subset of `split` that generation metrics use (`num_samples` None: all of it)."""
        items = self.generation_items(split, max_new_tokens)
        return [items[i] for i in seeded_subset(len(items), num_samples, seed)]

    def reply_answer(self, reply: str) -> str:
        """The part of a generated reply that is scored (sources whose answers are wrapped in tags override it)."""
        return reply.strip()

    def item_inputs(self, item: GenerationItem) -> dict[str, torch.Tensor]:
        """The family's model inputs for an item beyond its prompt ids (image tensors); none for text sources."""
        return {}

    def _position(self) -> dict[str, int]:
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_consumed": progress.processed}



DATA_PACKAGE = "mgmlora.data."  # the only package a config's data.class_path may name (no arbitrary code runs)


def datamodule_from_section(section: dict, overrides: dict | None = None) -> TokenizedDataModule:
    """The DataModule a config's `data: {class_path, init_args}` section names, with `overrides` on its init_args.

    The one builder the tools use (score, show-samples, the leaderboard's training history): only mgmlora's data
    sources are accepted (a class outside `mgmlora.data` is refused before its module is imported), unknown settings
    are refused naming the valid ones, and overrides that are None or not settings of the class are left out.
    """
    import importlib
    import inspect

    class_path = str(section.get("class_path", ""))
    module_name, _, class_name = class_path.rpartition(".")
    if not class_path.startswith(DATA_PACKAGE):
        raise UsageError(f"data.class_path {class_path!r} is not one of mgmlora's data sources (mgmlora.data.*).")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, TokenizedDataModule)):
        raise UsageError(f"data.class_path {class_path!r} is not a TokenizedDataModule.")
    known = set(inspect.signature(cls).parameters)
    init = dict(section.get("init_args") or {})
    unknown = sorted(set(init) - known)
    if unknown:
        raise UsageError(f"data.init_args {unknown} are not settings of {class_path} (valid: {sorted(known)}); fix "
                           "the data section of the config.")
    init.update({k: v for k, v in (overrides or {}).items() if v is not None and k in known})
    return cls(**init)

class ChatDataModule(TokenizedDataModule):
    """Chat JSONL files (`{"messages": [...]}` per line) for causal-LM fine-tuning.

    Samples are tokenised once in `setup` through the model tokenizer's chat template; labels cover assistant turns
    only.

    Args:
        train_path: training conversations (JSONL).
        val_path: validation conversations (JSONL); null disables validation.
        test_path: conversations for the `test` subcommand (JSONL).
        tokenizer_path: a tokenizer directory used instead of the model's (null: the model's, the usual case); for
            data without a model at hand, e.g. bin/show_samples.py with a preset that bundles no tokenizer.
        max_length: longest sample in tokens (oldest turns are dropped first; a target that cannot fit is skipped).
        train_on: supervise every assistant turn or only the last one.
        batch_size: micro-batch size per device.
        eval_batch_size: micro-batch size for validation/test.
        num_workers: DataLoader worker processes (collation only; tokenisation happens once in setup).
        shuffle: reshuffle training data every epoch.
        seed: seed of the shuffling (same on every rank).
        drop_last: drop the last incomplete global batch instead of wrapping around.
        max_tokens: positions per micro-batch per device (image positions included); when set, micro-batches are
            filled up to this many positions instead of `batch_size` samples (`batch_size` then caps the samples per
            micro-batch). Meant for `model.speed.packing: true`, where padding costs nothing.
        window_samples: samples per optimizer step per device; when set, each step's samples are spread over
            `trainer.accumulate_grad_batches` micro-batches of near-equal positions (`batch_size` stays 1;
            with `max_tokens` set, a run whose planned epochs hold a larger micro-batch stops before training).
            Meant for `model.speed.packing: true`.
    """

    def __init__(self, train_path: str, val_path: str | None = None, test_path: str | None = None,
                 tokenizer_path: str | None = None, max_length: int = 2048, train_on: TrainOn = "all_assistant",
                 batch_size: int = 1, eval_batch_size: int = 1, num_workers: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, max_tokens: int | None = None,
                 window_samples: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.conversations: dict[str, list[list[dict]]] = {}  # raw conversations per split (generation references)
        self.line_numbers: dict[str, list[int]] = {}  # each conversation's line in its file, per split

    def generation_items(self, split: str, max_new_tokens: int) -> list[GenerationItem]:
        """Each conversation's last assistant turn is the reference; everything before it is the prompt.

        The prompt goes through the same chat template as training (`ChatTokenizer.fit_prompt`: the assistant
        header added, message text kept as text) and loses its oldest exchanges, as training samples do, until
        prompt + max_new_tokens fits max_length.
        """
        chat = ChatTokenizer(self.tokenizer, self.hparams.max_length, self.hparams.train_on)
        items = []
        for n, messages in enumerate(self.conversations[split]):
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is None:
                continue
            prompt = list(messages[:last])
            ids, prompt = chat.fit_prompt(prompt, self.hparams.max_length - max_new_tokens)
            context = "\n".join(f"{m['role']}: {m['content']}" for m in prompt[-3:] if m["role"] != "system")
            line = self.line_numbers[split][n]  # its real line in the file: blank lines are skipped, not renumbered
            items.append(GenerationItem(f"line {line}", ids, messages[last]["content"].strip(), tail(context)))
        return items

    def _build_splits(self, stage: str) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
        for split in wanted:
            path = self.hparams.get(f"{split}_path")
            if split in self.splits or path is None:
                continue
            chat = ChatTokenizer(self.tokenizer, self.hparams.max_length, self.hparams.train_on)
            numbered = read_chat_lines(path)
            conversations = [messages for _, messages in numbered]
            self.conversations[split] = conversations
            self.line_numbers[split] = [line for line, _ in numbered]  # names items by their real line
            samples = [s for s in map(chat, conversations) if s is not None]
            if chat.skipped:
                log.warning("%s: skipped %d conversation(s) whose final assistant turn cannot fit max_length=%d",
                            path, chat.skipped, self.hparams.max_length)
            if not samples:
                raise ValueError(f"{path}: no usable sample (all {chat.skipped} exceed max_length="
                                 f"{self.hparams.max_length}); raise data.max_length.")
            self.splits[split] = samples

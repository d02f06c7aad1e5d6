"""GenerationEval: what the model answers during validation and test, scored and shown in TensorBoard.

A Lightning callback, so that `LoraLitModule` stays about the loss. At the end of every validation (`fit`,
`validate`) and of `test`, it asks the model a fixed, seeded subset of the split's prompts, built by the DataModule
with the training prompt builders (`TokenizedDataModule.generation_subset`), generates greedily by default with a
KV cache, and logs:

- `val_gen/*` (`test_gen/*`): the scores of mgmlora.training.text_metrics (`rougeL`, `bleu4`, `chrf`, `exact_match`,
  `len_ratio` for dialogue and chat; `exact_match`, `token_f1`, `rougeL`, `len_ratio` for image-text answers), and
  `time_s` (the slowest rank's generation seconds). They are logged through the LightningModule from
  `on_validation_epoch_end`, before ModelCheckpoint and EarlyStopping read `trainer.callback_metrics`, so both can
  monitor them (e.g. `monitor: val_gen/rougeL, mode: max`).
- a Text-tab table `val_gen/samples` of the first `table_rows` items of rank 0's share (context, reference,
  prediction; the same items every time, so a reader sees the answers change), and for image data the images under
  Images (`val_gen/image_<k>`).

Each rank generates for its own share (items k, k + world, ...); the scores are torchmetrics states synced by
torchmetrics itself, so they equal one process's scores on the same items whatever the shares hold. DeepSpeed ZeRO-3 is
refused: its partitioned weights are gathered layer by layer inside every forward, so ranks generating different
numbers of tokens would wait on each other forever.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import lightning as L
import numpy as np
import torch

from mgmlora.data.generation_items import GenerationItem
from mgmlora.data.images import load_rgb
from mgmlora.errors import UsageError
from mgmlora.models import LoadedModel
from mgmlora.models.generation import GenerationArgs, seeded_batches
from mgmlora.models.processor import stack_inputs
from mgmlora.training.callbacks import run_step
from mgmlora.training.strategies import zero3_config
from mgmlora.training.text_metrics import GenerationMetrics, MetricKind

if TYPE_CHECKING:
    from mgmlora.training.module import LoraLitModule

THUMBNAIL = 224  # longest side of the images shown next to the table, in pixels


def markdown_table(rows: list[tuple[str, str, str, str]]) -> str:
    """A markdown table (TensorBoard's Text tab renders it) of (key, context, reference, prediction) rows."""
    cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>") or " "  # noqa: E731
    lines = ["| item | context | reference | prediction |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(cell(t) for t in row) + " |" for row in rows]
    return "\n".join(lines)


def thumbnail(path: str) -> np.ndarray:
    """The image as (3, H, W) uint8, longest side THUMBNAIL, for `SummaryWriter.add_image`."""
    img = load_rgb(path)
    img.thumbnail((THUMBNAIL, THUMBNAIL))
    return np.asarray(img).transpose(2, 0, 1).copy()


def answer_items(loaded: LoadedModel, datamodule, items: list[GenerationItem], gen: GenerationArgs
                 ) -> Iterator[tuple[list[GenerationItem], list[str]]]:
    """(batch, each item's first reply) for `items`, one generate call per batch (`seeded_batches`).

    The one path from a DataModule's generation items to replies: validation (`GenerationEval`) and bin/score.py
    (mgmlora.tools.score) both use it, so a checkpoint scored afterwards answers what validation saw it answer.
    `datamodule.reply_answer` turns a reply into the scored answer.
    """
    for batch, batch_gen in seeded_batches(items, gen):
        inputs = stack_inputs([datamodule.item_inputs(item) for item in batch])  # each (B, ...)
        replies = loaded.generate(datamodule.tokenizer, [item.prompt_ids for item in batch], batch_gen, inputs)
        yield batch, [r[0] for r in replies]


class GenerationEval(L.Callback):
    """Generation metrics and a sample table at every validation and test (see the module docstring).

    Args:
        enabled: generate at all (false: the callback does nothing, the config keeps its settings).
        num_samples: prompts per evaluation, a seeded subset of the split (null: the whole split).
        seed: seed of the subset (and of sampling, when `do_sample` is on).
        every_n_val: generate at every n-th validation only (1: every one; a monitored `val_gen/*` key needs 1).
        max_new_tokens: longest reply in tokens; prompts are fitted so prompt + reply fits data.max_length.
        batch_size: prompts per generate call on each rank (left-padded).
        do_sample: sample instead of greedy decoding (greedy makes the scores comparable between validations).
        temperature: softmax temperature when sampling.
        top_p: nucleus mass when sampling.
        metrics: `text` (dialogue, chat), `vqa` (short image-text answers) or `auto` (vqa for image data).
        table_rows: items shown in the TensorBoard table (0: no table).
        on_test: also score the test split under `test` (logged as test_gen/*).
    """

    def __init__(self, enabled: bool = True, num_samples: int | None = 32, seed: int = 0, every_n_val: int = 1,
                 max_new_tokens: int = 64, batch_size: int = 8, do_sample: bool = False, temperature: float = 0.7,
                 top_p: float = 0.9, metrics: Literal["auto", "text", "vqa"] = "auto", table_rows: int = 4,
                 on_test: bool = True):
        counts = {"num_samples": num_samples or 1, "every_n_val": every_n_val, "max_new_tokens": max_new_tokens,
                  "batch_size": batch_size}
        bad = {k: v for k, v in counts.items() if v < 1}
        if bad or table_rows < 0:
            raise UsageError(f"GenerationEval: {bad or {'table_rows': table_rows}} must be >= 1 (table_rows >= 0); "
                             "fix the callback's init_args in trainer.callbacks.")
        self.enabled, self.num_samples, self.seed, self.every_n_val = enabled, num_samples, seed, every_n_val
        self.metrics_kind, self.table_rows, self.on_test = metrics, table_rows, on_test
        self.gen = GenerationArgs(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_p=top_p, seed=seed, batch_size=batch_size)
        self._items: dict[str, list[GenerationItem]] = {}
        self._validations = 0
        self._metrics: GenerationMetrics | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuses ZeRO-3 before any work when this run would generate (see the module docstring).

        Lightning sets the DataModule up before the callbacks, so its splits say whether there is anything to ask.
        """
        split = {"fit": "val", "validate": "val", "test": "test"}.get(stage)
        limit = trainer.limit_test_batches if split == "test" else trainer.limit_val_batches
        has_split = bool(getattr(trainer.datamodule, "splits", {}).get(split))
        generates = self.enabled and has_split and limit != 0 and (split != "test" or self.on_test)
        if generates and zero3_config(trainer) is not None:
            raise UsageError("GenerationEval needs DeepSpeed ZeRO stage < 3 (ZeRO-3 ranks would hang generating "
                             "different lengths); use configs/strategy/zero2.yaml, or set the callback's enabled: "
                             "false and score checkpoints afterwards with bin/score.py.")

    def kind(self, datamodule) -> MetricKind:
        """The metric set for this data (`metrics`, or vqa for image data under `auto`)."""
        if self.metrics_kind != "auto":
            return self.metrics_kind
        return "vqa" if getattr(datamodule, "takes_images", False) else "text"

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: LoraLitModule) -> None:
        """Generates, scores and logs val_gen/* and the table (not during the sanity check)."""
        if not self.enabled or trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_val == 0:
            self.evaluate(trainer, pl_module, "val", "val_gen")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: LoraLitModule) -> None:
        """Generates, scores and logs test_gen/* and the table."""
        if self.enabled and self.on_test:
            self.evaluate(trainer, pl_module, "test", "test_gen")

    def evaluate(self, trainer: L.Trainer, pl_module: LoraLitModule, split: str, prefix: str) -> None:
        """Generates for this rank's share of the subset, syncs the scores across ranks and logs them."""
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "generation_subset"):
            raise UsageError("GenerationEval needs one of mgmlora's DataModules (trainer.datamodule, which builds the "
                             f"prompts), got {type(datamodule).__name__}; pass the DataModule to the Trainer, or set "
                             "the callback's enabled: false.")
        if split not in self._items:
            self._items[split] = datamodule.generation_subset(split, self.num_samples, self.seed,
                                                              self.gen.max_new_tokens)
        share = self._items[split][trainer.global_rank::trainer.world_size]
        if self._metrics is None or self._metrics.kind != self.kind(datamodule):
            self._metrics = GenerationMetrics(self.kind(datamodule))
        metrics = self._metrics.to(pl_module.device)
        metrics.reset()
        start = time.perf_counter()
        predictions = self.generate(pl_module, datamodule, share)
        metrics.update(predictions, [item.reference for item in share])
        seconds = time.perf_counter() - start
        scores = metrics.compute()  # a collective: every rank calls it, whatever its share held
        for name, value in scores.items():
            pl_module.log(f"{prefix}/{name}", value.to(pl_module.device), sync_dist=False)
        pl_module.log(f"{prefix}/time_s", torch.tensor(seconds, device=pl_module.device), sync_dist=True,
                      reduce_fx="max")
        if trainer.is_global_zero:
            self.write_table(trainer, prefix, share[:self.table_rows], predictions[:self.table_rows])

    def generate(self, pl_module: LoraLitModule, datamodule, items: list[GenerationItem]) -> list[str]:
        """The scored answer to each item: eval mode, no gradients, KV cache; the previous mode is restored."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            # eager: `speed.compile` compiled the family's regions (decoder layers, MGM's image path) for training's
            # shapes; generation's one-token steps with a growing KV cache would recompile them at every new length
            with torch.compiler.set_stance("force_eager"):
                answers = [datamodule.reply_answer(reply) for _, replies in
                           answer_items(pl_module.loaded, datamodule, items, self.gen) for reply in replies]
        finally:
            pl_module.train(was_training)
        return answers

    def write_table(self, trainer: L.Trainer, prefix: str, items: list[GenerationItem], predictions: list[str]
                    ) -> None:
        """The Text-tab table and, for image items, the images (TensorBoard loggers only)."""
        experiment = getattr(trainer.logger, "experiment", None)
        if not items or not hasattr(experiment, "add_text"):
            return
        rows = [(item.key, item.context, item.reference, pred) for item, pred in zip(items, predictions)]
        step = run_step(trainer)  # the step its val_gen/* scalars carry (mgmlora.training.callbacks.StepLabels)
        experiment.add_text(f"{prefix}/samples", markdown_table(rows), step)
        for k, item in enumerate(items):
            if item.image is not None and hasattr(experiment, "add_image"):
                experiment.add_image(f"{prefix}/image_{k}", thumbnail(item.image), step)


__all__ = ["GenerationEval", "answer_items", "markdown_table"]

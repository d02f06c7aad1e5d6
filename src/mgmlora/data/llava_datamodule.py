"""LlavaDataModule: LLaVA-style image-text JSON for any image-text family, tokenised once, images loaded per batch."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch.utils.data import Dataset

from mgmlora.batch import IMAGE_TOKEN_INDEX, Batch
from mgmlora.data.chat import TokenizedSample
from mgmlora.data.collate import pad_collate
from mgmlora.data.datamodule import TokenizedDataModule
from mgmlora.data.generation_items import GenerationItem, tail
from mgmlora.data.images import ImageLoadError, find_bad_images, image_path, load_rgb
from mgmlora.data.llava import IMAGE, fit_after_expansion, generation_prompt, read_llava_json, rounds, tokenize_record
from mgmlora.data.sampling import WindowKey
from mgmlora.models.processor import AspectRatio, Processor, stack_inputs


class _ImageSamples(Dataset):
    """Pre-tokenised samples whose images are read and turned into the family's tensors when the batch is built."""

    def __init__(self, samples: list[TokenizedSample], folder: Path, processor: Processor, aspect: AspectRatio,
                 max_pixels: int | None = Image.MAX_IMAGE_PIXELS):
        self.samples, self.folder, self.processor, self.aspect = samples, folder, processor, aspect
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | WindowKey):
        index, window = (key.index, key) if isinstance(key, WindowKey) else (key, None)
        sample = self.samples[index]
        image = sample.meta.get("image")
        if not image:
            return sample, window, self.processor.image_inputs(None, self.aspect)
        Image.MAX_IMAGE_PIXELS = self.max_pixels  # per process: spawned workers start from Pillow's default
        try:
            pixels = self.processor.image_inputs(load_rgb(self.folder / image), self.aspect)
        except Exception as err:  # whatever Pillow raises, say which record it was
            meta = sample.meta
            raise ImageLoadError(f"{meta.get('file')}: record {meta.get('record')} (id={meta.get('id')!r}): image "
                                 f"{str(self.folder / image)!r} failed to load during training ({type(err).__name__}: "
                                 f"{err}); it decoded at set-up, so the file changed since. Restore or replace it, "
                                 "then resume from the last checkpoint.") from err
        return sample, window, pixels


def _collate_images(items, pad_id: int) -> Batch:
    batch = pad_collate([s for s, _, _ in items], pad_id, window=items[0][1])
    batch.model_inputs = stack_inputs([inputs for _, _, inputs in items])  # the family's tensors, each (B, ...)
    return batch


class LlavaDataModule(TokenizedDataModule):
    """LLaVA-style image-text JSON (`id`, optional `image`, `conversations`) for an image-text family (MGM).

    The conversation template, the image transform, the image tensors, the image tokens per image and the
    post-expansion length limit are the model family's (`ModelInfo.processor`, handed over by `connect`), so they
    cannot drift from the model.

    Args:
        train_path: training records (JSON list or JSONL).
        image_folder: directory the records' `image` paths are relative to.
        val_path: validation records (null: no validation).
        test_path: records for the `test` subcommand.
        image_aspect_ratio: pad (to a square with the mean colour; MGM stage 2) or square (centre crop; stage 1).
        skip_bad_images: skip (count, and name in a warning) records whose image is missing, corrupt or too large,
            instead of failing at set-up. Set-up decodes every image in full (threads), so a bad file cannot stop
            training mid-epoch.
        max_image_pixels: Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, default its own 89.5 M
            pixels); a larger image is a bad image. Raise it (null: no limit) only for data you trust.
        tokenizer_path: a tokenizer directory used instead of the model's (null: the model's, the usual case); for
            data without a model at hand, e.g. bin/show_samples.py with a preset that bundles no tokenizer.
        max_length: length limit after image expansion; null takes the model's tokenizer_model_max_length. Samples
            are cut at the end to fit; one left without a supervised token is skipped and counted.
        batch_size: micro-batch size per device.
        eval_batch_size: micro-batch size for validation/test.
        num_workers: DataLoader worker processes (image decoding happens there).
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

    takes_images = True

    def __init__(self, train_path: str, image_folder: str, val_path: str | None = None, test_path: str | None = None,
                 image_aspect_ratio: AspectRatio = "pad", skip_bad_images: bool = False,
                 max_image_pixels: int | None = 89_478_485,
                 tokenizer_path: str | None = None, max_length: int | None = None, batch_size: int = 1,
                 eval_batch_size: int = 1, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, max_tokens: int | None = None,
                 window_samples: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.processor: Processor | None = None
        self.stats: dict[str, int] = {}
        self.records: dict[str, list[dict]] = {}  # raw records per split (generation references)

    def _model_processor(self) -> Processor:
        info = self.info
        if not info.takes_images or info.processor is None:
            raise ValueError("LlavaDataModule needs an image-text model (model.model.preset: mgm-2b / tiny-mgm, or an "
                             "MGM model_path): the template and image transform are its family's.")
        return info.processor

    def _build(self, split: str, path: str) -> None:
        hp, processor = self.hparams, self.processor
        max_length = hp.max_length or processor.max_length
        records, folder = read_llava_json(path), Path(hp.image_folder)
        for i, record in enumerate(records):  # before any image is opened: paths stay inside the image folder
            if "image" in record:
                image_path(folder, record["image"], f"{path}: record {i} (id={record.get('id')!r})")
        bad = find_bad_images(sorted({folder / r["image"] for r in records if "image" in r}))
        samples, skipped, too_long = [], [], 0
        for i, record in enumerate(records):
            where = f"record {i} (id={record.get('id')!r})"
            if "image" in record and (problem := bad.get(folder / record["image"])):
                if not hp.skip_bad_images:
                    more = sum(1 for r in records if "image" in r and folder / r["image"] in bad) - 1
                    raise ImageLoadError(
                        f"{path}: {where}: image {str(folder / record['image'])!r}: {problem}. Fix the file, the "
                        "record's 'image' or data.init_args.image_folder, or set data.init_args.skip_bad_images: true "
                        f"to skip such records{f' ({more} more record(s) have a bad image)' if more else ''}.")
                skipped.append(f"{where}: {problem}")
                continue
            sample = tokenize_record(self.tokenizer, processor, record)
            sample.meta.update(record=i, file=str(path))  # named by errors while loading its image in training
            fitted = fit_after_expansion(sample, processor.image_tokens, max_length)
            if fitted is None:
                too_long += 1
                continue
            samples.append(fitted)
        self.splits[split] = samples
        self.records[split] = records
        self.stats.update({f"{split}:samples": len(samples), f"{split}:skipped_bad_image": len(skipped),
                           f"{split}:skipped_no_supervision": too_long})
        with_images = sum(1 for s in samples if s.meta.get("image"))
        rank_zero_info(f"LLaVA {split} {path}: {len(samples)} samples ({with_images} with an image, "
                       f"{len(samples) - with_images} text-only); skipped {len(skipped)} bad image(s), {too_long} "
                       f"without a supervised token after truncation to {max_length}.")
        if skipped:
            rank_zero_warn(f"LLaVA {split} {path}: skipped {len(skipped)} record(s) whose image cannot be used "
                           f"(data.init_args.skip_bad_images): {'; '.join(skipped[:5])}"
                           f"{f'; and {len(skipped) - 5} more' if len(skipped) > 5 else ''}.")
        if too_long:
            rank_zero_warn(f"LLaVA {split} {path}: skipped {too_long} record(s) with no supervised token left after "
                           f"truncation to {max_length} positions; raise data.init_args.max_length to keep them.")

    def _build_splits(self, stage: str) -> None:
        self.processor = self.processor or self._model_processor()
        Image.MAX_IMAGE_PIXELS = self.hparams.max_image_pixels  # Pillow's decompression-bomb guard, for the check
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
        for split in wanted:
            path = self.hparams.get(f"{split}_path")
            if split not in self.splits and path is not None:
                self._build(split, path)

    def generation_items(self, split: str, max_new_tokens: int) -> list[GenerationItem]:
        """Each kept record's first question (with its image) and first answer, in the training template.

        The prompt is `llava.generation_prompt`, as `bin/generate.py` asks; later rounds of a multi-round record are
        not asked (their prompts would need the model's own earlier answers).
        """
        items, folder = [], Path(self.hparams.image_folder)
        for sample in self.splits[split]:
            record = self.records[split][sample.meta["record"]]
            turns = [t for t in record["conversations"]]
            if turns and turns[0]["from"] == "gpt":
                turns = turns[1:]  # as `render`: a leading gpt turn is dropped
            if len(turns) < 2:
                continue
            question = turns[0]["value"].replace(IMAGE, "").strip()
            image = str(folder / record["image"]) if record.get("image") else None
            items.append(GenerationItem(f"record {sample.meta['record']} (id={record.get('id')})",
                                        generation_prompt(self.tokenizer, self.processor, question, image is not None),
                                        turns[1]["value"].strip(), tail(question), image))
        return items

    def item_inputs(self, item: GenerationItem) -> dict[str, torch.Tensor]:
        """The item's image tensors as in training (the family's blank ones for a text-only item)."""
        image = None if item.image is None else load_rgb(item.image)
        return self.processor.image_inputs(image, self.hparams.image_aspect_ratio)

    def _dataset(self, samples: list[TokenizedSample]) -> Dataset:
        return _ImageSamples(samples, Path(self.hparams.image_folder), self.processor,
                             self.hparams.image_aspect_ratio, self.hparams.max_image_pixels)

    def _collate_fn(self):
        return functools.partial(_collate_images, pad_id=self.tokenizer.pad_token_id)

    def positions(self, samples: list[TokenizedSample]) -> list[int]:
        """Positions after expansion: each `<image>` placeholder becomes `image_tokens` positions in the model."""
        extra = self.processor.image_tokens - 1
        return [len(s.input_ids) + extra * s.input_ids.count(IMAGE_TOKEN_INDEX) for s in samples]

    def drop_reasons(self, split: str) -> dict[str, int]:
        """Why records are not in `split`, for the fit check; only called when that split ended up empty.

        Records without any answer are told apart from answers cut away by max_length by re-reading the file (cheap,
        and only on this error path), so `_build` stays as it is.
        """
        path = self.hparams.get(f"{split}_path")
        unsupervised = self.stats.get(f"{split}:skipped_no_supervision", 0)
        no_answer = min(unsupervised, sum(1 for r in read_llava_json(path) if not rounds(r))) if unsupervised else 0
        max_length = self.hparams.max_length or (self.processor.max_length if self.processor else None)
        return {"records with a missing or unreadable image": self.stats.get(f"{split}:skipped_bad_image", 0),
                "records without an answer (no human/gpt pair with a gpt turn)": no_answer,
                f"records whose answers do not fit max_length={max_length} after image expansion":
                    unsupervised - no_answer}

"""ChameleonsDataModule: persona-dialogue JSON -> sampled, split, prompted, tokenised samples.

Pipeline (in `setup`): read records -> optional data-item sampling (max_data_items, sample_seed) -> extraction (one
sample per kept data_item) -> train/val split -> history from the training split (history ablations only) ->
`simple` prompt for the ablation -> the tokenizer's chat template, labels on the [ANSWER] reply and its
end-of-turn token -> length fitting (oldest context turns first, then oldest history lines; never the target).
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mgmlora.batch import IGNORE_INDEX
from mgmlora.data.chameleons import (
    DialogueSample,
    SplitMode,
    attach_history,
    extract_samples,
    load_records,
    sample_data_items,
    split_samples,
)
from mgmlora.data.chat import ChatTokenizer, TokenizedSample
from mgmlora.data.datamodule import TokenizedDataModule
from mgmlora.data.generation_items import GenerationItem, tail
from mgmlora.data.prompts import AblationName, build_messages, build_system_prompt, clean_reply, get_ablation


class PersonaEncoder:
    """Turns a DialogueSample into a TokenizedSample that fits `max_length`, through the chat template.

    Length fitting keeps the newest context turns that fit (binary search: the length grows with every kept turn),
    then, if the prompt is still too long without any context, the newest history lines. A sample that cannot fit
    even without context and history is skipped and counted in `skipped`; `truncated` counts samples that lost turns.
    """

    def __init__(self, tokenizer, max_length: int, ablation: AblationName, prompt_role: Literal["system", "user"],
                 mark_omitted: bool = False):
        self.chat = ChatTokenizer(tokenizer, max_length, train_on="last_assistant")
        self.max_length = max_length
        self.ablation = get_ablation(ablation)
        self.ablation_name = ablation
        self.prompt_role = prompt_role
        self.mark_omitted = mark_omitted
        self.skipped = 0
        self.truncated = 0

    def prompt(self, sample: DialogueSample, keep_turns: int | None = None, keep_history: int | None = None) -> str:
        """The system prompt (the same text serves generation)."""
        return build_system_prompt(sample, self.ablation, keep_turns, keep_history, self.mark_omitted)

    def generation_messages(self, sample: DialogueSample) -> list[dict]:
        """Messages for generation: the training prompt without the reply (use add_generation_prompt=True)."""
        return build_messages(self.prompt(sample), None, self.prompt_role)

    def generation_prompt(self, sample: DialogueSample, max_new_tokens: int) -> list[int]:
        """Token ids of the training prompt plus the assistant header, for generation.

        Fitted like training samples (oldest context turns dropped first, then history lines) so that the prompt plus
        `max_new_tokens` fits max_length.
        """

        def encode(keep_turns: int | None, keep_history: int | None) -> TokenizedSample:
            messages = build_messages(self.prompt(sample, keep_turns, keep_history), None, self.prompt_role)
            ids = self.chat.prompt_ids(messages)
            return TokenizedSample(ids, [IGNORE_INDEX] * len(ids))

        encoded, _ = self._fit(sample, encode, self.max_length - max_new_tokens)
        return (encoded or encode(0, 0)).input_ids  # the bare prompt, even if over budget: every item is answered

    def _encode(self, sample: DialogueSample, keep_turns: int | None, keep_history: int | None) -> TokenizedSample:
        return self.chat.encode(build_messages(self.prompt(sample, keep_turns, keep_history), sample.target,
                                               self.prompt_role))

    def _fit(self, sample: DialogueSample, encode, limit: int) -> tuple[TokenizedSample | None, bool]:
        """The encoding that fits `limit`, and whether anything was dropped to fit it.

        Whole if it fits, else the most recent context turns, else the most recent history lines without context;
        (None, True) when even the bare prompt is too long.
        """
        encoded = encode(None, None)
        if len(encoded.input_ids) <= limit:
            return encoded, False
        turns = len(sample.context) if self.ablation.use_context else 0
        encoded = self._largest_fitting(turns, lambda k: encode(k, None), limit)
        if encoded is None:
            hist = len(sample.history) if self.ablation.use_history else 0
            encoded = self._largest_fitting(hist, lambda k: encode(0, k), limit)
        return encoded, True

    @staticmethod
    def _largest_fitting(n: int, encode, limit: int) -> TokenizedSample | None:
        """The encoding keeping the most items (0..n) that fits `limit` (binary search: length grows with items)."""
        lo, hi, best = 0, n, None  # invariant: keeping `lo` fits once `best` is set
        while lo <= hi:
            mid = (lo + hi) // 2
            encoded = encode(mid)
            if len(encoded.input_ids) <= limit:
                lo, best = mid + 1, encoded
            else:
                hi = mid - 1
        return best

    def __call__(self, sample: DialogueSample) -> TokenizedSample | None:
        """The tokenised sample, or None when even the target with the bare prompt exceeds max_length."""
        encoded, dropped = self._fit(sample, lambda t, h: self._encode(sample, t, h), self.max_length)
        if encoded is None:
            self.skipped += 1
            return None
        self.truncated += dropped
        encoded.meta = {"user_hash": sample.user_hash, "index": list(sample.index)}
        return encoded


class ChameleonsDataModule(TokenizedDataModule):
    """Chameleons persona dialogues: predict a movie character's next line (see mgmlora.data.chameleons).

    Args:
        train_path: Chameleons JSON (train.json or a sampled file); split into train/val here.
        test_path: a Chameleons JSON with targets, for the `test` subcommand (null: none).
        ablation: which prompt sections to use (profile / history / context combinations; context_only is the
            original recipe).
        prompt_role: put the prompt in a `system` message (the original) or a `user` message (for chat templates
            without a system role).
        max_data_items: keep at most this many data_items per record, sampled with sample_seed (null: all).
        sample_seed: seed of the data-item sampling.
        split: per_user (the original's floor(0.9 n) per character, same characters in both splits) or
            held_out_users (a true ratio of characters held out).
        val_ratio: validation share (per user, or of users).
        split_seed: seed of the split.
        max_history: history lines per prompt (history ablations).
        mark_omitted: state how many older context turns were cut to fit max_length.
        tokenizer_path: a tokenizer directory used instead of the model's (null: the model's, the usual case); for
            data without a model at hand, e.g. bin/show_samples.py with a preset that bundles no tokenizer.
        max_length: longest sample in tokens; context turns are dropped (oldest first) to fit, never the target.
        batch_size: micro-batch size per device.
        eval_batch_size: micro-batch size for validation/test.
        num_workers: DataLoader worker processes.
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

    def __init__(self, train_path: str, test_path: str | None = None, ablation: AblationName = "context_only",
                 prompt_role: Literal["system", "user"] = "system",
                 max_data_items: int | None = None, sample_seed: int = 42, split: SplitMode = "per_user",
                 val_ratio: float = 0.1, split_seed: int = 42, max_history: int = 15, mark_omitted: bool = False,
                 tokenizer_path: str | None = None, max_length: int = 1024, batch_size: int = 1,
                 eval_batch_size: int = 1, num_workers: int = 0, shuffle: bool = True, seed: int = 42,
                 drop_last: bool = False, max_tokens: int | None = None,
                 window_samples: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        get_ablation(ablation)
        if max_data_items is not None and max_data_items < 1:
            raise ValueError(f"data.max_data_items must be >= 1 or null (got {max_data_items}).")
        if not 0.0 <= val_ratio < 1.0:
            raise ValueError(f"data.val_ratio must be in [0, 1) (got {val_ratio}).")
        self.dialogues: dict[str, list[DialogueSample]] = {}
        self.stats: dict[str, int] = {}

    def read_dialogues(self, path: str) -> list[DialogueSample]:
        """Records of `path`, sampled when max_data_items is set, then extracted (keep/drop rule)."""
        records = load_records(path)
        if self.hparams.max_data_items:
            records = sample_data_items(records, self.hparams.max_data_items, self.hparams.sample_seed, path)
        samples, dropped = extract_samples(records, path)
        self.stats.update({f"{path}:records": len(records), f"{path}:dropped": dropped})
        return samples

    def _encode_split(self, split: str, samples: list[DialogueSample]) -> None:
        hp = self.hparams
        encoder = PersonaEncoder(self.tokenizer, hp.max_length, hp.ablation, hp.prompt_role, hp.mark_omitted)
        self.splits[split] = [t for t in map(encoder, samples) if t is not None]
        self.stats.update({f"{split}:samples": len(self.splits[split]), f"{split}:skipped_too_long": encoder.skipped,
                           f"{split}:truncated": encoder.truncated})
        if encoder.skipped:
            rank_zero_warn(f"Chameleons {split}: skipped {encoder.skipped} sample(s) whose target and bare prompt "
                           f"exceed max_length={hp.max_length}; {encoder.truncated} lost older context turns.")
        elif encoder.truncated:
            rank_zero_info(f"Chameleons {split}: {encoder.truncated} sample(s) lost older context turns to fit "
                           f"max_length={hp.max_length}.")

    def _train_val(self) -> None:
        hp = self.hparams
        if "train" in self.dialogues:
            return
        samples = self.read_dialogues(hp.train_path)
        train, val = split_samples(samples, hp.split, hp.val_ratio, hp.split_seed)
        if get_ablation(hp.ablation).use_history:
            attach_history(train + val, train, max_items=hp.max_history)  # from the training split only
        self.dialogues.update(train=train, val=val)
        users = {s: len({d.user_hash for d in self.dialogues[s]}) for s in ("train", "val")}
        rank_zero_info(f"Chameleons {hp.train_path}: {len(samples)} samples ({self.stats[f'{hp.train_path}:dropped']} "
                       f"data_items dropped by the keep/drop rule) -> train {len(train)} ({users['train']} users), "
                       f"val {len(val)} ({users['val']} users, {100 * len(val) / max(len(samples), 1):.1f}% of "
                       f"samples; split={hp.split}, val_ratio={hp.val_ratio})")

    def _build_splits(self, stage: str) -> None:
        hp = self.hparams
        if stage in ("fit", "validate"):
            self._train_val()
            for split in ("train", "val") if stage == "fit" else ("val",):
                if split not in self.splits:
                    self._encode_split(split, self.dialogues[split])
        if stage == "test" and "test" not in self.splits and hp.test_path:
            self.dialogues["test"] = self.read_dialogues(hp.test_path)
            if get_ablation(hp.ablation).use_history:
                self._train_val()
                attach_history(self.dialogues["test"], self.dialogues["train"], max_items=hp.max_history)
            self._encode_split("test", self.dialogues["test"])

    def drop_reasons(self, split: str) -> dict[str, int]:
        """Why data_items are not in `split`: keep/drop rule, length, the validation split (for the fit check)."""
        hp = self.hparams
        return {"data_items dropped by the keep/drop rule (empty continuation, or a context ending with the "
                "character's own line)": self.stats.get(f"{hp.train_path}:dropped", 0),
                f"samples whose target and bare prompt exceed max_length={hp.max_length}":
                    self.stats.get(f"{split}:skipped_too_long", 0),
                f"samples held out for validation (val_ratio={hp.val_ratio})": len(self.dialogues.get("val", []))}

    def training_dialogues(self) -> list[DialogueSample]:
        """The training split's dialogues (read and split on first use): the history a leaderboard prompt draws on."""
        self._train_val()
        return self.dialogues["train"]

    def generation_items(self, split: str, max_new_tokens: int) -> list[GenerationItem]:
        """Every dialogue of `split` with its training prompt (`PersonaEncoder.generation_prompt`) and its target."""
        hp = self.hparams
        encoder = PersonaEncoder(self.tokenizer, hp.max_length, hp.ablation, hp.prompt_role, hp.mark_omitted)
        items = []
        for d in self.dialogues[split]:
            if d.target is None:
                continue
            name = d.profile.get("name") or "character"
            context = "\n".join(f"{name if t.role == 'assistant' else 'other'}: {t.content}" for t in d.context[-3:])
            items.append(GenerationItem("-".join(map(str, d.index)), encoder.generation_prompt(d, max_new_tokens),
                                        d.target, tail(context)))
        return items

    def reply_answer(self, reply: str) -> str:
        """The [ANSWER]...[/ANSWER] span of a reply, as the leaderboard writes it (`clean_reply`)."""
        return clean_reply(reply)

    def user_counts(self, split: str) -> Counter:
        """Samples per user_hash in a split (for reports and tests)."""
        return Counter(d.user_hash for d in self.dialogues[split])

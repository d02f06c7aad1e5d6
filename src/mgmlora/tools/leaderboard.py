"""Chameleons test-leaderboard predictions: every data_item of `test_leaderboard.json` gets generated continuations.

The output is a copy of the input in which each data_item has a `continuations` list (n strings, the
`[ANSWER]...[/ANSWER]` span of each reply, cleaned of template tokens); nothing is dropped or reordered, and items
the training extraction would skip (empty context, a context ending with the character's own line) are answered too.
Prompts are the training prompts (same ablation, role, history from the training split, same length fitting).

Resumable (mgmlora.tools.progress_file): each finished item is appended to `<output>.partial.jsonl` as soon as its
batch is generated, and a rerun skips the items found there; the final JSON is written atomically at the end, with a
summary JSON beside it, and the progress file is then deleted (a finished run leaves no `*.partial*` file). The
progress file belongs to one checkpoint and one set of settings, recorded on its first line: a rerun with another
checkpoint, input, `n`, sampling setting or prompt setting is refused (ProgressMismatchError, naming what differs)
instead of merging continuations made two ways; write to a new output path, or delete the progress file to start
over.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from mgmlora.data.chameleons import DialogueSample, attach_history, iter_items, load_records, map_turns
from mgmlora.data.chameleons_datamodule import PersonaEncoder
from mgmlora.data.prompts import clean_reply
from mgmlora.models.generation import GenerationArgs, generate_batch, seeded_batches
from mgmlora.tools.args import refuse_overwrite
from mgmlora.tools.progress_file import (
    ProgressMismatchError,
    adapter_digest,
    appending,
    discard,
    read_entries,
    write_atomically,
)


def output_files(output_path: str | Path) -> dict[str, Path]:
    """Every file a leaderboard run writes for `output_path`, by role (checked against the inputs before work)."""
    output_path = Path(output_path)
    return {"--output": output_path, "progress file": output_path.with_name(output_path.name + ".partial.jsonl"),
            "summary file": output_path.with_name(output_path.stem + ".summary.json"),
            "temporary file": output_path.with_name(f".{output_path.name}.tmp")}


def leaderboard_samples(records: list[dict], path: str | Path) -> list[DialogueSample]:
    """One sample per data_item, in file order, with no keep/drop rule and no target."""
    samples = []
    for r, c, i, record, item in iter_items(records, path, require_continuation=False):
        context = map_turns(item["context"], record["user"]["profile"]["name"])
        samples.append(DialogueSample(record["user_hash"], dict(record["user"]["profile"]),
                                      record["task"]["description"], context, None, index=(r, c, i)))
    return samples


def run_settings(input_path: str | Path, n: int, gen: GenerationArgs, ablation: str, prompt_role: str,
                 max_length: int, mark_omitted: bool, history: bool, max_history: int,
                 checkpoint: str | Path | None = None) -> dict:
    """Everything that shapes the continuations, as recorded in (and compared with) the progress file.

    The model is recorded by its adapter's content, not its path (mgmlora.tools.progress_file.adapter_digest).
    """
    return {"adapter_sha256": adapter_digest(checkpoint) if checkpoint is not None else None,
            "input": str(Path(input_path).resolve()), "n": n,
            "generation": asdict(replace(gen, num_return_sequences=n)), "ablation": ablation,
            "prompt_role": prompt_role, "max_length": max_length, "mark_omitted": mark_omitted, "history": history,
            "max_history": max_history}


def read_progress(output_path: str | Path, settings: dict) -> dict[tuple[int, int, int], list[str]]:
    """Continuations already generated for `output_path` with exactly `settings` (mgmlora.tools.progress_file).

    Cheap: `bin/generate.py` calls it before loading the model, so a mismatch is refused at once.

    Raises:
        ProgressMismatchError: when the file was written with other settings, or records none (an older format).
    """
    entries = read_entries(output_files(output_path)["progress file"], settings)
    return {tuple(e["index"]): e["continuations"] for e in entries}


def predict_leaderboard(model, tokenizer, encoder: PersonaEncoder, input_path: str | Path, output_path: str | Path,
                        gen: GenerationArgs, n: int = 5, history_from: list[DialogueSample] | None = None,
                        max_history: int = 15, checkpoint: str | Path | None = None) -> dict:
    """Writes `output_path` (the input with `continuations` on every data_item) and returns the summary.

    Args:
        model: the trained model (PEFT or merged), in eval mode, on its device.
        tokenizer: its tokenizer.
        encoder: the PersonaEncoder with the run's ablation, prompt role and max_length.
        input_path: test_leaderboard.json (train.json's schema, continuations absent).
        output_path: where the completed copy goes.
        gen: sampling settings; `num_return_sequences` is replaced by `n`.
        n: continuations per data_item.
        history_from: training dialogues to build each character's history from (ablations that use history).
        max_history: history lines per sample.
        checkpoint: the model's checkpoint or adapter path, recorded in the progress file so that a rerun with
            another model is refused.

    Raises:
        ValueError: when `n` < 1.
        OutputPathError: when an output file would overwrite `input_path`.
        ProgressMismatchError: when the progress file was made with other settings (see the module docstring).
    """
    if n < 1:
        raise ValueError(f"n (continuations per data_item) must be >= 1, got {n}.")
    start = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    outputs = output_files(output_path)
    refuse_overwrite(outputs, files={"input": input_path})
    gen = replace(gen, num_return_sequences=n)
    settings = run_settings(input_path, n, gen, encoder.ablation_name, encoder.prompt_role, encoder.max_length,
                            encoder.mark_omitted, history_from is not None, max_history, checkpoint)
    progress = outputs["progress file"]
    done = read_progress(output_path, settings)  # before any work: a mismatch costs nothing
    records = load_records(input_path)
    samples = leaderboard_samples(records, input_path)
    if encoder.ablation.use_history and history_from is not None:
        attach_history(samples, history_from, max_items=max_history)
    resumed = sum(1 for s in samples if tuple(s.index) in done)
    todo = [s for s in samples if tuple(s.index) not in done]
    with appending(progress, settings) as write:
        # batched and seeded over *all* samples, as an unbroken run is: a resumed run skips the batches it finished and
        # redoes a batch it finished only in part whole, so every batch keeps its composition and seed and the output
        # equals the unbroken run's
        for batch, batch_gen in seeded_batches(samples, gen):
            if all(tuple(s.index) in done for s in batch):
                continue
            rows = [encoder.generation_prompt(s, gen.max_new_tokens) for s in batch]
            replies = generate_batch(model, tokenizer, rows, batch_gen)
            for sample, texts in zip(batch, replies):
                done[tuple(sample.index)] = [clean_reply(t) for t in texts]
            write([{"index": list(s.index), "continuations": done[tuple(s.index)]} for s in batch])
    completed = copy.deepcopy(records)
    for r, c, i, _, item in iter_items(completed, input_path, require_continuation=False):
        item["continuations"] = done[(r, c, i)]
    write_atomically(output_path, json.dumps(completed, ensure_ascii=False, indent=1))
    summary = {"input": str(input_path), "output": str(output_path), "records": len(records),
               "data_items": len(samples), "generated_now": len(todo), "resumed_from_progress": resumed,
               "empty_context_items": sum(1 for s in samples if not s.context),
               "empty_continuations": sum(1 for v in done.values() for t in v if not t),
               "continuations_per_item": n, "seconds": round(time.perf_counter() - start, 2),
               "generation": asdict(gen), "ablation": encoder.ablation_name, "prompt_role": encoder.prompt_role,
               "max_length": encoder.max_length}
    write_atomically(outputs["summary file"], json.dumps(summary, indent=2))
    discard(progress)  # finished: the outputs hold everything it did
    return summary


__all__ = ["ProgressMismatchError", "clean_reply", "leaderboard_samples", "output_files", "predict_leaderboard",
           "read_progress", "run_settings"]

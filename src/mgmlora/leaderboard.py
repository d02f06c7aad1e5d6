"""Chameleons test-leaderboard predictions: every data_item of `test_leaderboard.json` gets generated continuations.

The output is a copy of the input in which each data_item has a `continuations` list (n strings, the
`[ANSWER]...[/ANSWER]` span of each reply, cleaned of template tokens); nothing is dropped or reordered, and items
the training extraction would skip (empty context, a context ending with the character's own line) are answered too.
Prompts are the training prompts (same ablation, role, history from the training split, same length fitting).

Resumable: each finished item is appended to `<output>.partial.jsonl` as soon as its batch is generated, and a rerun
skips the items found there; the final JSON is written atomically at the end, with a summary JSON beside it.
The progress file belongs to one checkpoint and one set of settings: for another checkpoint or another `n`, write to
a new output path (a rerun into the same path keeps the continuations already there).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from mgmlora.data.chameleons import DialogueSample, attach_history, iter_items, load_records, map_turns
from mgmlora.data.persona import PersonaEncoder
from mgmlora.data.prompts import parse_answer
from mgmlora.generate import END_OF_TURN, GenerationArgs, generate_batch


def leaderboard_samples(records: list[dict], path: str | Path) -> list[DialogueSample]:
    """One sample per data_item, in file order, with no keep/drop rule and no target."""
    samples = []
    for r, c, i, record, item in iter_items(records, path, require_continuation=False):
        context = map_turns(item["context"], record["user"]["profile"]["name"])
        samples.append(DialogueSample(record["user_hash"], dict(record["user"]["profile"]),
                                      record["task"]["description"], context, None, index=(r, c, i)))
    return samples


def clean_reply(text: str) -> str:
    """The answer span of a reply, without template tokens or tags."""
    answer = parse_answer(text)
    for token in END_OF_TURN + ("[ANSWER]", "[/ANSWER]"):
        answer = answer.replace(token, "")
    return answer.strip()


def _read_progress(path: Path) -> dict[tuple[int, int, int], list[str]]:
    done = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interruption: that item is generated again
                continue
            done[tuple(entry["index"])] = entry["continuations"]
    return done


def predict_leaderboard(model, tokenizer, encoder: PersonaEncoder, input_path: str | Path, output_path: str | Path,
                        gen: GenerationArgs, n: int = 5, history_from: list[DialogueSample] | None = None,
                        max_history: int = 15) -> dict:
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
    """
    start = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    records = load_records(input_path)
    samples = leaderboard_samples(records, input_path)
    if encoder.ablation.use_history and history_from is not None:
        attach_history(samples, history_from, max_items=max_history)
    progress = output_path.with_name(output_path.name + ".partial.jsonl")
    done = _read_progress(progress)
    resumed = sum(1 for s in samples if tuple(s.index) in done)
    todo = [s for s in samples if tuple(s.index) not in done]
    gen = replace(gen, num_return_sequences=n)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    cut = progress.is_file() and progress.stat().st_size and not progress.read_bytes().endswith(b"\n")
    with progress.open("a", encoding="utf-8") as log:
        if cut:
            log.write("\n")  # close a line cut by an interruption, so the next entry starts on its own line
        for b in range(0, len(todo), gen.batch_size):
            batch = todo[b:b + gen.batch_size]
            rows = [encoder.generation_prompt(s, gen.max_new_tokens) for s in batch]
            replies = generate_batch(model, tokenizer, rows, replace(gen, seed=gen.seed + b))
            for sample, texts in zip(batch, replies):
                done[tuple(sample.index)] = [clean_reply(t) for t in texts]
                log.write(json.dumps({"index": list(sample.index), "continuations": done[tuple(sample.index)]},
                                     ensure_ascii=False) + "\n")
            log.flush()
            os.fsync(log.fileno())
    completed = copy.deepcopy(records)
    for r, c, i, _, item in iter_items(completed, input_path, require_continuation=False):
        item["continuations"] = done[(r, c, i)]
    tmp = output_path.with_name(f".{output_path.name}.tmp")
    tmp.write_text(json.dumps(completed, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, output_path)
    summary = {"input": str(input_path), "output": str(output_path), "records": len(records),
               "data_items": len(samples), "generated_now": len(todo), "resumed_from_progress": resumed,
               "empty_context_items": sum(1 for s in samples if not s.context),
               "empty_continuations": sum(1 for v in done.values() for t in v if not t),
               "continuations_per_item": n, "seconds": round(time.perf_counter() - start, 2),
               "generation": asdict(gen), "ablation": encoder.ablation_name, "prompt_role": encoder.prompt_role,
               "max_length": encoder.max_length}
    output_path.with_name(output_path.stem + ".summary.json").write_text(json.dumps(summary, indent=2))
    return summary

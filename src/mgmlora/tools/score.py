"""Scoring a finished checkpoint or exported adapter on a data file: per-item predictions and a summary of the scores.

The data file is read by the run's own DataModule (its `data` section, mgmlora.tools.run_settings; the file as its
test split), so
prompts, references and metrics are exactly those of validation's GenerationEval (mgmlora.training.generation_eval):
the same prompt builders, the same seeded subset for the same `num_samples` and `seed`, the same torchmetrics scores.

Writes `<output>` (JSONL: key, prediction, reference, raw reply; one line per item, in file order) and
`<output stem>.summary.json` (the scores, counts and settings), both atomically at the end. Resumable like the
leaderboard (mgmlora.tools.progress_file): finished items go to `<output>.partial.jsonl` as each batch ends, and a rerun
with the same settings generates only the rest; other settings are refused. A finished run deletes that file.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from mgmlora.data.datamodule import TokenizedDataModule, datamodule_from_section
from mgmlora.data.generation_items import GenerationItem
from mgmlora.models import LoadedModel
from mgmlora.models.generation import GenerationArgs
from mgmlora.tools.leaderboard import output_files
from mgmlora.tools.progress_file import adapter_digest, appending, discard, read_entries, write_atomically
from mgmlora.training.generation_eval import answer_items
from mgmlora.training.text_metrics import GenerationMetrics, MetricKind


def build_datamodule(section: dict, data_path: str | Path, overrides: dict | None = None) -> TokenizedDataModule:
    """The configured DataModule with `data_path` as its test split; `overrides` replace init_args (image folder)."""
    return datamodule_from_section(section, {**(overrides or {}), "test_path": str(data_path)})


def score_settings(checkpoint: str | Path, data_path: str | Path, section: dict, num_samples: int | None, seed: int,
                   gen: GenerationArgs, kind: MetricKind) -> dict:
    """Everything that shapes the predictions, recorded in (and compared with) the progress file.

    The model is recorded by its adapter's content, not its path (mgmlora.tools.progress_file.adapter_digest).
    """
    return {"adapter_sha256": adapter_digest(checkpoint), "data": str(Path(data_path).resolve()),
            "data_class": section["class_path"], "data_settings": json.loads(json.dumps(section.get("init_args")
                                                                                         or {}, default=str)),
            "num_samples": num_samples, "seed": seed, "generation": asdict(gen), "metrics": kind}


def score_items(loaded: LoadedModel, datamodule: TokenizedDataModule, items: list[GenerationItem],
                output_path: str | Path, settings: dict, gen: GenerationArgs, kind: MetricKind) -> dict:
    """Generates for the items not yet in the progress file, scores all of them, writes predictions and the summary.

    Args:
        loaded: the trained model (tools.export.build_trained_model), in eval mode, on its device.
        datamodule: the DataModule the items came from (tokenizer, images, how a reply becomes the answer).
        items: the items to score, in order.
        output_path: the predictions JSONL; the progress and summary files sit beside it (`output_files`).
        settings: `score_settings(...)`, compared with the progress file's.
        gen: generation settings.
        kind: the metric set.
    """
    start = time.perf_counter()
    files = output_files(output_path)
    done = {e["key"]: e for e in read_entries(files["progress file"], settings)}
    todo = [item for item in items if item.key not in done]
    with appending(files["progress file"], settings) as write:
        for batch, replies in answer_items(loaded, datamodule, todo, gen):  # validation's path
            entries = [{"key": item.key, "prediction": datamodule.reply_answer(reply), "reference": item.reference,
                        "reply": reply} for item, reply in zip(batch, replies)]
            done.update((e["key"], e) for e in entries)
            write(entries)
    rows = [done[item.key] for item in items]
    metrics = GenerationMetrics(kind)
    metrics.update([r["prediction"] for r in rows], [r["reference"] for r in rows])
    scores = {k: round(v.item(), 6) for k, v in metrics.compute().items()} if rows else {}
    write_atomically(files["--output"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary = {"output": str(output_path), "items": len(rows), "generated_now": len(todo),
               "resumed_from_progress": len(rows) - len(todo), "scores": scores,
               "seconds": round(time.perf_counter() - start, 2), "settings": settings}
    write_atomically(files["summary file"], json.dumps(summary, indent=2, ensure_ascii=False))
    discard(files["progress file"])  # finished: the outputs hold everything it did
    return summary


__all__ = ["build_datamodule", "score_items", "score_settings"]

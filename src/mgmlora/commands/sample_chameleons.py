"""`mgmlora sample-chameleons`: data-item-level sampling of a Chameleons JSON file.

    mgmlora sample-chameleons INPUT OUTPUT --max_data_items 3 --seed 42

Keeps at most `max_data_items` data_items per record, chosen with Python's `random` seeded once (the same seed and
file give the same output on any machine); writes the same schema (one collection per record), UTF-8, indent 2.
The output is written to a temporary file and renamed, so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jsonargparse.typing import PositiveInt

from mgmlora.commands.parsing import parse_settings
from mgmlora.data.chameleons import load_records, sample_data_items
from mgmlora.errors import UsageError
from mgmlora.tools.args import refuse_overwrite
from mgmlora.tools.progress_file import write_atomically


@dataclass
class SampleSettings:
    """What `mgmlora sample-chameleons` reads and writes."""

    input: Path
    """Chameleons JSON file to sample"""
    output: Path
    """where the sampled file goes (never the input)"""
    max_data_items: PositiveInt = 10
    """data_items kept per record, at most"""
    seed: int = 42
    """seed of Python's random, set once"""
    overwrite: bool = False
    """replace an existing OUTPUT"""


def sample(settings: SampleSettings) -> dict:
    """Samples INPUT into OUTPUT; returns the counts it prints."""
    refuse_overwrite({"OUTPUT": settings.output}, files={"INPUT": settings.input})
    if settings.output.is_dir():
        raise UsageError(f"OUTPUT {str(settings.output)!r} is a directory; name the JSON file to write.")
    if settings.output.exists() and not settings.overwrite:
        raise UsageError(f"OUTPUT {str(settings.output)!r} exists: pass --overwrite to replace it, or choose another.")
    records = load_records(settings.input)
    sampled = sample_data_items(records, settings.max_data_items, settings.seed, settings.input)
    settings.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(settings.output, json.dumps(sampled, indent=2, ensure_ascii=False))
    count = lambda recs: sum(len(c["data"]) for r in recs for c in r["task"]["task_behavior_collections"])  # noqa: E731
    summary = {"records": len(records), "data_items_in": count(records), "data_items_out": count(sampled),
               "max_data_items": settings.max_data_items, "seed": settings.seed}
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    """`mgmlora sample-chameleons INPUT OUTPUT ...`: parses the command line and samples."""
    return sample(parse_settings(SampleSettings, argv, __doc__.split("\n")[0], positional=("input", "output"),
                                 prog="mgmlora sample-chameleons"))


__all__ = ["SampleSettings", "main", "sample"]

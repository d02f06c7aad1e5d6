"""`mgmlora compare`: finished runs side by side, a Markdown table and PNG plots from their logs.

    mgmlora compare lightning_logs/mgm2b_lora/version_0 lightning_logs/mgm2b_lora_r8/version_0 ... --output DIR
        [--names r16 r8 ...]

Columns: preset, rank, targets, trainable parameters and %, peak GiB, tokens/s, wall time, final train loss, best
validation loss and perplexity. Plots: train loss vs step and vs tokens, validation loss, peak memory. See
mgmlora.tools.report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mgmlora.commands.parsing import parse_settings
from mgmlora.errors import UsageError
from mgmlora.tools.report import compare as write_comparison


@dataclass
class CompareSettings:
    """What `mgmlora compare` reads and writes."""

    runs: list[str]
    """Lightning log directories (<save_dir>/<name>/version_N)"""
    output: Path
    """directory for the table and the plots"""
    names: list[str] | None = None
    """a short name per run, in the same order"""
    overwrite: bool = False
    """write into an --output directory that already holds files"""


def compare(settings: CompareSettings) -> Path:
    """Writes the comparison; returns the Markdown file."""
    if settings.names and len(settings.names) != len(settings.runs):
        raise UsageError(f"--names has {len(settings.names)} entries for {len(settings.runs)} runs")
    if settings.output.is_dir() and any(settings.output.iterdir()) and not settings.overwrite:
        raise UsageError(f"--output {str(settings.output)!r} already holds files: pass --overwrite to replace the "
                         "comparison in it, or choose an empty or new directory.")
    md = write_comparison(settings.runs, settings.output, settings.names)
    print(md.read_text())
    print(f"report: {md} (plots beside it)")
    return md


def main(argv: list[str] | None = None) -> Path:
    """`mgmlora compare ...`: parses the command line and compares."""
    return compare(parse_settings(CompareSettings, argv, __doc__.split("\n")[0], positional=("runs",),
                                  prog="mgmlora compare"))


__all__ = ["CompareSettings", "compare", "main"]

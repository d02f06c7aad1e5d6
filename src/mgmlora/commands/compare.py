"""`mgmlora compare`: finished runs side by side, a Markdown table and PNG plots from their logs.

    mgmlora compare lightning_logs/mgm2b_lora/version_0 lightning_logs/mgm2b_lora_r8/version_0 ... --output DIR
        [--names r16 r8 ...]

Columns: preset, rank, targets, trainable parameters and %, peak GiB, tokens/s, wall time, final train loss (the
mean of the last 10 logged), best validation loss and perplexity. Plots: train loss vs step and vs tokens, validation
loss, peak memory. See mgmlora.tools.report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mgmlora.commands.parsing import parse_settings
from mgmlora.errors import UsageError
from mgmlora.tools.args import OutputPathError
from mgmlora.tools.output_dir import check_output_dir, writing_dir
from mgmlora.tools.report import REPORT_FILES
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
    """replace an earlier comparison in --output (a directory of compare's own files only; swapped in whole)"""


def compare(settings: CompareSettings) -> Path:
    """Writes the comparison; returns the Markdown file."""
    if settings.names and len(settings.names) != len(settings.runs):
        raise UsageError(f"--names has {len(settings.names)} entries for {len(settings.runs)} runs")
    check_output_dir(settings.output, settings.overwrite)  # a file, or files without --overwrite: refused
    out = settings.output.resolve()  # `.` and `..` have a name to stage beside
    for run_dir in settings.runs:  # replaced whole, an --output that is or holds a run (`--output .`) would delete it
        if out == Path(run_dir).resolve() or out in Path(run_dir).resolve().parents:
            raise OutputPathError(f"--output {str(settings.output)!r} is or holds the run {str(run_dir)!r}: replacing "
                                  "it would delete the run. Choose an --output outside the runs.")
    if settings.overwrite and out.is_dir():  # replaced whole: only an earlier comparison may go
        foreign = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES)
        if foreign:
            raise UsageError(f"--output {str(settings.output)!r} holds files compare did not write "
                             f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); --overwrite replaces "
                             "only an earlier comparison. Choose another --output.")
    for run_dir in settings.runs:  # before anything is created
        if not Path(run_dir).is_dir():
            raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist or is not a directory; pass "
                                    "Lightning log directories such as lightning_logs/<name>/version_0.")
    # written beside --output and swapped in whole: no plot of an earlier comparison survives next to the new table
    with writing_dir(out) as tmp:
        write_comparison(settings.runs, tmp, settings.names)
    md = out / "comparison.md"
    print(md.read_text())
    print(f"report: {md} (plots beside it)")
    return md


def main(argv: list[str] | None = None) -> Path:
    """`mgmlora compare ...`: parses the command line and compares."""
    return compare(parse_settings(CompareSettings, argv, __doc__.split("\n")[0], positional=("runs",),
                                  prog="mgmlora compare"))


__all__ = ["CompareSettings", "compare", "main"]

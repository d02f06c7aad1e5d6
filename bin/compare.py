#!/usr/bin/env python
"""Compare finished runs: a Markdown table and PNG plots from their logs.

    python bin/compare.py lightning_logs/mgm2b_lora/version_0 lightning_logs/mgm2b_lora_r8/version_0 ... --output DIR
        [--names r16 r8 ...]

Columns: preset, rank, targets, trainable parameters and %, peak GiB, tokens/s, wall time, final train loss, best
validation loss and perplexity. Plots: train loss vs step and vs tokens, validation loss, peak memory. See
mgmlora.tools.report.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing

from mgmlora.errors import run  # noqa: E402
from mgmlora.tools.report import compare  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    """Parses arguments and writes the comparison; returns the Markdown file."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="Lightning log directories (<save_dir>/<name>/version_N)")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--names", nargs="+", default=None)
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        parser.error(f"--names has {len(args.names)} entries for {len(args.runs)} runs")
    md = compare(args.runs, args.output, args.names)
    print(md.read_text())
    print(f"report: {md} (plots beside it)")
    return md


if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)

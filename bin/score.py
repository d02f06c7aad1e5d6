#!/usr/bin/env python
"""Score a checkpoint on a data file: `mgmlora score` (mgmlora.commands.score).

A thin wrapper for a checkout with the package installed (`pip install -e .`); the flags: `--help`.
"""

from mgmlora.commands.score import main
from mgmlora.errors import run

if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)

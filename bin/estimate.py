#!/usr/bin/env python
"""Estimate the peak GPU memory of a config: `mgmlora estimate` (mgmlora.commands.estimate).

A thin wrapper for a checkout with the package installed (`pip install -e .`); the flags: `--help`.
"""

from mgmlora.commands.estimate import main
from mgmlora.errors import run

if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)

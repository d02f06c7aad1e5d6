#!/usr/bin/env python
"""Export a run's adapter, or merge it into its base model: `mgmlora export` (mgmlora.commands.export).

A thin wrapper for a checkout with the package installed (`pip install -e .`); the flags: `--help`.
"""

from mgmlora.commands.export import main
from mgmlora.errors import run

if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)

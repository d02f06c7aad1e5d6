#!/usr/bin/env python
"""Compare finished runs, a Markdown table and PNG plots: `mgmlora compare` (mgmlora.commands.compare).

A thin wrapper for a checkout with the package installed (`pip install -e .`); the flags: `--help`.
"""

from mgmlora.commands.compare import main
from mgmlora.errors import run

if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)

#!/usr/bin/env python
"""Data-item-level sampling of a Chameleons JSON file: `mgmlora sample-chameleons` (mgmlora.commands.sample_chameleons).

A thin wrapper for a checkout with the package installed (`pip install -e .`); the flags: `--help`.
"""

from mgmlora.commands.sample_chameleons import main
from mgmlora.errors import run

if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)

#!/usr/bin/env python
"""Print the samples a config trains on: `mgmlora show-samples` (mgmlora.commands.show_samples).

A thin wrapper for a checkout with the package installed (`pip install -e .`); the flags: `--help`.
"""

from mgmlora.commands.show_samples import main
from mgmlora.errors import run

if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)

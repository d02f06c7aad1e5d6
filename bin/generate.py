#!/usr/bin/env python
"""Generate with a trained adapter, using the training prompts: `mgmlora generate` (mgmlora.commands.generate).

A thin wrapper for a checkout with the package installed (`pip install -e .`); the flags: `--help`.
"""

from mgmlora.commands.generate import main
from mgmlora.errors import run

if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)

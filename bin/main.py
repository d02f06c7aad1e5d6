#!/usr/bin/env python
"""`mgmlora fit|validate|test` for a checkout: `python bin/main.py fit --config configs/<x>.yaml` (mgmlora.cli).

A thin wrapper for a checkout with the package installed (`pip install -e .`); the tools are `mgmlora <tool>` or
`python bin/<tool>.py`.
"""

from mgmlora.cli import main
from mgmlora.errors import run

if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)

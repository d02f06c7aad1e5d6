#!/usr/bin/env python
"""mgmlora command line: `python bin/main.py {fit,validate,test} --config configs/<x>.yaml`.

Generation and the Chameleons leaderboard: `bin/generate.py`; export and merge: `bin/export.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing

from mgmlora.cli import main  # noqa: E402
from mgmlora.errors import run  # noqa: E402

if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)

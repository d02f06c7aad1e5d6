"""Offline mode for Hugging Face's hub, transformers and PEFT, switched on by an explicit call.

mgmlora never downloads at run time: every loader passes `local_files_only=True`, and `enforce()` also puts the hub
client itself offline, so that no code path (a library default, a saved run naming a hub id) can reach the network.
Every entry point calls it first (`mgmlora.__main__`, `mgmlora.cli.main`, the commands), and every library function
that reads a model, config or tokenizer calls it too (mgmlora.models), so a notebook that only imports the library is
offline as well. Nothing happens at import.

`huggingface_hub` reads the environment variables once, at its own import, into `huggingface_hub.constants`; its
request functions (and transformers', which call them) consult `constants.HF_HUB_OFFLINE` at each call. So the
variables are set for anything imported later and for child processes, and the module constant is set too when the
hub client was imported earlier. `tests/test_offline.py` checks that a request after `enforce()` is refused.
"""

from __future__ import annotations

import os
import sys

VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def enforce() -> None:
    """Puts the hub client offline for this process and the processes it starts (idempotent, cheap)."""
    for name in VARIABLES:
        os.environ[name] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # imported before: the module read the environment already
        constants.HF_HUB_OFFLINE = True


def is_enforced() -> bool:
    """True when the environment and (if imported) the hub client are both offline."""
    constants = sys.modules.get("huggingface_hub.constants")
    return all(os.environ.get(n) == "1" for n in VARIABLES) and (constants is None or constants.HF_HUB_OFFLINE)


__all__ = ["VARIABLES", "enforce", "is_enforced"]

"""Offline mode is an explicit call (mgmlora.offline.enforce), made by every entry point and every model loader.

Importing mgmlora sets nothing; a command or a loader puts the hub client offline whatever the environment says, even
when huggingface_hub was imported (and read the environment) before.
"""

import os
import subprocess
import sys

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import OfflineModeIsEnabled

from mgmlora import offline
from mgmlora.commands import COMMANDS
from tests.conftest import ROOT


@pytest.fixture
def online(monkeypatch):
    """A process whose environment and hub client both allow the network (restored afterwards)."""
    for name in offline.VARIABLES:
        monkeypatch.setenv(name, "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not offline.is_enforced() and not huggingface_hub.is_offline_mode()


def test_enforce_puts_an_already_imported_hub_client_offline(online):
    offline.enforce()
    assert offline.is_enforced() and huggingface_hub.is_offline_mode()
    assert all(os.environ[name] == "1" for name in offline.VARIABLES)  # for processes the run starts
    # upstream contract: the hub's requests consult the constant at call time and refuse without a network call
    from huggingface_hub.utils import get_session

    with pytest.raises(OfflineModeIsEnabled):
        get_session().get("https://huggingface.co/api/models/gpt2")


@pytest.mark.parametrize("command", ["fit", "validate", "test", *COMMANDS])
def test_every_command_is_offline_before_it_runs(command, online, monkeypatch):
    import importlib

    from mgmlora.__main__ import main

    seen = []
    module = "mgmlora.cli" if command in ("fit", "validate", "test") else f"mgmlora.commands.{COMMANDS[command]}"
    monkeypatch.setattr(importlib.import_module(module), "main", lambda *_: seen.append(offline.is_enforced()))
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--anything"])
    assert exit_info.value.code == 0 and seen == [True]


def test_a_model_loader_called_from_a_notebook_is_offline(online):
    from mgmlora.models import model_info
    from mgmlora.models.args import ModelArgs

    model_info(ModelArgs(preset="tiny-qwen3"))  # no command ran: the loader itself switches offline
    assert offline.is_enforced()


@pytest.mark.integration  # a fresh interpreter
def test_importing_every_module_sets_no_environment_variable():
    env = {k: v for k, v in os.environ.items() if k not in (*offline.VARIABLES, "DS_ACCELERATOR",
                                                             "TOKENIZERS_PARALLELISM")}
    env["PYTHONPATH"] = str(ROOT / "src")
    code = ("import os, pkgutil, importlib, mgmlora\n"
            "before = dict(os.environ)\n"
            "for m in pkgutil.walk_packages(mgmlora.__path__, 'mgmlora.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"

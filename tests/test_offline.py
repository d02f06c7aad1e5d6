"""Every entry point is offline: importing mgmlora switches the hub and transformers off the network."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration  # a fresh interpreter per case


@pytest.mark.parametrize("setting", [None, "0"])
def test_importing_any_mgmlora_module_first_puts_hugging_face_offline(setting):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    if setting is not None:  # even an environment that asks for the network
        env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = setting
    env["PYTHONPATH"] = str(ROOT / "src")
    code = ("import mgmlora.data.images\n"  # a library module no entry point's cli.py is involved in
            "import huggingface_hub.constants as c\n"
            "print(c.HF_HUB_OFFLINE)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"

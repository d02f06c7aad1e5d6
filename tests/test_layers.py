"""The layer contract (pyproject.toml's [tool.importlinter]): a module imports only from its own layer or below.

`.ci/run` runs `lint-imports` too; this test makes a plain `pytest` catch a violation as well.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

# the `dev` extra installs import-linter (CI has it); the GPU image, which runs only the gpu-marked tests, does not
importlinter = pytest.importorskip("importlinter", reason="import-linter is in the dev extra (pip install -e '.[dev]')")
from importlinter import configuration  # noqa: E402
from importlinter.application.use_cases import lint_imports, read_user_options  # noqa: E402

from tests.conftest import ROOT  # noqa: E402

PYPROJECT = ROOT / "pyproject.toml"


def _options():
    configuration.configure()  # import-linter's own set-up of its adapters, as its CLI does at import
    return read_user_options(config_filename=str(PYPROJECT))


def test_the_layer_contract_holds():
    configuration.configure()
    kept = lint_imports(config_filename=str(PYPROJECT), cache_dir=None, no_logo=True)  # prints the broken chains
    assert kept, "the layer contract is broken: the output above (or `lint-imports`) names each import chain"


def test_every_part_of_the_package_sits_in_a_layer():
    # A new top-level module or subpackage outside the layers list would escape the contract unnoticed.
    (contract,) = [c for c in _options().contracts_options if c["type"] == "layers"]
    layers = contract["layers"]
    parts = {f"mgmlora.{p.stem}" for p in (ROOT / "src" / "mgmlora").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert parts == set(layers)


@pytest.mark.integration
def test_lint_imports_refuses_an_import_from_a_lower_layer_into_a_higher_one(tmp_path):
    # The contract is not vacuous: the same config on a copy of the package with one upward import fails.
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")
    batch = tmp_path / "src" / "mgmlora" / "batch.py"
    batch.write_text(batch.read_text() + "\nimport mgmlora.training.window  # noqa: E402,F401\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "src"))
    lint = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; "
            "sys.exit(c())", "--no-cache"]
    proc = subprocess.run(lint, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "mgmlora.batch is not allowed to import mgmlora.training" in proc.stdout
    assert "mgmlora.batch -> mgmlora.training.window" in proc.stdout

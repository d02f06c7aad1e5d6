"""The `mgmlora` command (mgmlora.__main__): one entry point for fit / validate / test and every tool."""

import subprocess
import sys

import pytest

from mgmlora.__main__ import main
from mgmlora.commands import COMMANDS
from mgmlora.errors import USAGE
from tests.conftest import ROOT


def test_every_command_is_a_module_with_a_main_and_a_bin_wrapper():
    import importlib

    for name, module in COMMANDS.items():
        assert callable(importlib.import_module(f"mgmlora.commands.{module}").main), name
        wrapper = (ROOT / "bin" / f"{module}.py").read_text()
        assert f"from mgmlora.commands.{module} import main" in wrapper and "sys.path" not in wrapper, name


def test_the_pyproject_installs_the_command():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"mgmlora": "mgmlora.__main__:main"}


def test_an_unknown_or_abbreviated_command_is_refused(capsys):
    for argv in (["exprt"], ["exp"], []):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == USAGE
    assert "error: unknown command 'exprt'" in capsys.readouterr().err


def test_a_tool_gets_its_own_arguments_and_ends_through_the_error_wrapper(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MGMLORA_DEBUG", raising=False)  # one line, not the --debug traceback
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --checkpoint '{tmp_path / 'missing'}' is not a directory (expected a *.ckpt checkpoint directory or "
        "an adapter directory)."]
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", "x", "--outpu", "y"])
    assert exit_info.value.code == USAGE
    assert capsys.readouterr().err.strip().splitlines() == ["error: unrecognized arguments: --outpu y"]


@pytest.mark.integration  # a fresh interpreter
def test_python_dash_m_mgmlora_runs_the_training_cli_and_the_tools(tmp_path):
    def mgmlora(*args):
        return subprocess.run([sys.executable, "-m", "mgmlora", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)

    fit = mgmlora("fit", "--config", "configs/demo_chat.yaml", "--trainer.max_stepz", "3")
    assert fit.returncode == USAGE and fit.stderr.strip().splitlines()[-1] == \
        "error: unrecognized arguments: --trainer.max_stepz 3"
    sample = mgmlora("sample-chameleons", str(ROOT / "tests" / "assets" / "chameleons_demo.json"),
                     str(tmp_path / "out.json"), "--max_data_items", "1")
    assert sample.returncode == 0, sample.stderr
    assert (tmp_path / "out.json").is_file()


def test_debug_before_the_command_and_the_scripts_underscore_names_reach_the_command(monkeypatch):
    import mgmlora.__main__ as entry

    seen = []
    monkeypatch.setattr(entry, "run", lambda fn, argv: seen.append((fn.__module__, argv)))
    entry.main(["--debug", "show_samples", "--n", "1"])
    assert seen == [("mgmlora.commands.show_samples", ["--debug", "--n", "1"])]


@pytest.mark.parametrize("subcommand", ["validate", "fit"])
def test_a_checkpoint_that_does_not_exist_is_one_line_before_anything_loads(subcommand, tmp_path, capsys, monkeypatch,
                                                                            in_repo_root):
    monkeypatch.delenv("MGMLORA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", "configs/demo_chat.yaml", "--ckpt_path", str(tmp_path / "no.ckpt"),
              "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    assert exit_info.value.code == USAGE
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: --ckpt_path '{tmp_path / 'no.ckpt'}' "
                                                                       "does not exist")
    assert not (tmp_path / "logs").exists()  # no log directory, no events file

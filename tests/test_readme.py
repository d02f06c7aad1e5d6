"""The README is a short front door whose commands run as written and whose demo figures any CPU reproduces.

The fast checks read the README and the docs/ pages that carry its detail: the two set-up commands stand in the first
40 lines and are the commands CI runs, the README stays short, every `bin/*.py` and `configs/*.yaml` path it names
exists, and every `--flag` passed to a `bin/` tool is one that tool's parser accepts (its `--help`, or for dotted
config keys the parsed config of the command's own `--config` files). The integration test runs the README's demo
command and checks each statement the README makes about it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import runpy
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from tests.conftest import ROOT

README = ROOT / "README.md"
# The pages the README sends readers to for the commands it no longer carries; their examples must run as well.
PAGES = [README, *(ROOT / "docs" / name for name in ("usage.md", "recipes.md", "tools.md", "features.md"))]
DEMO = "pip install -e . && python bin/main.py fit --config configs/demo.yaml"
TESTS = 'pip install -e ".[dev]" && python -m pytest && python -m pytest -m integration -n 2 --dist loadfile'
MAX_WORDS = 2500
# `bin/<tool>.py` followed by its arguments, up to the end of the inline code, line or comment.
COMMAND = re.compile(r"\b(bin/\w+\.py)\b([^`\n#|]*)")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w.]*)")
# Tools whose dotted flags are bin/main.py config keys (they parse configs with bin/main.py's parser).
CONFIG_TOOLS = {"bin/main.py", "bin/estimate.py", "bin/show_samples.py"}


def _text(page: Path) -> str:
    return re.sub(r"\\\n\s*", " ", page.read_text(encoding="utf-8"))  # shell continuation lines joined


def _commands(page: Path) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in COMMAND.finditer(_text(page))]


@functools.cache
def _help_flags(tool: str, subcommand: str | None = None) -> frozenset[str]:
    """The flags `python <tool> [subcommand] --help` lists, run in this process as `python <tool>` would run it."""
    argv = [str(ROOT / tool), *([subcommand] if subcommand else []), "--help"]
    out = io.StringIO()
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / tool), run_name="__main__")
    assert exit_.value.code in (0, None), (argv, out.getvalue())
    return frozenset(FLAG.findall(out.getvalue()))


@functools.cache
def _config_tree(configs: tuple[str, ...]) -> dict:
    from mgmlora.cli import parse_files

    with mock.patch.object(sys, "argv", ["bin/main.py"]):  # LightningCLI warns when it sees pytest's own arguments
        return parse_files(list(configs))


def _is_config_key(key: str, tree: dict) -> bool:
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_the_two_set_up_commands_stand_in_the_first_40_lines_and_are_what_ci_runs():
    first = README.read_text(encoding="utf-8").splitlines()[:40]
    assert DEMO in first and TESTS in first, "README's first 40 lines must hold both set-up commands, as code lines"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for part in TESTS.split(" && "):
        assert part in ci, f".ci/run does not run the README's `{part}`"


def test_the_readme_is_short():
    words = len(README.read_text(encoding="utf-8").split())  # what `wc -w README.md` counts
    assert words <= MAX_WORDS, f"README.md has {words} words (at most {MAX_WORDS}): move detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_tool_and_config_named_exists(page):
    text = page.read_text(encoding="utf-8")
    named = set(re.findall(r"\b((?:bin/\w+\.py)|(?:configs/[\w/.-]+\.yaml))\b", text))
    assert any(n.startswith("bin/") for n in named) and any(n.startswith("configs/") for n in named)
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"{page.name} names files that do not exist: {missing}"


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_flag_passed_to_a_tool_is_accepted_by_it(page, in_repo_root):
    commands = _commands(page)
    if page == README:
        assert {tool for tool, _ in commands} >= {f"bin/{n}.py" for n in ("main", "export", "generate", "score",
                                                                         "compare", "estimate", "sample_chameleons",
                                                                         "show_samples")}
    rejected = []
    for tool, args in commands:
        words = args.split()
        subcommand = words[0] if tool == "bin/main.py" and words and words[0] in ("fit", "validate", "test") else None
        accepted = _help_flags(tool, subcommand)
        configs = tuple(c for c in re.findall(r"--config (\S+)", args) if (ROOT / c).is_file())
        for flag in FLAG.findall(args):
            if flag in accepted:
                continue
            if "." in flag and tool in CONFIG_TOOLS and _is_config_key(flag, _config_tree(configs or
                                                                                         ("configs/demo.yaml",))):
                continue
            rejected.append(f"{tool} {subcommand or ''} --{flag}  (in: {tool}{args.rstrip()})")
    assert not rejected, f"{page.name} passes flags the tools do not accept:\n" + "\n".join(rejected)


def test_the_flag_check_rejects_a_flag_a_tool_does_not_have(in_repo_root):
    """The check above can fail: a made-up flag and a made-up config key are not accepted."""
    assert "merge" in _help_flags("bin/export.py") and "merge_all" not in _help_flags("bin/export.py")
    tree = _config_tree(("configs/demo.yaml",))
    assert _is_config_key("model.lora.preset", tree) and not _is_config_key("model.lora.presets", tree)


@pytest.mark.integration
def test_the_readmes_demo_statements_hold_for_the_demo_command(tmp_path):
    """Runs the README's demo command (logs into tmp_path) and checks each figure the README states about it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    readme = README.read_text(encoding="utf-8")
    paragraph = re.sub(r"\s+", " ", readme.split(TESTS, 1)[1].split("\n## ", 1)[0])
    said = re.search(r"ends with `(?P<line>trained (?P<steps>\d+) optimizer steps on (?P<samples>\d+) samples) \.\.\.`"
                     r".*first logged `train/loss` is between (?P<lo>[\d.]+) and (?P<hi>[\d.]+) and the last under "
                     r"(?P<last>[\d.]+), its last `val/token_acc` is above (?P<acc>[\d.]+), and `val_gen/rougeL`"
                     r" \(its own greedy replies\) ends higher than it starts", paragraph)
    assert said, "the README's demo paragraph changed shape: update this test with it"
    command = DEMO.split(" && ", 1)[1].split()
    assert command[:2] == ["python", "bin/main.py"]
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "main.py"), *command[2:],
                           "--trainer.logger.init_args.save_dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "demo" / "version_0"
    last = [s.strip().splitlines()[-1] for s in (proc.stdout, proc.stderr) if s.strip()]
    assert any(said["line"] in line and str(run / "adapter") in line for line in last), last
    steps = int(said["steps"])
    assert (run / "config.yaml").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step={s:06d}.ckpt"
                                                                        for s in range(30, steps + 1, 30)]
    assert "`checkpoints/step=000030.ckpt/` to" in paragraph and f"`step={steps:06d}.ckpt/`" in paragraph

    events = EventAccumulator(str(run))
    events.Reload()
    loss = [e.value for e in events.Scalars("train/loss")]
    assert float(said["lo"]) <= loss[0] <= float(said["hi"]) and loss[-1] < float(said["last"]), loss
    assert events.Scalars("val/token_acc")[-1].value > float(said["acc"])
    rouge = [e.value for e in events.Scalars("val_gen/rougeL")]
    assert len(rouge) >= 2 and rouge[-1] > rouge[0], rouge

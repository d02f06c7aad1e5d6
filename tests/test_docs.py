"""Figures the READMEs quote are what the code prints today."""

import importlib.util
import re
import shlex

from tests.conftest import ROOT


def _estimate(capsys, args: str) -> str:
    spec = importlib.util.spec_from_file_location("estimate_cli", ROOT / "bin" / "estimate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(shlex.split(args))
    return capsys.readouterr().out


def _gib(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return match.group(1)


def test_the_readmes_estimate_figures_are_what_bin_estimate_prints(capsys, in_repo_root):
    readme = (ROOT / "README.md").read_text()
    fits = re.search(r"^python bin/estimate\.py (?P<args>[^\n#]+?)\s+# fits: (?P<total>[\d.]+) GiB$", readme, re.M)
    full = re.search(r"^python bin/estimate\.py (?P<args>[^\n#]+)\n#\s+\.\.\. optimizer states (?P<opt>[\d.]+) GiB "
                     r"\.\.\. does NOT fit; cheapest change: (?P<fix>\S+) -> (?P<fixed>[\d.]+) GiB$", readme, re.M)
    assert fits and full, "README's estimate example changed shape: update this test with it"

    out = _estimate(capsys, fits["args"])
    assert _gib(r"total \(peak, per device\)\s+([\d.]+) GiB", out) == fits["total"]
    assert "verdict: fits in 24 GiB" in out

    out = _estimate(capsys, full["args"])
    assert _gib(r"optimizer states[^\n]*?([\d.]+) GiB", out) == full["opt"]
    assert "verdict: does NOT fit" in out
    fix = re.search(r"cheapest change that fits: (.+) -> ([\d.]+) GiB", out)
    assert fix and full["fix"] in fix.group(1) and fix.group(2) == full["fixed"], out

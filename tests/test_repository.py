"""Repository rules the code base keeps: comments point inside the repository, and no accepted setting goes unread.

A comment that sends readers to a file outside the repository or to an issue number leaves them
stranded: the facts the code relies on live in docs/design/. A field or argument that nothing reads is a promise the
code does not keep (a config key that changes nothing), so every one must be read somewhere in the package.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from mgmlora.data.chameleons_datamodule import ChameleonsDataModule
from mgmlora.models.loaded import LoadedCausalLM, LoadedMgm
from mgmlora.models.registry import ModelPreset
from mgmlora.training.trainable import Trainability
from tests.conftest import ROOT

SRC = ROOT / "src" / "mgmlora"
LAYOUT = ROOT / "docs" / "layout.md"
CODE_DIRS = ("src", "bin", "bench", "tests")
# Built from pieces so that this file does not match its own patterns.
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "shared/" + "docs", r"\b" + "issues?" + r" #?\d+",
                               r"github\.com/[\w.-]+/[\w.-]+/(?:" + "issues|pull" + r")/"]), re.IGNORECASE)
DESIGN_NOTE = re.compile(r"docs/design/([\w-]+\.md)")


def _code_files() -> list[Path]:
    """Every source, script and config file whose comments this rule covers (bench/results holds records: not code)."""
    files = [p for d in CODE_DIRS for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh", ".yaml")
             and "results" not in p.relative_to(ROOT).parts and "__pycache__" not in p.parts]
    return sorted(files + list((ROOT / "configs").rglob("*.yaml")))


def test_no_comment_points_outside_the_repository():
    files = _code_files()
    assert len(files) > 50  # the walk found the tree
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if OUTSIDE.search(line)]
    # The READMEs and docs/ pages may tell history, but never send readers to files outside the repository.
    for readme in (ROOT / "README.md", ROOT / "configs" / "README.md", *(ROOT / "docs").glob("*.md")):
        hits += [f"{readme.relative_to(ROOT)}:{i}: {line.strip()}"
                 for i, line in enumerate(readme.read_text(encoding="utf-8").splitlines(), 1)
                 if "../" + "shared" in line or "shared/" + "docs" in line]
    assert not hits, "\n".join(hits)


def test_every_design_note_named_exists_and_the_architecture_is_linked():
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    texts = {p: p.read_text(encoding="utf-8") for p in [*_code_files(), *pages]}
    named = {(p.relative_to(ROOT), n) for p, t in texts.items() for n in DESIGN_NOTE.findall(t)}
    missing = sorted(f"{p} names docs/design/{n}" for p, n in named if not (ROOT / "docs" / "design" / n).is_file())
    assert not missing, "\n".join(missing)
    assert "docs/design/architecture.md" in texts[LAYOUT]
    assert "docs/layout.md" in texts[ROOT / "README.md"]


def _package_source() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in SRC.rglob("*.py"))


def _init_params(cls) -> list[str]:
    return [n for n in inspect.signature(cls.__init__).parameters if n != "self"]


@pytest.mark.parametrize(("owner", "names", "read_as", "exempt"), [
    # `source` is provenance for readers (the Hub page the numbers were copied from), not a setting.
    ("ModelPreset", [f.name for f in dataclasses.fields(ModelPreset)], r"\b(?:preset|p)\.{n}\b", {"source"}),
    # a family's optional components (LoadedModel.components) are read by name: getattr(trainable, component)
    ("Trainability", [f.name for f in dataclasses.fields(Trainability)], r"trainable\.{n}\b",
     {c for cls in (LoadedCausalLM, LoadedMgm) for c in cls.components}),
    ("ChameleonsDataModule", _init_params(ChameleonsDataModule),
     r"\b(?:hp|hparams)(?:\.{n}\b|\.get\(\"{n}\"|\[\"{n}\"\])", set()),
], ids=["ModelPreset", "Trainability", "ChameleonsDataModule"])
def test_every_setting_is_read(owner, names, read_as, exempt):
    source = _package_source()
    unread = [n for n in names if n not in exempt and not re.search(read_as.replace("{n}", n), source)]
    assert not unread, f"{owner} accepts {unread} but nothing in src/mgmlora reads them"


def test_the_layout_page_names_every_module_of_the_package():
    """docs/layout.md describes the tree as it is: every module file is named under its group."""
    layout = LAYOUT.read_text(encoding="utf-8")
    missing = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                     if p.name != "__init__.py" and p.name not in layout)
    assert not missing, f"docs/layout.md does not name: {missing}"


def test_family_differences_live_in_models_only():
    """No family branch outside mgmlora/models: the rest asks the LoadedModel (or ModelInfo's capabilities)."""
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for p in [*SRC.rglob("*.py"), *(ROOT / "bin").glob("*.py")] if SRC / "models" not in p.parents
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"family\s*[!=]=|(?<!trainable)\.llm\b", line) and not line.lstrip().startswith("#")]
    assert not hits, "\n".join(hits)

"""Export and merge never write into a user's non-empty directory, and never leave a half-written one (output_dir)."""

import errno
import json
import sys

import pytest
from safetensors.torch import load_file

import mgmlora.tools.export as export
from mgmlora.errors import USAGE, classify, run
from mgmlora.tools.export import export_adapter, merge_and_save, model_args_for, read_run_adapter
from mgmlora.tools.output_dir import DiskFullError
from tests.conftest import ROOT, load_script


@pytest.fixture
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _debris(folder):
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


def test_export_into_a_non_empty_directory_is_refused_and_overwrite_swaps_it(checkpoint, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    run_adapter = read_run_adapter(checkpoint)
    with pytest.raises(Exception, match=r"already holds files; .* --overwrite") as refused:
        export_adapter(run_adapter, out)
    assert classify(refused.value) == ("user", USAGE)
    assert _files(out) == {"notes.txt": b"a user's file"}

    export_adapter(run_adapter, out, overwrite=True)
    assert "notes.txt" not in _files(out) and "adapter_model.safetensors" in _files(out)
    assert _debris(out) == []


def test_a_full_disk_during_export_names_the_path_and_leaves_the_previous_output(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    run_adapter = read_run_adapter(checkpoint)
    export_adapter(run_adapter, out)
    before = _files(out)

    def full(directory, config, tensors):
        (directory / "adapter_model.safetensors").write_bytes(b"x" * 1000)  # what the disk took before it filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "write_adapter", full)
    with pytest.raises(DiskFullError, match=rf"^{out}: disk full after 1000 bytes written") as failed:
        export_adapter(run_adapter, out, overwrite=True)
    assert classify(failed.value) == ("user", 1)
    assert _files(out) == before and _debris(out) == []


def test_merge_with_overwrite_leaves_no_stale_shard_or_index(checkpoint, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model-00002-of-00002.safetensors").write_bytes(b"old shard")
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002-of-00002"}}))
    run_adapter = read_run_adapter(checkpoint)
    args = model_args_for(run_adapter, dtype="float32")
    with pytest.raises(Exception, match="already holds files"):
        merge_and_save(run_adapter, args, out)
    merge_and_save(run_adapter, args, out, overwrite=True)
    assert not (out / "model-00002-of-00002.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert load_file(out / "model.safetensors") and _debris(out) == []


def test_bin_export_refuses_a_non_empty_output_before_loading(checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("keep")
    tool = load_script(ROOT / "bin" / "export.py", "export_output_dir")
    monkeypatch.setattr(sys, "argv", ["export.py"])
    monkeypatch.delenv("MGMLORA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run(tool.main, ["--checkpoint", str(checkpoint), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == USAGE and len(err) == 1 and "already holds files" in err[0]
    assert _files(out) == {"x": b"keep"}

"""Written files and directories get the modes the user's umask gives (mgmlora.files), whoever wrote them.

Each test sets the umask itself: 022 (0644 files, 0755 directories) and 027 (0640, 0750), so a mode that is merely
hard-coded to 0644 fails the second.
"""

import os
import stat
import tempfile

import pytest
import torch
from safetensors.torch import save_file

from mgmlora.files import current_umask, umask_modes
from mgmlora.training.checkpoint import staged_dir, write_tensors


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _modes(root):
    """{relative path: permission bits} of `root` and everything in it."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def _expected(root, umask):
    return {str(p.relative_to(root)): (0o777 if p.is_dir() else 0o666) & ~umask for p in [root, *root.rglob("*")]}


def test_current_umask_is_the_processs_and_is_left_unchanged(umask):
    assert current_umask() == umask
    assert os.umask(umask) == umask  # reading did not change it


def test_safetensors_alone_writes_owner_only_and_write_tensors_gives_the_umask_mode(tmp_path, umask):
    save_file({"w": torch.zeros(2)}, tmp_path / "raw.safetensors")
    assert stat.S_IMODE((tmp_path / "raw.safetensors").stat().st_mode) == 0o600  # why mgmlora.files exists
    write_tensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o666 & ~umask


def test_a_staged_directory_is_published_with_umask_modes_whatever_wrote_into_it(tmp_path, umask):
    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # a library's writer: 0600
        inner = tempfile.mkdtemp(dir=tmp)  # a tempfile directory: 0700
        (tmp / "config.json").write_text("{}")
        save_file({"w": torch.zeros(2)}, os.path.join(inner, "x.safetensors"))
    assert _modes(out) == _expected(out, umask)


def test_umask_modes_leaves_symbolic_links_and_their_targets_alone(tmp_path, umask):
    target = tmp_path / "elsewhere.txt"
    target.write_text("not ours")
    target.chmod(0o600)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(target)
    umask_modes(tmp_path / "out")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_exported_adapters_and_merged_models_get_umask_modes(tmp_path, tiny_checkpoint, umask):
    from mgmlora.tools.export import export_adapter, merge_and_save, model_args_for, read_run_adapter

    run = read_run_adapter(tiny_checkpoint)
    adapter = export_adapter(run, tmp_path / "adapter")
    merged = merge_and_save(run, model_args_for(run, dtype="float32"), tmp_path / "merged")
    assert any(p.suffix == ".safetensors" for p in merged.iterdir())  # transformers' writer went through it too
    for out in (adapter, merged):
        assert _modes(out) == _expected(out, umask)


def test_saved_mgm_shards_get_umask_modes(tmp_path, umask):
    from mgmlora.models import load_model
    from mgmlora.models.args import ModelArgs
    from mgmlora.models.mgm_checkpoint import save_mgm
    from tests.conftest import ASSETS

    model = load_model(ModelArgs(preset="tiny-mgm", tokenizer_path=str(ASSETS / "gemma_tokenizer"),
                                 dtype="float32", gradient_checkpointing=False)).model
    save_mgm(model, tmp_path / "mgm", max_shard_bytes=2**16)
    assert len(list((tmp_path / "mgm").glob("*.safetensors"))) > 1
    assert _modes(tmp_path / "mgm") == _expected(tmp_path / "mgm", umask)

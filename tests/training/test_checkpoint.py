"""AdapterCheckpointIO under interrupted saves: no debris survives the next save, and `last.ckpt` never goes missing."""

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save, save_file

from mgmlora.errors import DiskFullError, classify, is_disk_full
from mgmlora.training import checkpoint as ckpt_module
from mgmlora.training.checkpoint import (
    AdapterCheckpointIO,
    UnsafeCheckpointError,
    current_umask,
    staged_dir,
    umask_modes,
    write_tensors,
)


def _state(step):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]).to_dict()
    return {"peft": {"config": json_ready(config), "adapter": {"q.lora_A.weight": torch.full((2, 4), float(step))}},
            "global_step": step}


def json_ready(config):
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def _step(io, path):
    return io.load_checkpoint(path)["global_step"]


class _Killed(BaseException):
    """Stands for the process being killed: nothing after it runs (not even `except Exception`)."""


def _kill_at_rename(monkeypatch, n):
    """Makes the n-th `os.replace` of the next save "kill the process" (1: moving the old checkpoint aside)."""
    calls = []
    real = os.replace

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == n:
            raise _Killed
        return real(src, dst)

    monkeypatch.setattr(ckpt_module.os, "replace", replace)
    monkeypatch.setattr(ckpt_module.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up


def test_an_exported_adapter_given_as_a_checkpoint_is_refused_with_where_the_checkpoints_are(tiny_checkpoint,
                                                                                             tmp_path):
    adapter = tiny_checkpoint.parent.parent / "run" / "version_0" / "adapter"  # the run's final export
    assert (adapter / "adapter_config.json").is_file()
    with pytest.raises(FileNotFoundError, match="exported adapter.*checkpoints/step=N.ckpt.*bin/score.py"):
        AdapterCheckpointIO().load_checkpoint(adapter)
    with pytest.raises(FileNotFoundError, match=r"not an mgmlora checkpoint directory \(expected [^)]*\)\.$"):
        AdapterCheckpointIO().load_checkpoint(tiny_checkpoint.parent)  # a directory of checkpoints: no hint
    damaged = tmp_path / "step=2.ckpt"  # a checkpoint that lost its trainer state is no exported adapter
    shutil.copytree(tiny_checkpoint, damaged)
    (damaged / "trainer_state.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"not an mgmlora checkpoint directory \(expected [^)]*\)\.$"):
        AdapterCheckpointIO().load_checkpoint(damaged)
    assert _step(AdapterCheckpointIO(), tiny_checkpoint) == 2


def test_a_crash_between_the_renames_of_last_leaves_a_loadable_last(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    AdapterCheckpointIO().save_checkpoint(_state(1), last)
    with monkeypatch.context() as patch:
        _kill_at_rename(patch, 2)  # the old last.ckpt is renamed away, the new one is not yet in place
        with pytest.raises(_Killed):
            AdapterCheckpointIO().save_checkpoint(_state(2), last)
    assert not last.exists()  # the window the fix has to cover
    assert _step(AdapterCheckpointIO(), last) == 1  # resuming from last.ckpt reads the complete previous one

    io = AdapterCheckpointIO()  # the next run: its first save repairs the directory
    io.save_checkpoint(_state(3), tmp_path / "step=000003.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=000003.ckpt"]
    assert _step(io, last) == 1
    io.save_checkpoint(_state(4), last)
    assert _step(io, last) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=000003.ckpt"]


@pytest.mark.parametrize("rename", [1, 3])  # killed before anything moved; killed after the swap, before cleanup
def test_other_crash_points_keep_a_complete_checkpoint_and_the_next_save_cleans_up(tmp_path, monkeypatch, rename):
    last = tmp_path / "last.ckpt"
    AdapterCheckpointIO().save_checkpoint(_state(1), last)
    with monkeypatch.context() as patch:
        _kill_at_rename(patch, rename) if rename < 3 else patch.setattr(
            ckpt_module.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
        with pytest.raises(_Killed):
            AdapterCheckpointIO().save_checkpoint(_state(2), last)
    assert _step(AdapterCheckpointIO(), last) == (1 if rename == 1 else 2)
    assert any(p.name.startswith(".last.ckpt.") for p in tmp_path.iterdir())  # debris, as a kill leaves it

    AdapterCheckpointIO().save_checkpoint(_state(5), tmp_path / "step=000005.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=000005.ckpt"]
    assert _step(AdapterCheckpointIO(), last) == (1 if rename == 1 else 2)


def test_cleanup_touches_only_its_own_debris_names_in_its_own_directory(tmp_path):
    run, other = tmp_path / "checkpoints", tmp_path / "elsewhere"
    for name in (".step=000002.ckpt.tmp-0123abcd", ".last.ckpt.old-89abcdef"):  # a killed run's debris
        (run / name).mkdir(parents=True)
        (run / name / "trainer_state.pt").write_bytes(b"partial")
    keep = [run / ".step=000002.ckpt.tmp-notahex8", run / ".cache", run / "notes.tmp-0123abcd"]
    for path in keep:
        path.mkdir()
    (run / ".step=000004.ckpt.tmp-0123abcd").write_text("a file, not a directory this code made")
    keep.append(run / ".step=000004.ckpt.tmp-0123abcd")
    (other / ".step=000002.ckpt.tmp-0123abcd").mkdir(parents=True)

    AdapterCheckpointIO().save_checkpoint(_state(6), run / "step=000006.ckpt")
    left = {p.name for p in run.iterdir()}
    assert left == {"step=000006.ckpt", "last.ckpt"} | {p.name for p in keep}  # the old last.ckpt came back
    assert (other / ".step=000002.ckpt.tmp-0123abcd").is_dir()


def test_a_pickled_payload_in_trainer_state_is_refused_without_running(tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "step=000001.ckpt"
    AdapterCheckpointIO().save_checkpoint(_state(1), path)
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    torch.save({**state, "loops": Payload()}, path / "trainer_state.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"trainer_state\.pt: refused to load: it needs posix\.system"):
        AdapterCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


class _FakeEngine:
    """Stands for DeepSpeed's engine: writes a model-states file, then an optimizer-states file (or is killed)."""

    def __init__(self, step, killed=False):
        self.step, self.killed, self.module = step, killed, torch.nn.Linear(1, 1)

    def module_state_dict(self, *args, exclude_frozen_parameters=False, **kwargs):
        return {}

    def save_checkpoint(self, save_dir, client_state, tag, exclude_frozen_parameters):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"step": self.step}, Path(save_dir) / tag / "mp_rank_00_model_states.pt")
        if self.killed:
            raise _Killed
        torch.save({"step": self.step}, Path(save_dir) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        (Path(save_dir) / "latest").write_text(tag)


def test_a_deepspeed_save_killed_midway_leaves_the_previous_last_whole(tmp_path):
    from mgmlora.training.strategies import MgmDeepSpeedStrategy

    def save(step, killed=False):
        strategy = MgmDeepSpeedStrategy(stage=2)
        strategy.model = _FakeEngine(step, killed)  # what `deepspeed_engine` returns
        strategy.save_checkpoint({"global_step": step}, tmp_path / "last.ckpt")

    def steps():
        files = sorted((tmp_path / "last.ckpt" / "checkpoint").iterdir())
        return [torch.load(f, weights_only=True)["step"] for f in files]

    save(1)
    with pytest.raises(_Killed):
        save(2, killed=True)  # DeepSpeed wrote the new model states, not yet the optimizer states
    assert steps() == [1, 1]  # in place, last.ckpt would now mix step 2's model with step 1's optimizer
    save(3)
    assert steps() == [3, 3] and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_fit_ckpt_path_last_finds_the_checkpoint_a_killed_save_renamed_away(tmp_path, monkeypatch):
    """Lightning looks `last` up by name before any callback runs: the CLI puts it back first (MgmCLI.before_fit)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mgmlora.cli import MgmCLI
    from mgmlora.training.checkpoint import recover_checkpoint_dirs

    last = tmp_path / "last.ckpt"
    AdapterCheckpointIO().save_checkpoint(_state(1), last)
    with monkeypatch.context() as patch:
        _kill_at_rename(patch, 2)
        with pytest.raises(_Killed):
            AdapterCheckpointIO().save_checkpoint(_state(2), last)
    assert not last.exists()
    io = AdapterCheckpointIO()  # the resumed run's saver
    recover_checkpoint_dirs([ModelCheckpoint(dirpath=tmp_path), ModelCheckpoint()], io.recovered)
    assert last.is_dir() and _step(io, last) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert "recover_checkpoint_dirs" in MgmCLI._check_run_dirs.__code__.co_names  # wired where `last` is resolved

    # Once per run: the saver's first save does not clean the directory the CLI cleaned (it passed the saver's set;
    # with a fresh set each call, this save deleted the directory below as debris again).
    leftover = tmp_path / ".step=9.ckpt.tmp-0123abcd"
    leftover.mkdir()
    io.save_checkpoint(_state(3), tmp_path / "step=3.ckpt")
    assert leftover.is_dir()
    AdapterCheckpointIO().save_checkpoint(_state(4), tmp_path / "step=4.ckpt")  # another run cleans it
    assert not leftover.exists()


# -- file modes: written files and directories get the modes the user's umask gives, whoever wrote them. Each test
# sets the umask itself: 022 (0644 files, 0755 directories) and 027 (0640, 0750), so a mode that is merely hard-coded
# to 0644 fails the second.

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
    assert stat.S_IMODE((tmp_path / "raw.safetensors").stat().st_mode) == 0o600  # why umask_modes exists
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


def test_merged_mgm_shards_get_umask_modes(tmp_path, umask):
    from mgmlora.models import load_model
    from mgmlora.models.args import ModelArgs
    from mgmlora.models.mgm_checkpoint import save_mgm
    from tests.conftest import ASSETS

    model = load_model(ModelArgs(preset="tiny-mgm", tokenizer_path=str(ASSETS / "gemma_tokenizer"),
                                 dtype="float32", gradient_checkpointing=False)).model
    with staged_dir(tmp_path / "mgm") as tmp:  # as merge_and_save writes it (mgmlora.tools.output_dir)
        save_mgm(model, tmp, max_shard_bytes=2**16)
    assert len(list((tmp_path / "mgm").glob("*.safetensors"))) > 1
    assert _modes(tmp_path / "mgm") == _expected(tmp_path / "mgm", umask)
def _files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failing", ["write_bytes", "torch.save"])  # the adapter file; the trainer state
def test_a_full_disk_during_a_checkpoint_save_names_path_and_bytes_and_leaves_the_previous_one(tmp_path, monkeypatch,
                                                                                              failing):
    last = tmp_path / "last.ckpt"
    AdapterCheckpointIO().save_checkpoint(_state(1), last)
    before = _files(tmp_path)

    def full(self_or_obj, target, *_, **__):  # what the disk took before it filled, then ENOSPC
        (target if isinstance(target, Path) else Path(target.name)).open("wb").write(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if failing == "write_bytes":
        monkeypatch.setattr(Path, "write_bytes", lambda self, data: full(None, self))
    else:
        monkeypatch.setattr(ckpt_module.torch, "save", full)
    state = _state(2)
    state["peft"]["adapter"]["q.lora_A.weight"] = torch.zeros(2, 1024)  # 8,192 bytes: more than what is written first
    with pytest.raises(DiskFullError) as failed:
        AdapterCheckpointIO().save_checkpoint(state, last)
    message = str(failed.value)
    config = len(before["last.ckpt/adapter_config.json"])  # written before the failing write, as in the first save
    if failing == "write_bytes":  # config + 100 bytes written; the state's only tensor is what it needs at least
        expected = f"after {config + 100} bytes written (it needs at least {2 * 1024 * 4} bytes; "
    else:  # config and adapter written, then 100 bytes of the state: more than that is needed
        weights = len(save({"q.lora_A.weight": torch.zeros(2, 1024)}, metadata={"format": "pt"}))
        expected = f"after {config + weights + 100} bytes written (it needs more than {config + weights + 100} bytes; "
    assert message.startswith(f"{last}: disk full {expected}"), message
    assert "Nothing partial was left behind" in message and "\n" not in message
    assert classify(failed.value) == ("user", 1)
    assert _files(tmp_path) == before  # the previous checkpoint whole, and no temporary directory left
    assert _step(AdapterCheckpointIO(), last) == 1


def test_an_error_that_wraps_the_os_full_disk_counts_and_others_do_not():
    wrapped = RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                           f"\"{os.strerror(errno.ENOSPC)}\" }})")
    chained = RuntimeError("file write failed")
    chained.__cause__ = OSError(errno.ENOSPC, "x")
    assert is_disk_full(OSError(errno.ENOSPC, "x")) and is_disk_full(wrapped) and is_disk_full(chained)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied")) and not is_disk_full(RuntimeError("boom"))


INJECT_FULL_DISK = '''
import errno, os
from pathlib import Path

_write_bytes = Path.write_bytes


def _full(self, data):  # the step-4 checkpoint fills the disk after 10 bytes of its adapter
    if self.parent.name.startswith(".step=000004.ckpt.tmp-"):
        _write_bytes(self, data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _write_bytes(self, data)


Path.write_bytes = _full
'''


@pytest.mark.integration
def test_fit_on_a_full_disk_exits_1_with_one_line_and_keeps_the_last_complete_checkpoint(tmp_path):
    import subprocess
    import sys

    import yaml

    from tests.conftest import ROOT

    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(INJECT_FULL_DISK)  # runs at the start of the subprocess
    config = yaml.safe_load((ROOT / "configs" / "demo_chameleons.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "inject"), str(ROOT / "src")])}
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "main.py"), "fit", "--config",
                           str(tmp_path / "demo.yaml"), "--trainer.max_steps", "6", "--trainer.val_check_interval", "4",
                           "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir",
                           str(tmp_path / "logs")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    out = proc.stdout + proc.stderr
    checkpoints = tmp_path / "logs" / "demo_chameleons" / "version_0" / "checkpoints"
    assert proc.returncode == 1, out[-3000:]
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"error: {checkpoints / 'step=000004.ckpt'}: disk full after ") and "Traceback" not in out
    assert "Nothing partial was left behind" in last
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step=000002.ckpt"]  # no half checkpoint, no debris
    assert _step(AdapterCheckpointIO(), checkpoints / "step=000002.ckpt") == 2
    assert not (checkpoints.parent / "adapter").exists()  # a run that failed does not export a final adapter


def test_an_executable_file_keeps_its_executable_bits_under_the_umask(tmp_path, umask):
    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        script = tmp / "zero_to_fp32.py"  # DeepSpeed writes this one executable into its checkpoints
        script.write_text("#!/usr/bin/env python\n")
        script.chmod(0o700)
        (tmp / "model.pt").write_bytes(b"x")
    assert stat.S_IMODE((out / "zero_to_fp32.py").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "model.pt").stat().st_mode) == 0o666 & ~umask

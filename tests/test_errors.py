"""The entry wrapper (mgmlora.errors.run): user errors as one line with exit 2 / 1, bugs with their traceback."""

import argparse
import ast
import sys

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from mgmlora.errors import USAGE, MgmloraError, UsageError, classify, one_line, run
from tests.conftest import ROOT, load_script

ENTRY_POINTS = sorted((ROOT / "bin").glob("*.py")) + [ROOT / "bench" / "sweep.py"]


def _run(main, argv, capsys, monkeypatch):
    monkeypatch.delenv("MGMLORA_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["tool.py"])  # run() rewrites sys.argv[1:] for main(); restored afterwards
    with pytest.raises(SystemExit) as exit_info:
        run(main, argv)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=[p.name for p in ENTRY_POINTS])
def test_every_entry_point_runs_its_main_through_the_wrapper(path):
    tree = ast.parse(path.read_text())
    guard = next(node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
    assert [ast.unparse(stmt) for stmt in guard.body] == ["run(main)"], path


def test_a_config_key_typo_prints_the_parsers_message_alone_with_exit_2(capsys, in_repo_root):
    from mgmlora.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/demo_chat.yaml", "--trainer.max_stepz", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == USAGE
    assert err.strip().splitlines() == ["error: unrecognized arguments: --trainer.max_stepz 3"]  # no usage text


def test_a_typo_in_a_tool_that_parses_configs_is_one_line_with_exit_2(capsys, monkeypatch, in_repo_root):
    estimate_cli = load_script(ROOT / "bin" / "estimate.py", "estimate_cli")
    code, out, err = _run(estimate_cli.main, ["--config", "configs/demo.yaml", "--model.lora.rr", "3"], capsys,
                          monkeypatch)
    assert code == USAGE and out == ""
    assert err.strip().splitlines() == ["error: unrecognized arguments: --model.lora.rr 3"]


def test_our_runtime_error_is_one_line_with_exit_1_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    export_cli = load_script(ROOT / "bin" / "export.py", "export_cli")
    argv = ["--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]
    code, _, err = _run(export_cli.main, argv, capsys, monkeypatch)
    assert code == 1
    assert err.strip().splitlines() == [f"error: --checkpoint '{tmp_path / 'missing'}' is not a directory (expected "
                                        "a *.ckpt checkpoint directory or an adapter directory)."]
    code, _, err = _run(export_cli.main, [*argv, "--debug"], capsys, monkeypatch)
    assert code == 1 and "Traceback (most recent call last)" in err and "read_run_adapter" in err
    assert err.strip().splitlines()[-1].startswith("error: --checkpoint")
    assert not (tmp_path / "out").exists()


def test_a_bug_keeps_its_traceback(capsys, monkeypatch):
    def main():
        return {}["a key nobody set"]

    code, _, err = _run(main, [], capsys, monkeypatch)
    assert code == 1
    assert "Traceback (most recent call last)" in err and "KeyError: 'a key nobody set'" in err
    assert err.strip().splitlines()[-1].startswith("error: unexpected KeyError")


def test_which_exceptions_are_user_errors(tmp_path):
    from mgmlora.training.strategies import MgmDeepSpeedStrategy

    with pytest.raises(ValueError) as ours:  # one of our checks: an explicit raise in mgmlora's code
        MgmDeepSpeedStrategy(stage=2, offload_parameters=True)
    assert classify(ours.value) == ("user", 1)
    # Python's own ValueError inside mgmlora's code (a failed unpacking) is a bug, not a setting: compiled here under
    # the name of a module of the package, so its innermost frame is "in" mgmlora but on no `raise` line
    with pytest.raises(ValueError) as implicit:
        exec(compile("a, b = [1, 2, 3]", str(ROOT / "src" / "mgmlora" / "tools" / "report.py"), "exec"), {})
    assert classify(implicit.value) == ("bug", 1)
    with pytest.raises(FileNotFoundError) as missing:
        open(tmp_path / "missing.json")
    assert classify(missing.value) == ("user", 1)
    assert classify(MgmloraError("x")) == ("user", 1)
    assert classify(UsageError("x")) == ("user", USAGE)
    assert classify(argparse.ArgumentError(None, "x")) == ("user", USAGE)
    assert classify(TypeError("x")) == ("bug", 1)


@pytest.mark.integration  # builds the CLI's model, data and trainer (about 20 s)
def test_lightnings_distributed_sampler_on_two_ranks_is_refused_before_the_weights_load(capsys, monkeypatch,
                                                                                        in_repo_root):
    from mgmlora.cli import main
    from mgmlora.training.module import LoraLitModule

    monkeypatch.setattr(LoraLitModule, "configure_model", lambda self: pytest.fail("the weights loaded first"))
    two_ranks = ["--config", "configs/demo_chat.yaml", "--trainer.logger", "false", "--trainer.accelerator", "cpu",
                 "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    code, out, err = _run(lambda argv=None: main(argv, run=False), [*two_ranks, "--trainer.use_distributed_sampler",
                                                               "true"], capsys, monkeypatch)
    assert code == USAGE, err
    assert err.strip().splitlines()[-1] == ("error: trainer.use_distributed_sampler: true with 2 ranks: set "
                                            "trainer.use_distributed_sampler: false (mgmlora's sampler shards the "
                                            "data across ranks itself, to normalise the loss over the whole "
                                            "accumulation window).")  # one line, after Lightning's INFO lines
    cli = main([*two_ranks, "--trainer.use_distributed_sampler", "false"], run=False)  # the configs' setting passes
    assert cli.trainer.world_size == 2


@pytest.mark.integration  # builds the tiny MoE model, data and trainer, and starts fit
@pytest.mark.parametrize(("overrides", "message"), [
    (["--model.model.quantization", '{"quant_type": "nf4"}', "--model.model.gradient_checkpointing", "false"],
     "model.model.quantization (nf4) on a MoE model trains with model.model.gradient_checkpointing: true only"),
    (["--model.speed.keep_expert_outputs", "all", "--model.model.gradient_checkpointing", "false"],
     "model.speed.keep_expert_outputs: all chooses what gradient checkpointing recomputes")])
def test_a_moe_setting_training_refuses_stops_fit_before_the_first_step(overrides, message, capsys, monkeypatch,
                                                                         in_repo_root, tmp_path):
    from mgmlora.cli import main
    from mgmlora.training.module import LoraLitModule

    monkeypatch.setattr(LoraLitModule, "training_step", lambda *a: pytest.fail("a step ran"))
    argv = ["fit", "--config", "configs/demo_moe.yaml", "--trainer.logger", "false", "--trainer.max_steps", "1",
            "--trainer.default_root_dir", str(tmp_path), *overrides]
    code, out, err = _run(main, argv, capsys, monkeypatch)
    assert code == USAGE, err
    assert err.strip().splitlines()[-1].startswith(f"error: {message}")  # one line


TOOLS = [p for p in sorted((ROOT / "bin").glob("*.py")) if p.name != "main.py"]


@pytest.mark.parametrize("path", TOOLS, ids=[p.name for p in TOOLS])
def test_every_tool_refuses_an_abbreviated_flag(path, capsys, monkeypatch):
    # argparse's default prefix matching would take `--hel` as --help (print it, exit 0), and `--out` as --output
    tool = load_script(path, f"abbrev_{path.stem}")
    code, out, err = _run(tool.main, ["--hel"], capsys, monkeypatch)
    assert code == USAGE and out == "", (out, err)
    assert err.strip().startswith("usage:") or err.strip().startswith("error:"), err


def test_main_refuses_an_abbreviated_config_key(capsys, in_repo_root):
    from mgmlora.cli import main

    with pytest.raises(SystemExit) as exit_info:  # jsonargparse took it as --trainer.max_steps
        main(["fit", "--config", "configs/demo_chat.yaml", "--trainer.max_ste", "3", "--print_config"])
    assert exit_info.value.code == USAGE
    assert capsys.readouterr().err.strip().splitlines() == ["error: unrecognized arguments: --trainer.max_ste 3"]


@pytest.mark.parametrize("value", ["0", "0.0", "-5"])
def test_a_zero_validation_interval_is_refused_before_the_model_loads(value, capsys, monkeypatch, in_repo_root):
    from mgmlora.cli import main

    code, out, err = _run(lambda: main(run=False), ["--config", "configs/demo_chat.yaml",
                                                    "--trainer.val_check_interval", value], capsys, monkeypatch)
    shown = float(value) if "." in value else int(value)
    assert code == USAGE
    assert err.strip().splitlines() == [f"error: trainer.val_check_interval: {shown} is not a validation interval: "
                                        "use a number of micro-batches >= 1, a fraction of the epoch in (0, 1], or "
                                        "trainer.limit_val_batches: 0 to turn validation off."]


def test_a_gpu_accelerator_on_a_machine_without_one_is_one_line(capsys, monkeypatch, in_repo_root):
    import torch

    from mgmlora.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, out, err = _run(lambda: main(run=False), ["--config", "configs/demo_chat.yaml",
                                                    "--trainer.accelerator", "gpu"], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == USAGE and len(lines) == 1 and lines[0].startswith("error: ") and "gpu" in lines[0].lower(), err
    assert "Set trainer.accelerator: cpu" in lines[0]  # the fix, not only Lightning's diagnosis


def test_a_finished_run_closes_the_process_group_it_left_open(tmp_path):
    import torch.distributed as dist

    def main():  # a run on one gloo rank, as Lightning's DDP leaves it: the group still open when main returns
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    with pytest.raises(SystemExit) as exit_:
        run(main, [])
    assert exit_.value.code == 0 and not dist.is_initialized()


def test_a_setting_out_of_range_is_a_rejected_config_before_the_model_loads(capsys, monkeypatch, in_repo_root):
    import mgmlora.training.module as module
    from mgmlora.cli import main

    monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    code, out, err = _run(lambda: main(run=False), ["--config", "configs/demo_chat.yaml", "--model.optim.lr", "0"],
                          capsys, monkeypatch)
    assert code == USAGE
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: model.optim: need lr > 0")


def test_a_validation_interval_longer_than_the_epoch_is_a_one_line_usage_error(tmp_path):
    trainer = L.Trainer(accelerator="cpu", max_steps=1, val_check_interval=1000, check_val_every_n_epoch=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="val_check_interval") as error:
        trainer.fit(BoringModel())
    assert classify(error.value) == ("user", USAGE)
    message = one_line(error.value)
    assert "\n" not in message and "(1000)" in message and "trainer.check_val_every_n_epoch: null" in message
    assert classify(ValueError("`val_check_interval` named by a bug elsewhere")) == ("bug", 1)  # no Lightning raise

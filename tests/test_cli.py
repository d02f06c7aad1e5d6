"""End-to-end runs of bin/main.py on CPU, asserting the artifacts a run writes."""

import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

# third-party notices every run used to print, none of which concerns the user (mgmlora.quiet says why for each)
NOTICES = ["💡 Tip: For seamless cloud logging", "`is_gradient_checkpointing` is deprecated",
           "`isinstance(treespec, LeafSpec)` is deprecated", 'We found `hidden_act="gelu"` in this Gemma config']


def _run(*args, cwd=ROOT):
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "main.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_demo_fit_writes_config_tensorboard_checkpoints_and_adapter(tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "demo_chameleons.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 3
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    out = _run("fit", "--config", str(tmp_path / "demo.yaml"), "--trainer.max_steps", "6",
               "--trainer.val_check_interval", "6", "--trainer.log_every_n_steps", "1",
               "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path))
    assert "trainable params: 29,696 / 169,344" in out and "model.layers.*.self_attn.q_proj  x2" in out
    assert not [n for n in NOTICES if n in out] and "Warning" not in out, out
    run = tmp_path / "demo_chameleons" / "version_0"
    assert (run / "config.yaml").is_file() and "preset: balanced" in (run / "config.yaml").read_text()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step=000003.ckpt", "step=000006.ckpt"]
    for ckpt in ckpts:
        names = sorted(p.name for p in (run / "checkpoints" / ckpt).iterdir())
        assert names == ["adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"]
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 6 * 2 and all("lora_" in k for k in adapter)
    final = load_file(run / "checkpoints" / "step=000006.ckpt" / "adapter_model.safetensors")
    assert all(torch.equal(adapter[k], final[k]) for k in adapter)

    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "val/loss", "val/ppl", "val/token_acc", "perf/tokens_per_s",
            "params/trainable", "lr-AdamW"} <= tags, tags
    assert len(events.Scalars("train/loss")) == 6

    # resume from the step-3 checkpoint to step 8, then validate from the final checkpoint
    resumed = tmp_path / "resumed"
    _run("fit", "--config", "configs/demo_chameleons.yaml", "--trainer.max_steps", "8",
         "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(resumed),
         "--ckpt_path", str(run / "checkpoints" / "step=000003.ckpt"))
    assert (resumed / "demo_chameleons" / "version_0" / "adapter" / "adapter_model.safetensors").is_file()
    out = _run("validate", "--config", "configs/demo_chameleons.yaml", "--trainer.logger.init_args.save_dir",
               str(tmp_path / "v"), "--ckpt_path", str(run / "checkpoints" / "step=000006.ckpt"))
    assert "val/loss" in out


def test_mgm_demo_trains_checkpoints_resumes_and_its_loss_falls(tmp_path):
    out = _run("fit", "--config", "configs/demo.yaml", "--trainer.max_steps", "30", "--trainer.enable_progress_bar",
               "false", "--trainer.log_every_n_steps", "5", "--trainer.logger.init_args.save_dir", str(tmp_path))
    assert "projector + mining: 12,896 trainable / 12,896" in out and "vision towers: 0 trainable" in out
    assert not [n for n in NOTICES if n in out] and "Warning" not in out, out
    run = tmp_path / "demo" / "version_0"
    ckpt = run / "checkpoints" / "step=000030.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "non_lora_trainables.safetensors", "trainer_state.pt"]
    assert sorted(load_file(run / "adapter" / "non_lora_trainables.safetensors")) == sorted(
        load_file(ckpt / "non_lora_trainables.safetensors"))
    events = EventAccumulator(str(run))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses[-1] < 0.5 * losses[0], losses
    _run("fit", "--config", "configs/demo.yaml", "--trainer.max_steps", "32", "--trainer.enable_progress_bar",
         "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "resumed"), "--ckpt_path", str(ckpt))


def test_test_subcommand_scores_the_test_split_of_a_checkpoint(tmp_path, in_repo_root):
    """`test --ckpt_path` logs the token-weighted loss, its perplexity and the token accuracy of the test split.

    The reference is computed without mgmlora's evaluation code: the checkpoint's adapter loaded with plain PEFT and
    transformers' own causal-LM loss, per conversation, weighted by its supervised tokens.
    """
    import math

    from peft import PeftModel

    from mgmlora.batch import IGNORE_INDEX
    from mgmlora.cli import main
    from mgmlora.data.datamodule import ChatDataModule
    from tests.conftest import TOKENIZER, VAL, connect_data, tiny_model

    config = yaml.safe_load((ROOT / "configs" / "demo_chat.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    common = ["--config", str(tmp_path / "demo.yaml"), "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(tmp_path)]
    main(["fit", *common, "--trainer.max_steps", "1", "--trainer.accumulate_grad_batches", "1",
          "--trainer.limit_val_batches", "0"])
    ckpt = tmp_path / "demo_chat" / "version_0" / "checkpoints" / "step=000001.ckpt"
    cli = main(["test", *common, "--data.init_args.test_path", str(VAL), "--ckpt_path", str(ckpt)])
    metrics = {k: v.item() for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}

    model = PeftModel.from_pretrained(tiny_model(), ckpt).eval()  # demo_chat: tiny-qwen3, init_seed 0, float32
    data = connect_data(ChatDataModule(str(VAL), test_path=str(VAL), tokenizer_path=str(TOKENIZER), max_length=256))
    data.setup("test")
    loss_sum = n = correct = 0
    with torch.no_grad():
        for sample in data.splits["test"]:
            ids, labels = torch.tensor([sample.input_ids]), torch.tensor([sample.labels])
            out = model(input_ids=ids, labels=labels)  # transformers' mean over the shifted supervised labels
            keep = labels[0, 1:] != IGNORE_INDEX
            loss_sum += out.loss.item() * keep.sum().item()
            n += keep.sum().item()
            correct += (out.logits[0, :-1].argmax(-1)[keep] == labels[0, 1:][keep]).sum().item()
    assert n > 0 and len(data.splits["test"]) > 1
    assert metrics["test/loss"] == pytest.approx(loss_sum / n, rel=1e-5)
    assert metrics["test/ppl"] == pytest.approx(math.exp(loss_sum / n), rel=1e-5)
    assert metrics["test/token_acc"] == pytest.approx(correct / n, abs=1e-6)
    # the checkpoint's adapter is what was scored: the base model alone scores differently
    assert not math.isclose(metrics["test/loss"], _plain_loss(tiny_model(), data), rel_tol=1e-4)


def _plain_loss(model, data):
    """The same token-weighted loss for the base model without the trained adapter."""
    from mgmlora.batch import IGNORE_INDEX

    total = n = 0
    with torch.no_grad():
        for sample in data.splits["test"]:
            labels = torch.tensor([sample.labels])
            k = (labels[0, 1:] != IGNORE_INDEX).sum().item()
            total += model(input_ids=torch.tensor([sample.input_ids]), labels=labels).loss.item() * k
            n += k
    return total / n


def _fails(*args, cwd=ROOT):
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "main.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stderr.rstrip().splitlines()[-1], proc.stdout + proc.stderr


def test_main_fit_that_trains_nothing_exits_1_with_the_reason_and_no_adapter(tmp_path):
    code, last, out = _fails("fit", "--config", "configs/demo_chameleons.yaml", "--trainer.max_steps", "0",
                             "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir",
                             str(tmp_path))
    assert code == 1, out[-3000:]
    assert last == "error: the run trained nothing: trainer.max_steps is 0; no adapter was written.", out[-3000:]
    assert "Traceback" not in out and not list(tmp_path.rglob("adapter"))


def test_main_fit_whose_loss_diverges_exits_1_naming_the_step_and_keeps_only_finite_checkpoints(tmp_path):
    # lr 1e30: the first update makes the LoRA product overflow, so the next window's loss is not finite
    code, last, out = _fails("fit", "--config", "configs/demo_chameleons.yaml", "--trainer.max_steps", "6",
                             "--model.optim.lr", "1e30", "--model.optim.warmup_ratio", "0",
                             "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir",
                             str(tmp_path))
    assert code == 1, out[-3000:]
    assert last.startswith("error: optimizer step 2: train/"), out[-3000:]
    assert "Traceback" not in out and not list(tmp_path.rglob("adapter"))
    for weights in tmp_path.rglob("adapter_model.safetensors"):  # every checkpoint left is finite
        assert all(torch.isfinite(t).all() for t in load_file(weights).values()), weights


def test_a_compiled_checkpointed_moe_fit_with_split_expert_lora_compiles_its_layers(tmp_path):
    # transformers 5.25 checkpoints inside each layer's forward, where dynamo once broke the graph and ran every layer
    # eagerly; the run now says when torch.compile compiled nothing (mgmlora.training.fastpath.CompileWatch). Split
    # expert LoRA compiles with the rest of the layer (bf16, as on a GPU)
    out = _run("fit", "--config", "configs/demo_moe.yaml", "--trainer.max_steps", "2",
               "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.limit_val_batches", "0",
               "--model.speed.compile", "true", "--model.model.gradient_checkpointing", "true",
               "--model.model.dtype", "bfloat16", "--model.speed.expert_lora", "split")
    assert "expert LoRA split (frozen expert GEMM + LoRA GEMMs) in 2 MoE layers" in out, out[-3000:]
    assert "compiled (torch.compile): 2 decoder layers\n" in out, out[-3000:]  # whole: no experts left eager
    assert "compiled nothing" not in out and "graph break" not in out, out[-3000:]


@pytest.mark.parametrize(("args", "expected"), [
    (["fit", "--config", "x.yaml"], False), (["fit", "--print_config"], False), (["--hel"], False),
    (["fit", "--help"], True), (["-h"], True), (["fit", "--data.help", "ChameleonsDataModule"], True),
    (["fit", "--print_config=comments"], True), (["fit", "--print_config", "skip_null,comments"], True)])
def test_asks_for_help_by_hand(args, expected):
    from mgmlora.cli import asks_for_help

    assert asks_for_help(args) is expected


def test_a_run_reads_no_attribute_docstrings_and_help_still_shows_them(capsys, monkeypatch, in_repo_root):
    import docstring_parser.parser as parser

    from mgmlora.cli import main

    calls = []
    real = parser.add_attribute_docstrings
    monkeypatch.setattr(parser, "add_attribute_docstrings", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/demo_chat.yaml", "--print_config"])
    assert calls == []  # the source of every class in the parser is not parsed for a run
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert calls and "torch.compile the family's regions" in out  # SpeedSettings.compile's attribute docstring

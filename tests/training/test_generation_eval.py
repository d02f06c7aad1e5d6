"""GenerationEval in the real loop: scores, the TensorBoard table and images, checkpoint monitoring, ZeRO-3 refusal."""

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mgmlora.data.datamodule import ChatDataModule
from mgmlora.data.llava_datamodule import LlavaDataModule
from mgmlora.errors import UsageError
from mgmlora.models.args import ModelArgs
from mgmlora.models.generation import GenerationArgs, generate_batch
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.generation_eval import GenerationEval, markdown_table
from mgmlora.training.lora import LoraArgs
from mgmlora.training.module import LoraLitModule
from mgmlora.training.optim import OptimArgs
from mgmlora.training.text_metrics import GenerationMetrics
from tests.conftest import ASSETS, ROOT, TOKENIZER, TRAIN, VAL, load_script

LLAVA = ASSETS / "llava"


def _events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _trainer(tmp_path, callbacks, **kw):
    return L.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="run"), enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, plugins=[AdapterCheckpointIO()],
                     default_root_dir=tmp_path, callbacks=callbacks, **kw)


def test_mgm_validation_writes_scores_a_sample_table_and_images_that_match_direct_generation(tmp_path):
    module = LoraLitModule(ModelArgs(preset="tiny-mgm", tokenizer_path=str(ASSETS / "gemma_tokenizer"),
                                     dtype="float32", gradient_checkpointing=False), LoraArgs(preset="balanced"))
    data = LlavaDataModule(str(LLAVA / "llava_demo.json"), str(LLAVA), val_path=str(LLAVA / "llava_demo_val.json"),
                           eval_batch_size=8)
    data.connect(module.tokenizer, module.info)
    callback = GenerationEval(num_samples=3, seed=1, max_new_tokens=6, batch_size=2, table_rows=2)
    trainer = _trainer(tmp_path, [callback])
    trainer.validate(module, data)

    # the same three items asked directly (bin/generate.py's path), scored by a fresh metric set
    items = data.generation_subset("val", 3, 1, 6)
    assert len(items) == 3 and all(item.image for item in items)
    gen = GenerationArgs(max_new_tokens=6, do_sample=False, seed=1, batch_size=2)
    module.eval()
    preds = []
    for b in range(0, 3, 2):
        batch = items[b:b + 2]
        inputs = [data.item_inputs(item) for item in batch]
        replies = generate_batch(module.loaded.model, module.tokenizer, [i.prompt_ids for i in batch],
                                 GenerationArgs(**{**gen.__dict__, "seed": 1 + b}),
                                 {k: torch.stack([p[k] for p in inputs]) for k in ("images", "images_aux")})
        preds += [r[0].strip() for r in replies]
    expected = GenerationMetrics("vqa")
    expected.update(preds, [item.reference for item in items])
    scores = {k: v.item() for k, v in expected.compute().items()}

    acc = _events(trainer.logger.log_dir)
    for name, value in scores.items():
        logged = acc.Scalars(f"val_gen/{name}")
        assert len(logged) == 1 and logged[0].value == pytest.approx(value, abs=1e-6), name
    assert acc.Scalars("val_gen/time_s")[0].value > 0
    table = acc.Tensors("val_gen/samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table == markdown_table([(item.key, item.context, item.reference, pred)
                                    for item, pred in zip(items[:2], preds[:2])])
    assert sorted(acc.Tags()["images"]) == ["val_gen/image_0", "val_gen/image_1"]


@pytest.mark.integration
def test_fit_logs_val_gen_every_validation_model_checkpoint_monitors_it_and_test_logs_test_gen(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:8]))
    val.write_text("".join(VAL.read_text().splitlines(keepends=True)[:5]))
    module = LoraLitModule(ModelArgs(preset="tiny-qwen3", tokenizer_path=str(TOKENIZER), dtype="float32",
                                     gradient_checkpointing=False), LoraArgs(preset="conservative"),
                           OptimArgs(lr=0.05, warmup_ratio=0.0))
    data = ChatDataModule(str(train), val_path=str(val), test_path=str(val), batch_size=2, max_length=256)
    data.connect(module.tokenizer, module.info)
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", filename="{step}", monitor="val_gen/rougeL", mode="max",
                                 save_top_k=1)
    trainer = _trainer(tmp_path, [GenerationEval(num_samples=None, max_new_tokens=4, table_rows=1), checkpoint],
                       max_steps=4, val_check_interval=2, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, data)
    logged = _events(trainer.logger.log_dir).Scalars("val_gen/rougeL")
    assert [e.step for e in logged] == [1, 3]  # after optimizer steps 2 and 4 (Lightning logs step - 1)
    assert checkpoint.best_model_score.item() == pytest.approx(max(e.value for e in logged), abs=1e-6)
    assert {"val_gen/bleu4", "val_gen/chrf", "val_gen/exact_match", "val_gen/len_ratio"} <= set(
        trainer.callback_metrics)
    trainer.test(module, data)  # the same prompts as the test split: the trained model's scores under test_gen/
    assert trainer.callback_metrics["test_gen/rougeL"].item() == pytest.approx(logged[-1].value, abs=1e-6)


def test_bad_settings_are_one_line_usage_errors():
    with pytest.raises(UsageError, match="max_new_tokens"):
        GenerationEval(max_new_tokens=0)


def _ranks(tmp_path, devices, num_samples):
    out = tmp_path / f"{devices}_{num_samples}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "gen_eval_ranks.py"), str(out),
                           "--val_path", str(tmp_path / "val.jsonl"), "--devices", str(devices), "--num_samples",
                           str(num_samples)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.integration
def test_validate_on_two_gloo_ranks_scores_what_one_process_scores(tmp_path):
    """The callback's sharding in the real loop (no hang with shares of 2 and 1 items); the sync itself with scores
    that are all non-zero: tests/training/test_text_metrics.py."""
    script = load_script(ROOT / "tests" / "scripts" / "gen_eval_ranks.py")
    (tmp_path / "val.jsonl").write_text("".join(VAL.read_text().splitlines(keepends=True)[:6]))
    one, two = script.scores(str(tmp_path / "val.jsonl"), 1, 3), _ranks(tmp_path, 2, 3)
    scores = {k: v for k, v in one.items() if k != "val_gen/time_s"}
    assert set(scores) == {"val_gen/rougeL", "val_gen/bleu4", "val_gen/chrf", "val_gen/exact_match",
                           "val_gen/len_ratio"}
    assert scores["val_gen/len_ratio"] > 0  # something was generated and scored
    for name, value in scores.items():
        assert two[name] == pytest.approx(value, abs=1e-6), name


def test_zero3_is_refused_only_where_the_run_would_generate(tmp_path):
    """ZeRO-3 ranks would hang generating different lengths: refused at setup, not after hours of training."""
    from types import SimpleNamespace
    from unittest import mock

    trainer = SimpleNamespace(limit_val_batches=1.0, limit_test_batches=1.0,
                              datamodule=SimpleNamespace(splits={"val": [object()]}))
    with mock.patch("mgmlora.training.generation_eval.zero3_config", return_value={"zero_optimization": {}}):
        with pytest.raises(UsageError, match="ZeRO stage < 3"):
            GenerationEval().setup(trainer, None, "fit")
        GenerationEval(enabled=False).setup(trainer, None, "fit")
        GenerationEval().setup(SimpleNamespace(**{**vars(trainer), "limit_val_batches": 0}), None, "fit")
        GenerationEval().setup(trainer, None, "test")  # no test split
    GenerationEval().setup(trainer, None, "fit")  # ZeRO-2 or no DeepSpeed

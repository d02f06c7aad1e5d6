"""bin/score.py: predictions and scores of a trained checkpoint on a data file, resumed after an interruption."""

import json

import pytest
import yaml

from mgmlora.commands import score as score_cli
from mgmlora.errors import UsageError
from mgmlora.models.processor import stack_inputs
from mgmlora.tools.progress_file import ProgressMismatchError
from mgmlora.training.checkpoint import current_umask
from mgmlora.training.text_metrics import GenerationMetrics
from tests.conftest import VAL
from tests.tools.test_export import _train


@pytest.mark.integration
def test_score_writes_predictions_and_scores_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    ckpt, _ = _train(tmp_path / "run", "tiny-qwen3")
    data = tmp_path / "val.jsonl"
    data.write_text("".join(VAL.read_text().splitlines(keepends=True)[:6]))
    config = tmp_path / "data.yaml"  # the run was made without the CLI, so it has no config.yaml to read
    config.write_text(yaml.safe_dump({"data": {"class_path": "mgmlora.data.datamodule.ChatDataModule",
                                               "init_args": {"train_path": "unused.jsonl", "max_length": 256}}}))
    out = tmp_path / "scores" / "val.jsonl"
    args = ["--checkpoint", str(ckpt), "--data", str(data), "--output", str(out), "--data_config", str(config),
            "--max_new_tokens", "5", "--batch_size", "2", "--device", "cpu"]
    first = score_cli.main(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert first["items"] == len(rows) == 6 and first["generated_now"] == 6
    assert [r["key"] for r in rows] == [f"line {n}" for n in range(1, 7)]
    assert [r["reference"] for r in rows] == [json.loads(line)["messages"][-1]["content"].strip()
                                               for line in data.read_text().splitlines()]
    metrics = GenerationMetrics("text")  # the summary's scores, recomputed from the predictions file
    metrics.update([r["prediction"] for r in rows], [r["reference"] for r in rows])
    assert first["scores"] == pytest.approx({k: v.item() for k, v in metrics.compute().items()}, abs=1e-6)
    summary = json.loads((tmp_path / "scores" / "val.summary.json").read_text())
    assert summary["scores"] == first["scores"]

    assert sorted(p.name for p in out.parent.iterdir()) == ["val.jsonl", "val.summary.json"]  # no partial file
    assert {oct(p.stat().st_mode & 0o777) for p in out.parent.iterdir()} == {oct(0o666 & ~current_umask())}

    # interrupted after 2 items, the third line cut mid-write: a rerun generates only the other 4, to the same result
    import mgmlora.training.generation_eval as generation_eval

    calls = []

    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return stack_inputs(*args, **kwargs)

    # a finished run is not redone silently
    with pytest.raises(UsageError, match="exists and no progress file .* finished run's output"):
        score_cli.main(args)
    out.unlink()
    (tmp_path / "scores" / "val.summary.json").unlink()
    monkeypatch.setattr(generation_eval, "stack_inputs", interrupted)  # the one generation path (answer_items)
    with pytest.raises(KeyboardInterrupt):
        score_cli.main(args)
    monkeypatch.undo()
    progress = tmp_path / "scores" / "val.jsonl.partial.jsonl"
    lines = progress.read_text().splitlines(keepends=True)
    assert len(lines) == 1 + 2 and not out.exists()
    progress.write_text("".join(lines) + lines[1][:10])
    with pytest.raises(ProgressMismatchError, match="generation"):  # other settings: refused before loading
        score_cli.main(args[:-6] + ["--max_new_tokens", "6", "--batch_size", "2", "--device", "cpu"])
    again = score_cli.main(args)
    assert again["generated_now"] == 4 and again["resumed_from_progress"] == 2
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert again["scores"] == first["scores"]
    assert not progress.exists()


def test_the_datamodule_reads_the_data_file_as_its_test_split_and_refuses_unknown_settings():
    from mgmlora.errors import UsageError
    from mgmlora.tools.score import build_datamodule

    # the data section itself comes from mgmlora.tools.run_settings (tests/tools/test_run_settings.py checks it)
    section = {"class_path": "mgmlora.data.datamodule.ChatDataModule",
               "init_args": {"train_path": "t.jsonl", "max_length": 99}}
    dm = build_datamodule(section, "x.jsonl")
    assert (dm.hparams.test_path, dm.hparams.max_length) == ("x.jsonl", 99)
    section["init_args"]["max_lenght"] = 3
    with pytest.raises(UsageError, match=r"\['max_lenght'\] are not settings"):
        build_datamodule(section, "x.jsonl")


def test_scoring_validation_and_direct_generation_give_the_same_answers(tmp_path):
    """bin/score.py and GenerationEval answer through one path: the same items, batches and seeds give the same text."""
    import torch

    from mgmlora.data.datamodule import ChatDataModule
    from mgmlora.models.args import ModelArgs
    from mgmlora.models.generation import GenerationArgs, generate_batch
    from mgmlora.tools.score import score_items
    from mgmlora.training.generation_eval import GenerationEval
    from mgmlora.training.lora import LoraArgs
    from mgmlora.training.module import LoraLitModule
    from tests.conftest import TOKENIZER

    val = tmp_path / "val.jsonl"
    val.write_text("".join(VAL.read_text().splitlines(keepends=True)[:5]))
    module = LoraLitModule(ModelArgs(preset="tiny-qwen3", tokenizer_path=str(TOKENIZER), dtype="float32",
                                     gradient_checkpointing=False), LoraArgs(preset="conservative"))
    data = ChatDataModule(str(val), val_path=str(val), batch_size=2, max_length=256)
    data.connect(module.tokenizer, module.info)
    data.setup("validate")
    module.configure_model()  # the model Lightning would build
    items = data.generation_subset("val", None, 0, 4)
    gen = GenerationArgs(max_new_tokens=4, do_sample=False, seed=3, batch_size=2)
    module.eval()

    direct = []  # what the model answers asked batch by batch, each batch seeded seed + its first item's offset
    with torch.no_grad():
        for b in range(0, len(items), 2):
            batch = items[b:b + 2]
            replies = generate_batch(module.loaded.model, data.tokenizer, [i.prompt_ids for i in batch],
                                     GenerationArgs(**{**gen.__dict__, "seed": 3 + b}))
            direct += [data.reply_answer(r[0]) for r in replies]
    validation = GenerationEval(max_new_tokens=4, batch_size=2, seed=3).generate(module, data, items)
    score_items(module.loaded, data, items, tmp_path / "out.jsonl", {"test": 1}, gen, "text")
    scored = [json.loads(line)["prediction"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(items) == 5 and any(direct)
    assert validation == scored == direct

"""bin/score.py: predictions and scores of a trained checkpoint on a data file, resumed after an interruption."""

import json

import pytest
import yaml

from mgmlora.commands import score as score_cli
from mgmlora.tools.progress_file import ProgressMismatchError
from mgmlora.training.text_metrics import GenerationMetrics
from tests.conftest import VAL
from tests.tools.test_export import _train


@pytest.mark.integration
def test_score_writes_predictions_and_scores_and_resumes_after_an_interruption(tmp_path):
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

    # interrupted after 2 items, the third line cut mid-write: a rerun generates only the other 4, to the same result
    progress = tmp_path / "scores" / "val.jsonl.partial.jsonl"
    lines = progress.read_text().splitlines(keepends=True)
    progress.write_text("".join(lines[:3]) + lines[3][:10])
    out.unlink()
    again = score_cli.main(args)
    assert again["generated_now"] == 4 and again["resumed_from_progress"] == 2
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert again["scores"] == first["scores"]

    with pytest.raises(ProgressMismatchError, match="generation"):  # other settings: refused before loading
        score_cli.main(args[:-6] + ["--max_new_tokens", "6", "--batch_size", "2", "--device", "cpu"])


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

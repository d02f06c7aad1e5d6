"""Generation with the training prompts (mgmlora.tools.generate, bin/generate.py) and the Chameleons leaderboard."""

import errno
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mgmlora.batch import IMAGE_TOKEN_INDEX
from mgmlora.commands import generate as generate_cli
from mgmlora.data.chameleons_datamodule import PersonaEncoder
from mgmlora.errors import UsageError, run
from mgmlora.models.causal_lm import load_tokenizer
from mgmlora.models.mgm import MGMConfig
from mgmlora.models.mgm_checkpoint import build_mgm
from mgmlora.models.registry import MGM_PRESETS
from mgmlora.tools.export import build_trained_model, model_args_for, read_run_adapter
from mgmlora.tools.generate import GenerationArgs, generate_batch, left_pad
from mgmlora.tools.leaderboard import clean_reply, leaderboard_samples, output_files, predict_leaderboard
from tests.conftest import ASSETS, ROOT, tiny_model
from tests.tools.test_export import _train

GREEDY = GenerationArgs(max_new_tokens=6, do_sample=False, num_return_sequences=1)


def test_left_padded_batches_generate_what_single_prompts_generate(tokenizer):
    model = tiny_model("tiny-qwen3").eval()
    prompts = [[5, 17, 33, 48, 9, 70, 11, 12], [3, 44, 21]]
    ids, mask = left_pad(prompts, 0)
    assert mask.tolist()[1] == [0] * 5 + [1] * 3 and ids[1, -3:].tolist() == prompts[1]
    batched = generate_batch(model, tokenizer, prompts, GREEDY)
    single = [generate_batch(model, tokenizer, [p], GREEDY)[0] for p in prompts]
    assert batched == single


def test_mgm_generation_splices_the_image_and_continues_the_forward_pass():
    torch.manual_seed(0)
    model = build_mgm(MGMConfig.from_dict(MGM_PRESETS["tiny-mgm"]), torch.float32).eval()
    model.llm.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(0)
    images, aux = torch.randn(2, 3, 48, 48, generator=g), torch.randn(2, 3, 96, 96, generator=g)
    prompts = [[2, 5, IMAGE_TOKEN_INDEX, 7, 8, 9], [2, IMAGE_TOKEN_INDEX, 6]]
    ids, mask = left_pad(prompts, 0)
    # MGM's prepare_inputs expects right padding (training layout); generate() takes right-padded prompts
    right = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        right[b, :len(p)] = torch.tensor(p)
    right_mask = (right != 0).long()
    new = model.generate(right, right_mask, images, aux, max_new_tokens=4, do_sample=False, eos_token_id=[],
                         pad_token_id=0)
    assert new.shape == (2, 4)
    for b, p in enumerate(prompts):  # greedy first token == argmax of the training forward at the last position
        with torch.no_grad():
            logits = model(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), images=images[b:b + 1],
                           images_aux=aux[b:b + 1]).logits
        assert new[b, 0] == logits[0, -1].argmax()
        alone = model.generate(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), images[b:b + 1],
                               aux[b:b + 1], max_new_tokens=4, do_sample=False, eos_token_id=[], pad_token_id=0)
        assert torch.equal(alone[0], new[b])  # left padding inside the batch changes nothing


def test_clean_reply_keeps_the_answer_span_only():
    assert clean_reply("[ANSWER]\nHold fast.\n[/ANSWER]<|im_end|> trailing") == "Hold fast."
    assert clean_reply("no tags<end_of_turn>") == "no tags"


@pytest.fixture(scope="module")
def trained_qwen(tmp_path_factory):
    ckpt, adapter = _train(tmp_path_factory.mktemp("qwen"), "tiny-qwen3")
    return ckpt


def _leaderboard_file(tmp_path):
    """The bundled Chameleons sample without continuations, plus an empty-context item and one ending on the
    character's own line (both skipped by training extraction, both must be answered)."""
    records = json.loads((ASSETS / "chameleons_demo.json").read_text())
    for record in records:
        for collection in record["task"]["task_behavior_collections"]:
            for item in collection["data"]:
                item.pop("continuation", None)
    name = records[0]["user"]["profile"]["name"]
    records[0]["task"]["task_behavior_collections"][0]["data"] += [
        {"context": []}, {"context": [{"source": "OTTO", "content": "Hi."}, {"source": name, "content": "Aye."}]}]
    path = tmp_path / "test_leaderboard.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path, records


def _leaderboard_model(trained_qwen):
    """The trained tiny Qwen3 run as the leaderboard sees it: model, tokenizer and the Chameleons prompt encoder."""
    run = read_run_adapter(trained_qwen)
    args = model_args_for(run, dtype="float32")
    model = build_trained_model(run, args).model
    tokenizer = load_tokenizer(args)
    return model, tokenizer, PersonaEncoder(tokenizer, 512, "context_only", "system")


def _interrupted_after(monkeypatch, batches):
    """Makes the leaderboard's generation fail after `batches` more batches, as a killed run stops."""
    import mgmlora.tools.leaderboard as leaderboard

    calls = []

    def generate(*args, **kwargs):
        if len(calls) == batches:
            raise KeyboardInterrupt
        calls.append(1)
        return generate_batch(*args, **kwargs)

    monkeypatch.setattr(leaderboard, "generate_batch", generate)


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
def test_leaderboard_answers_every_item_in_order_and_resumes(tmp_path, trained_qwen, monkeypatch):
    path, records = _leaderboard_file(tmp_path)
    model, tokenizer, encoder = _leaderboard_model(trained_qwen)
    model.eval()
    gen = GenerationArgs(max_new_tokens=6, batch_size=4)
    out = tmp_path / "pred.json"
    total = len(leaderboard_samples(records, path))

    # interrupted after one batch (4 items), then a line cut mid-write, then interrupted after one more batch
    _interrupted_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        predict_leaderboard(model, tokenizer, encoder, path, out, gen, n=2)
    progress = tmp_path / "pred.json.partial.jsonl"
    header, *lines = progress.read_text().splitlines()
    assert json.loads(header)["settings"]["n"] == 2 and len(lines) == 4 and not out.exists()
    with progress.open("a") as f:
        f.write(lines[0][:10])  # what a kill in the middle of a write leaves
    _interrupted_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        predict_leaderboard(model, tokenizer, encoder, path, out, gen, n=2)
    readable = []
    for line in progress.read_text().splitlines():
        try:
            readable.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    assert len(readable) == 1 + 8  # header + one per item: the cut line stays alone, nothing glued onto it
    kept = {tuple(e["index"]): e["continuations"] for e in readable[1:]}

    # the rerun keeps those 8, makes the rest, and leaves the outputs alone (no partial file)
    monkeypatch.undo()
    summary = predict_leaderboard(model, tokenizer, encoder, path, out, gen, n=2)
    assert summary["resumed_from_progress"] == 8 and summary["generated_now"] == total - 8
    assert summary["data_items"] == total and summary["empty_context_items"] >= 1
    assert json.loads((tmp_path / "pred.summary.json").read_text())["generated_now"] == total - 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.json", "pred.summary.json", "test_leaderboard.json"]
    predicted = json.loads(out.read_text())
    for (r, c, i), continuations in kept.items():
        assert predicted[r]["task"]["task_behavior_collections"][c]["data"][i]["continuations"] == continuations
    items = [item for r in predicted for c in r["task"]["task_behavior_collections"] for item in c["data"]]
    assert len(items) == total and all(len(i["continuations"]) == 2 for i in items)
    assert all(isinstance(t, str) and "[ANSWER]" not in t for i in items for t in i["continuations"])
    for item in items:
        item.pop("continuations")
    assert predicted == records  # nothing dropped, reordered or changed


@pytest.mark.integration  # over 1 s: keeps the fast tier under CI's 2 minutes
def test_a_resumed_sampled_leaderboard_equals_the_unbroken_run(tmp_path, trained_qwen, monkeypatch):
    """Sampling with a seed is repeatable across an interruption: the resumed run keeps each batch's seed."""
    path, records = _leaderboard_file(tmp_path)
    model, tokenizer, encoder = _leaderboard_model(trained_qwen)
    model.eval()
    gen = GenerationArgs(max_new_tokens=6, batch_size=2, do_sample=True, seed=7)
    unbroken = predict_leaderboard(model, tokenizer, encoder, path, tmp_path / "a.json", gen, n=2)
    assert unbroken["generated_now"] > 4
    _interrupted_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        predict_leaderboard(model, tokenizer, encoder, path, tmp_path / "b.json", gen, n=2)
    monkeypatch.undo()
    resumed = predict_leaderboard(model, tokenizer, encoder, path, tmp_path / "b.json", gen, n=2)
    assert resumed["resumed_from_progress"] == 2
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads((tmp_path / "a.json").read_text())


@pytest.mark.integration
def test_generate_cli_answers_the_leaderboard(tmp_path, trained_qwen):
    path, _ = _leaderboard_file(tmp_path)
    summary = generate_cli.main(["--checkpoint", str(trained_qwen), "--chameleons", str(path), "--output",
                                 str(tmp_path / "p.json"), "--n", "3", "--max_new_tokens", "4", "--dtype", "float32",
                                 "--max_length", "512",
            "--ablation", "context_only", "--prompt_role", "system"])
    assert summary["continuations_per_item"] == 3 and summary["generated_now"] == summary["data_items"]


@pytest.mark.integration
def test_generate_cli_resumes_the_same_settings_and_refuses_others_before_loading_the_model(tmp_path, trained_qwen,
                                                                                            monkeypatch):
    from mgmlora.tools.leaderboard import ProgressMismatchError

    path, _ = _leaderboard_file(tmp_path)
    args = ["--checkpoint", str(trained_qwen), "--chameleons", str(path), "--output", str(tmp_path / "p.json"),
            "--max_new_tokens", "2", "--dtype", "float32", "--max_length", "512",
            "--ablation", "context_only", "--prompt_role", "system"]
    _interrupted_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        generate_cli.main(args + ["--n", "2"])
    monkeypatch.undo()
    progress = tmp_path / "p.json.partial.jsonl"
    held = len(progress.read_text().splitlines()) - 1  # the settings line, then one line per finished item
    assert held > 0

    def no_loading(*_, **__):
        raise AssertionError("the model was loaded before the progress file was checked")

    monkeypatch.setattr(generate_cli, "build_trained_model", no_loading)
    with pytest.raises(ProgressMismatchError, match="n: 2 there, 3 now"):
        generate_cli.main(args + ["--n", "3"])
    monkeypatch.undo()
    again = generate_cli.main(args + ["--n", "2"])  # the command's settings are the ones the library recorded
    assert again["resumed_from_progress"] == held and again["generated_now"] == again["data_items"] - held
    assert not progress.exists()


@pytest.mark.integration
def test_mgm_smoke_inference_answers_a_question_about_a_bundled_image(tmp_path):
    ckpt, adapter = _train(tmp_path, "tiny-mgm")
    image = sorted((ASSETS / "llava" / "images").iterdir())[0]
    replies = generate_cli.main(["--checkpoint", str(adapter), "--prompt", "What is in the picture?", "--image",
                                 str(image), "--max_new_tokens", "5", "--num_return_sequences", "2",
                                 "--dtype", "float32"])
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_generation_config_files_parse_and_reject_typos(tmp_path):
    for path in sorted((ROOT / "configs" / "generate").glob("*.yaml")):
        args = generate_cli.generation_args(path, {})
        assert isinstance(args, GenerationArgs) and args.max_new_tokens > 0
        assert "python bin/generate.py" in path.read_text().split("\n\n")[0]
    assert generate_cli.generation_args(path, {"temperature": 0.3}).temperature == 0.3
    bad = tmp_path / "bad.yaml"
    bad.write_text("temprature: 0.3\n")
    with pytest.raises(ValueError, match="temprature"):
        generate_cli.generation_args(bad, {})


def test_greedy_decoding_with_several_replies_is_a_clear_error():
    with pytest.raises(ValueError, match="do_sample true"):
        GenerationArgs(do_sample=False, num_return_sequences=5)


def test_a_progress_file_made_with_other_settings_is_refused_not_merged(tmp_path, trained_qwen, monkeypatch):
    from mgmlora.tools.leaderboard import ProgressMismatchError

    path, records = _leaderboard_file(tmp_path)
    model, tokenizer, encoder = _leaderboard_model(trained_qwen)
    gen, out = GenerationArgs(max_new_tokens=3, batch_size=2), tmp_path / "pred.json"
    with pytest.raises(ValueError, match="n .*>= 1"):
        predict_leaderboard(model.eval(), tokenizer, encoder, path, out, gen, n=0)
    assert not out.exists() and not (tmp_path / "pred.json.partial.jsonl").exists()
    _interrupted_after(monkeypatch, 1)  # a progress file that a rerun would resume
    with pytest.raises(KeyboardInterrupt):
        predict_leaderboard(model, tokenizer, encoder, path, out, gen, n=1, checkpoint=trained_qwen)
    monkeypatch.undo()
    progress = (tmp_path / "pred.json.partial.jsonl").read_text()
    assert len(progress.splitlines()) == 1 + 2
    for change, message in ((dict(n=2), "n: 1 there, 2 now"), (dict(gen=replace(gen, temperature=0.3)), "generation"),
                            (dict(checkpoint=tmp_path), "adapter_sha256")):
        kwargs = dict(n=1, gen=gen, checkpoint=trained_qwen) | change
        with pytest.raises(ProgressMismatchError, match=message):
            predict_leaderboard(model, tokenizer, encoder, path, out, **kwargs)
    assert (tmp_path / "pred.json.partial.jsonl").read_text() == progress  # untouched
    assert not out.exists()
    # the same settings resume, and a progress file without settings is refused
    summary = predict_leaderboard(model, tokenizer, encoder, path, out, gen, n=1, checkpoint=trained_qwen)
    assert summary["resumed_from_progress"] == 2 and summary["generated_now"] == summary["data_items"] - 2
    items = [i for r in json.loads(out.read_text()) for c in r["task"]["task_behavior_collections"] for i in c["data"]]
    assert {len(i["continuations"]) for i in items} == {1}
    (tmp_path / "pred.json.partial.jsonl").write_text("\n".join(progress.splitlines()[1:]) + "\n")
    with pytest.raises(ProgressMismatchError, match="does not record the settings"):
        predict_leaderboard(model, tokenizer, encoder, path, out, gen, n=1, checkpoint=trained_qwen)


def test_resumable_outputs_are_bound_to_the_adapters_content_not_its_path(tmp_path, trained_qwen):
    import shutil

    from mgmlora.tools.leaderboard import run_settings
    from mgmlora.tools.progress_file import adapter_digest

    def settings(checkpoint):
        return run_settings("in.json", 1, GenerationArgs(max_new_tokens=3), "full", "user", 64, True, False, 15,
                            checkpoint)

    moved = tmp_path / "moved"
    shutil.copytree(trained_qwen, moved)
    assert settings(moved) == settings(trained_qwen)  # the same adapter elsewhere resumes the same file
    weights = next(p for p in ("adapter_model.safetensors", "non_lora_trainables.safetensors") if (moved / p).is_file())
    data = bytearray((moved / weights).read_bytes())
    data[-1] ^= 1  # another model in the same directory (retrained, re-exported)
    (moved / weights).write_bytes(bytes(data))
    assert adapter_digest(moved) != adapter_digest(trained_qwen)
    assert settings(moved)["adapter_sha256"] != settings(trained_qwen)["adapter_sha256"]


@pytest.mark.integration
def test_generate_cli_refuses_a_non_image_and_a_symlink_loop_as_one_line(tmp_path):
    _, adapter = _train(tmp_path, "tiny-mgm")
    (tmp_path / "notes.png").write_text("these are notes, not pixels\n")
    os.symlink(tmp_path / "loop_b.png", tmp_path / "loop_a.png")
    os.symlink(tmp_path / "loop_a.png", tmp_path / "loop_b.png")
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file() and not p.is_symlink()}
    for name, reason in [("notes.png", "not an image Pillow can read"), ("loop_a.png", "a symlink loop")]:
        proc = subprocess.run([sys.executable, str(ROOT / "bin" / "generate.py"), "--checkpoint", str(adapter),
                               "--prompt", "What is in the picture?", "--image", str(tmp_path / name),
                               "--max_new_tokens", "2", "--dtype", "float32", "--device", "cpu"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 1, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last == f"error: --image {str(tmp_path / name)!r}: it is {reason}" + last.split(reason, 1)[1], last
        assert "Traceback" not in proc.stderr and last.endswith("pass a readable image file (PNG, JPEG, ...).")
    assert before == {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.mark.integration
def test_generate_cli_on_a_full_disk_exits_1_with_one_line_and_keeps_every_earlier_file(tmp_path, trained_qwen,
                                                                                        monkeypatch, capsys):
    path, _ = _leaderboard_file(tmp_path)
    out = tmp_path / "p.json"
    (tmp_path / "notes.txt").write_text("an earlier file\n")
    before = {p: p.read_bytes() for p in sorted(tmp_path.iterdir()) if p.is_file()}
    real = Path.write_bytes

    def full(self, data):
        if self.name == f".{out.name}.tmp":  # the final predictions file fills the disk
            real(self, data[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    monkeypatch.setattr(sys, "argv", ["generate.py"])  # run() rewrites sys.argv as the tool's command line
    args = ["--checkpoint", str(trained_qwen), "--chameleons", str(path), "--output", str(out), "--n", "1",
            "--max_new_tokens", "2", "--dtype", "float32", "--max_length", "512",
            "--ablation", "context_only", "--prompt_role", "system"]
    with pytest.raises(SystemExit) as exited:
        run(generate_cli.main, args)
    assert exited.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {out}: disk full after 10 bytes written (it needs at least ")
    assert "Traceback" not in "\n".join(lines)
    after = {p: p.read_bytes() for p in sorted(tmp_path.iterdir()) if p.is_file()}
    progress = output_files(out)["progress file"]
    assert {p: b for p, b in after.items() if p != progress} == before  # no output, no temporary file, inputs kept
    assert len(progress.read_text().splitlines()) > 1  # the generated entries stay for a rerun to resume from


def test_leaderboard_without_the_runs_data_settings_is_refused_not_answered_with_defaults(tmp_path, trained_qwen,
                                                                                          monkeypatch):
    """A checkpoint or the run's adapter/ copied away from its run: the training prompts are unknown."""
    path, _ = _leaderboard_file(tmp_path)
    monkeypatch.setattr(generate_cli, "build_trained_model", lambda *_, **__: pytest.fail("loaded the model"))
    args = ["--checkpoint", str(trained_qwen), "--chameleons", str(path), "--output", str(tmp_path / "p.json")]
    with pytest.raises(UsageError, match="no data settings of the run.*pass --ablation, --prompt_role, --max_length"):
        generate_cli.main(args)
    with pytest.raises(UsageError, match="pass --prompt_role$|pass --prompt_role \\("):
        generate_cli.main(args + ["--ablation", "profile_only", "--max_length", "512"])
    assert not list(tmp_path.glob("p.*"))

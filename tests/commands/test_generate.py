"""`mgmlora generate` checks every input and output before any model loads (mgmlora.commands.generate)."""

import pytest

from mgmlora.commands import generate
from mgmlora.errors import UsageError
from tests.conftest import ASSETS


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the command gets as far as loading a model (or reading the checkpoint, where named)."""
    def fail(*_, **__):
        pytest.fail("the model was loaded before the inputs were checked")

    monkeypatch.setattr(generate, "build_trained_model", fail)
    return fail


@pytest.mark.parametrize("name,reason", [("cat.jpg", "the file does not exist"),
                                         ("notes.png", "it is not an image Pillow can read")])
def test_a_missing_or_unreadable_image_is_refused_before_the_checkpoint_is_read(tmp_path, no_loading, monkeypatch,
                                                                                name, reason):
    from mgmlora.data.images import ImageLoadError

    (tmp_path / "notes.png").write_text("notes, not pixels")
    monkeypatch.setattr(generate, "read_run_adapter", no_loading)
    with pytest.raises(ImageLoadError, match=rf"^--image '.*{name}': {reason}"):
        generate.main(["--checkpoint", str(tmp_path), "--prompt", "What is it?", "--image", str(tmp_path / name)])


def test_an_image_for_a_text_only_model_is_refused_before_the_model_loads(tiny_checkpoint, no_loading):
    image = sorted((ASSETS / "llava" / "images").iterdir())[0]
    with pytest.raises(UsageError, match="--image needs an image-text model; tiny-qwen3 is text only"):
        generate.main(["--checkpoint", str(tiny_checkpoint), "--prompt", "What is it?", "--image", str(image)])


@pytest.mark.parametrize("argv,message", [
    ([], "pass exactly one of --prompt"),
    (["--prompt", "a", "--chameleons", "t.json"], "pass exactly one of --prompt"),
    (["--chameleons", "{leaderboard}"], "--chameleons needs --output"),
    (["--chameleons", "{tmp}/missing.json", "--output", "{tmp}/p.json"], "--chameleons '.*missing.json' is not a file"),
])
def test_a_command_that_cannot_work_is_refused_first(argv, message, tmp_path, no_loading, monkeypatch):
    monkeypatch.setattr(generate, "read_run_adapter", no_loading)
    leaderboard = tmp_path / "test.json"
    leaderboard.write_text("[]")
    argv = [a.format(tmp=tmp_path, leaderboard=leaderboard) for a in argv]
    with pytest.raises(UsageError, match=message):
        generate.main(["--checkpoint", str(tmp_path), *argv])


class ReadTheCheckpoint(Exception):
    """The command got past its checks of the command line."""


def test_an_existing_output_is_not_overwritten_without_overwrite(tmp_path, no_loading, monkeypatch):
    def read(*_):
        raise ReadTheCheckpoint

    monkeypatch.setattr(generate, "read_run_adapter", read)
    leaderboard, output = tmp_path / "test.json", tmp_path / "predictions.json"
    leaderboard.write_text("[]")
    output.write_text("the user's own predictions")
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--chameleons", str(leaderboard), "--output", str(output)]
    with pytest.raises(UsageError, match="exists and no progress file .* not a run to resume: pass --overwrite"):
        generate.main(argv)
    assert output.read_text() == "the user's own predictions"
    with pytest.raises(ReadTheCheckpoint):  # with --overwrite the command goes on to the run
        generate.main([*argv, "--overwrite"])


def test_a_prompt_longer_than_the_runs_length_is_refused_before_the_model_loads(tiny_checkpoint, monkeypatch):
    from transformers import AutoTokenizer

    from tests.conftest import TOKENIZER

    class Loaded(Exception):
        """The command went on to load the model."""

    def load(*_, **__):
        raise Loaded

    monkeypatch.setattr(generate, "build_trained_model", load)
    prompt = "tell me about it " * 10
    chat = [{"role": "user", "content": prompt}]
    n = len(AutoTokenizer.from_pretrained(TOKENIZER).apply_chat_template(  # the template's count, not mgmlora's
        chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    args = ["--checkpoint", str(tiny_checkpoint), "--prompt", prompt, "--max_new_tokens", "8"]
    with pytest.raises(UsageError, match=rf"^--prompt takes {n} positions .*--max_new_tokens 8 that passes the "
                                         rf"run's max_length {n + 7}: shorten"):
        generate.main([*args, "--max_length", str(n + 7)])
    with pytest.raises(Loaded):  # exactly fits
        generate.main([*args, "--max_length", str(n + 8)])

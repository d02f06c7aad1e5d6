"""The bin/ tools refuse destructive output paths and nonsensical counts before any work (mgmlora.tools.args)."""

import hashlib
import importlib.util
import shutil
from argparse import ArgumentError

import pytest
from peft import LoraConfig, get_peft_model

from mgmlora.tools.args import OutputPathError, refuse_overwrite
from tests.conftest import ASSETS, TOKENIZER, tiny_model


def _tool(name):
    return importlib.import_module(f"mgmlora.commands.{name}")


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def base_and_adapter(tmp_path):
    """A local base model directory (weights + tokenizer) and a PEFT adapter trained on nothing, made for it."""
    base = tmp_path / "base"
    model = tiny_model()
    model.save_pretrained(base)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, base / f.name)
    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    return base, adapter


def test_merge_refuses_to_write_into_the_base_model_and_leaves_it_intact(tmp_path, base_and_adapter):
    export_cli = _tool("export")
    base, adapter = base_and_adapter
    before = _digest(base)
    for output in (base, base / "merged", tmp_path / "x" / ".." / "base"):
        with pytest.raises(OutputPathError, match="--model_path"):
            export_cli.main(["--checkpoint", str(adapter), "--output", str(output), "--merge", "--model_path",
                             str(base), "--dtype", "float32"])
    assert _digest(base) == before and not (base / "merged").exists()
    with pytest.raises(OutputPathError, match="--checkpoint"):  # exporting an adapter onto itself
        export_cli.main(["--checkpoint", str(adapter), "--output", str(adapter)])
    # a path beside the base is fine: the merge runs
    out = export_cli.main(["--checkpoint", str(adapter), "--output", str(tmp_path / "merged"), "--merge",
                           "--model_path", str(base), "--dtype", "float32"])
    assert (out / "config.json").is_file() and _digest(base) == before


def test_sample_chameleons_refuses_to_sample_a_file_onto_itself(tmp_path):
    sampler = _tool("sample_chameleons")
    data = tmp_path / "train.json"
    shutil.copy(ASSETS / "chameleons_demo.json", data)
    before = data.read_bytes()
    for output in (data, tmp_path / "sub" / ".." / "train.json"):
        with pytest.raises(OutputPathError, match="INPUT"):
            sampler.main([str(data), str(output), "--max_data_items", "1"])
    assert data.read_bytes() == before
    with pytest.raises(ArgumentError, match="max_data_items"):  # jsonargparse: not a PositiveInt
        sampler.main([str(data), str(tmp_path / "out.json"), "--max_data_items", "0"])
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("flag,value", [("--n", "0"), ("--n", "-2"), ("--max_new_tokens", "0"),
                                        ("--batch_size", "0"), ("--max_length", "0"), ("--top_k", "-1")])
def test_generate_refuses_invalid_counts_before_loading_anything(tmp_path, capsys, flag, value):
    # the checkpoint does not exist: reaching the loading stage would raise FileNotFoundError instead
    with pytest.raises(ArgumentError, match=f'"{flag[2:]}"'):
        _tool("generate").main(["--checkpoint", str(tmp_path / "missing"), "--chameleons", str(tmp_path / "t.json"),
                                "--output", str(tmp_path / "p.json"), flag, value])


def test_generate_refuses_an_output_that_is_an_input(tmp_path):
    test = tmp_path / "p.summary.json"
    test.write_text("[]")
    generate_cli = _tool("generate")
    # the output itself, the summary written beside --output p.json, and a file inside the checkpoint
    for output, message in ((test, "--output .* is the input --chameleons"),
                            (tmp_path / "p.json", "summary file .* is the input --chameleons"),
                            (tmp_path / "ckpt" / "q.json", "inside the input --checkpoint")):
        with pytest.raises(OutputPathError, match=message):
            generate_cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--chameleons", str(test), "--output",
                               str(output)])
    assert test.read_text() == "[]"


def test_refuse_overwrite_compares_resolved_paths(tmp_path):
    refuse_overwrite({"--output": tmp_path / "a"}, files={"in": tmp_path / "b"}, folders={"dir": tmp_path / "c"})
    (tmp_path / "c").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "c")
    with pytest.raises(OutputPathError, match="inside the input dir"):
        refuse_overwrite({"--output": tmp_path / "link" / "x"}, folders={"dir": tmp_path / "c"})
    with pytest.raises(OutputPathError, match="is the input in"):
        refuse_overwrite({"--output": tmp_path / "c" / ".." / "b"}, files={"in": tmp_path / "b"})


def test_export_with_overwrite_refuses_an_output_that_holds_its_checkpoint_or_base(tmp_path, base_and_adapter):
    """--overwrite replaces --output whole: a directory above an input would take the input with it."""
    export_cli = _tool("export")
    base, adapter = base_and_adapter
    before_base, before_adapter = _digest(base), _digest(adapter)
    with pytest.raises(OutputPathError, match="holds the input --checkpoint"):
        export_cli.main(["--checkpoint", str(adapter), "--output", str(tmp_path), "--overwrite"])
    with pytest.raises(OutputPathError, match="holds the input (--checkpoint|--model_path)"):
        export_cli.main(["--checkpoint", str(adapter), "--output", str(tmp_path), "--overwrite", "--merge",
                         "--model_path", str(base), "--dtype", "float32"])
    assert _digest(base) == before_base and _digest(adapter) == before_adapter
    with pytest.raises(OutputPathError, match="holds the input in"):
        refuse_overwrite({"--output": tmp_path}, files={"in": tmp_path / "sub" / "f.json"})

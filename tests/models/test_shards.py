import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mgmlora.models.shards import INDEX, safetensors_files, write_index, write_sharded


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(16, 8, generator=g), "b.weight": torch.randn(16, 8, generator=g).bfloat16(),
            "c.bias": torch.arange(5, dtype=torch.int64), "d.big": torch.randn(64, 8, generator=g)}


def _read_back(directory):
    index = json.loads((directory / INDEX).read_text())
    back = {}
    for name in sorted(set(index["weight_map"].values())):
        part = load_file(directory / name)
        assert {k for k, v in index["weight_map"].items() if v == name} == set(part)  # the index names its keys
        back.update(part)
    return index, back


@pytest.mark.parametrize("max_shard_bytes", [600, 10**9])
def test_sharded_directory_holds_every_tensor_once_and_the_index_names_each(tmp_path, max_shard_bytes):
    tensors = _tensors()
    write_sharded(tmp_path, tensors, max_shard_bytes)
    index, back = _read_back(tmp_path)
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value)
    # 512 + 256 + 40 + 2048 bytes of tensor data
    assert index["metadata"]["total_size"] == 16 * 8 * 4 + 16 * 8 * 2 + 5 * 8 + 64 * 8 * 4
    files = sorted(p.name for p in tmp_path.iterdir())
    if max_shard_bytes == 600:  # d.big alone exceeds the limit and gets a shard of its own
        assert len(files) > 2 and all(f.startswith("model-0000") for f in files if f != INDEX)
    else:
        assert files == ["model.safetensors", INDEX]


def test_index_of_a_one_file_checkpoint_written_elsewhere(tmp_path):
    save_file({"x": torch.zeros(3, 2), "y": torch.ones(4, dtype=torch.float16)}, tmp_path / "model.safetensors")
    write_index(tmp_path)
    index = json.loads((tmp_path / INDEX).read_text())
    assert index == {"metadata": {"total_size": 3 * 2 * 4 + 4 * 2},
                     "weight_map": {"x": "model.safetensors", "y": "model.safetensors"}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", INDEX]  # no temporary file left


def test_every_reader_finds_each_key_in_its_file_sharded_or_not(tmp_path):
    tensors = _tensors()
    write_sharded(tmp_path / "sharded", tensors, 600)
    files = safetensors_files(tmp_path / "sharded")
    assert set(files) == set(tensors)
    for key, path in files.items():
        assert key in load_file(path)
    (tmp_path / "one").mkdir()
    save_file(tensors, tmp_path / "one" / "model.safetensors")  # no index: the file's header says
    assert safetensors_files(tmp_path / "one") == dict.fromkeys(tensors, tmp_path / "one" / "model.safetensors")
    (tmp_path / "empty").mkdir()
    assert safetensors_files(tmp_path / "empty") is None
    sorted(files.values())[0].unlink()
    with pytest.raises(FileNotFoundError, match="names shards that are missing: \\['model-00001-of"):
        safetensors_files(tmp_path / "sharded")

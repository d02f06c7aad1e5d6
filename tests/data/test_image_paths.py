"""A data file's image paths stay inside the image folder: `..`, absolute and symlinked escapes are refused."""

import os

import pytest

from mgmlora.data.images import ImagePathError, image_path
from mgmlora.errors import classify
from tests.data.test_images import _datamodule_at, _records


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "images" / "sub" / "a.png").write_bytes(b"")
    (tmp_path / "secret.txt").write_text("not an image")
    os.symlink(tmp_path / "secret.txt", tmp_path / "images" / "out.png")  # a link out of the folder
    os.symlink(tmp_path / "images" / "sub" / "a.png", tmp_path / "images" / "in.png")  # a link that stays inside
    os.symlink(tmp_path / "images" / "loop1", tmp_path / "images" / "loop2")
    os.symlink(tmp_path / "images" / "loop2", tmp_path / "images" / "loop1")
    return tmp_path / "images"


@pytest.mark.parametrize(("name", "message"), [
    ("../secret.txt", "contains '..'"),
    ("sub/../../secret.txt", "contains '..'"),
    ("/etc/passwd", "is an absolute path"),
    ("out.png", "outside the image folder"),
    ("loop1", "cannot be resolved"),
    ("", "non-empty relative path"),
])
def test_an_image_path_leaving_the_folder_is_refused_naming_the_record(folder, name, message):
    with pytest.raises(ImagePathError, match=message) as refused:
        image_path(folder, name, "train.json: record 3 (id='x7')")
    assert str(refused.value).startswith("train.json: record 3 (id='x7'): ")
    assert classify(refused.value) == ("user", 1) and "\n" not in str(refused.value)


def test_paths_inside_the_folder_pass(folder):
    assert image_path(folder, "sub/a.png", "r") == folder / "sub" / "a.png"
    assert image_path(folder, "in.png", "r") == folder / "in.png"  # a symlink that stays inside


def test_llava_setup_refuses_an_escaping_record_before_opening_any_image(tmp_path):
    (tmp_path / "outside.png").write_bytes(b"")
    (tmp_path / "data").mkdir()
    records = _records(tmp_path / "data", image="../outside.png")
    with pytest.raises(ImagePathError, match=r"record 1 \(id=.*\): image '\.\./outside\.png' contains '\.\.'"):
        _datamodule_at(tmp_path / "data", records)  # sets up the fit splits

"""Image loading: every common mode to RGB by the documented rule, and bad images caught at set-up, by record."""

import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mgmlora.data.images import ImageLoadError, load_image, load_rgb
from mgmlora.errors import classify
from tests.data.test_llava import LLAVA, _datamodule

GOOD = "images/00_blue_circle.png"


def _rgb(path) -> np.ndarray:
    return np.asarray(load_rgb(path), dtype=np.int32)


def _composite(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha over white, per channel (the documented background)."""
    a = alpha[..., None] / 255.0
    return np.round(colour * a + 255.0 * (1 - a))


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1)


def _case(mode: str, tmp_path):
    """(file, expected (H, W, 3) uint8 values) for an image of `mode`, built here; expectations in numpy."""
    rng = np.random.default_rng(0)
    if mode == "I;16":  # a full 16-bit gradient: the old conversion turned everything above 255 white
        a = np.linspace(0, 65535, 64 * 8).astype(np.uint16).reshape(8, 64)
        img, expected = Image.fromarray(a), _grey(np.round(a / 65535 * 255))
    elif mode == "I":
        a = np.linspace(0, 65535, 64 * 8).astype(np.int32).reshape(8, 64)
        img, expected = Image.fromarray(a, mode="I"), _grey(np.round(a / 65535 * 255))
    elif mode == "F":
        a = np.linspace(-0.25, 1.25, 64 * 8, dtype=np.float32).reshape(8, 64)
        img, expected = Image.fromarray(a, mode="F"), _grey(np.round(np.clip(a, 0, 1) * 255))
    elif mode == "CMYK":
        a = rng.integers(0, 256, (8, 16, 4), dtype=np.uint8)
        c, k = a[..., :3].astype(float), a[..., 3:].astype(float)
        img, expected = Image.fromarray(a, mode="CMYK"), np.round((255 - c) * (255 - k) / 255)
    elif mode == "P":
        palette = np.array([[255, 0, 0], [0, 128, 255], [10, 20, 30]], dtype=np.uint8)
        idx = rng.integers(0, 3, (8, 16), dtype=np.uint8)
        img = Image.fromarray(idx, mode="P")
        img.putpalette(palette.flatten().tolist())
        img.info["transparency"] = 2  # index 2 is transparent -> white
        expected = np.where((idx == 2)[..., None], 255, palette[idx])
    elif mode == "LA":
        a = rng.integers(0, 256, (8, 16, 2), dtype=np.uint8)
        img, expected = Image.fromarray(a, mode="LA"), _grey(_composite(a[..., :1].astype(float), a[..., 1])[..., 0])
    elif mode == "RGBA":
        a = rng.integers(0, 256, (8, 16, 4), dtype=np.uint8)
        img, expected = Image.fromarray(a, mode="RGBA"), _composite(a[..., :3].astype(float), a[..., 3])
    elif mode == "L+tRNS":  # greyscale PNG whose value 0 is the transparent colour key
        grey = rng.integers(0, 4, (8, 16), dtype=np.uint8) * 60
        img = Image.fromarray(grey, mode="L")
        img.info["transparency"] = 0
        expected = _grey(np.where(grey == 0, 255, grey))
    elif mode == "1":
        bits = rng.integers(0, 2, (8, 16)).astype(bool)
        img, expected = Image.fromarray(bits), _grey(bits * 255)
    else:
        raise AssertionError(mode)
    path = tmp_path / f"{mode.replace(';', '_').replace('+', '_')}.{'tif' if mode in ('F', 'I', 'CMYK') else 'png'}"
    img.save(path, **({"transparency": 0} if mode == "L+tRNS" else {}))
    assert Image.open(path).mode == mode.split("+")[0]  # the file really holds that mode
    return path, expected


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "CMYK", "P", "LA", "RGBA", "L+tRNS", "1"])
def test_every_common_mode_converts_to_rgb_by_the_documented_rule(tmp_path, mode):
    path, expected = _case(mode, tmp_path)
    got = _rgb(path)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1, mode  # rounding of Pillow's integer arithmetic


def _corrupt_png(good, out):
    """A copy of `good` whose compressed pixel data is garbage, with every chunk checksum recomputed (valid)."""
    data = good.read_bytes()
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            body = body[:2] + bytes((b * 7 + 3) % 256 for b in body[2:])  # keep the zlib header, break the stream
        chunks.append(struct.pack(">I4s", len(body), kind) + body + struct.pack(">I", zlib.crc32(kind + body)))
        pos += 12 + length
    out.write_bytes(data[:8] + b"".join(chunks))
    with Image.open(out) as img:
        img.verify()  # checksums are fine: only decoding finds the problem


def _records(tmp_path, image="images/bad.png"):
    records = [json.loads(json.dumps(r)) for r in json.loads((LLAVA / "llava_demo.json").read_text())[:3]]
    assert all("image" in r for r in records)
    records[1]["image"] = image
    (tmp_path / "images").mkdir(exist_ok=True)
    return records


def _datamodule_at(tmp_path, records, **kwargs):
    """_datamodule with the image folder in tmp_path (a copy of the bundled images plus what the test adds)."""
    for r in records:
        if not (tmp_path / r["image"]).exists() and (LLAVA / r["image"]).exists():
            shutil.copy(LLAVA / r["image"], tmp_path / r["image"])
    return _datamodule(tmp_path, records, image_folder=str(tmp_path), **kwargs)


def test_a_corrupt_pixel_stream_is_an_error_at_setup_naming_file_record_and_fix(tmp_path):
    records = _records(tmp_path)
    _corrupt_png(LLAVA / GOOD, tmp_path / "images" / "bad.png")
    with pytest.raises(OSError, match=r"train.json: record 1 \(id='img-01'\): image .*bad.png.*skip_bad_images"):
        _datamodule_at(tmp_path, records)


def test_a_corrupt_pixel_stream_is_skipped_counted_and_named_with_skip_bad_images(tmp_path):
    records = _records(tmp_path)
    _corrupt_png(LLAVA / GOOD, tmp_path / "images" / "bad.png")
    with pytest.warns(UserWarning, match=r"skipped 1 record\(s\) whose image.*record 1 \(id='img-01'\)"):
        dm = _datamodule_at(tmp_path, records, skip_bad_images=True)
    assert dm.stats["train:samples"] == 2 and dm.stats["train:skipped_bad_image"] == 1
    assert all(s.meta["id"] != "img-01" for s in dm.splits["train"])
    for i in range(2):  # what is left trains
        dm._dataset(dm.splits["train"])[i]


def test_an_image_that_breaks_after_setup_names_its_record_in_training(tmp_path):
    records = _records(tmp_path, image="images/later.png")
    shutil.copy(LLAVA / GOOD, tmp_path / "images" / "later.png")
    dm = _datamodule_at(tmp_path, records)
    index = next(i for i, s in enumerate(dm.splits["train"]) if s.meta["id"] == "img-01")
    _corrupt_png(LLAVA / GOOD, tmp_path / "images" / "later.png")
    with pytest.raises(OSError, match=r"train.json: record 1 \(id='img-01'\): image .*later.png.* during training"):
        dm._dataset(dm.splits["train"])[index]


@pytest.mark.parametrize("side", [80, 150])  # 6,400 px: Pillow's warning band (1-2x the limit); 22,500: its error
def test_an_image_over_the_pixel_limit_names_size_limit_record_and_key(tmp_path, monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    records = _records(tmp_path)
    Image.new("RGB", (side, side), (200, 10, 10)).save(tmp_path / "images" / "bad.png")
    with pytest.raises(OSError, match=rf"record 1 \(id='img-01'\): image .*bad.png.*{side * side} pixels.*"
                                      r"data.init_args.max_image_pixels = 5000 pixels.*raise it"):
        _datamodule_at(tmp_path, records, max_image_pixels=5000)  # the bundled 64 x 64 images fit
    dm = _datamodule_at(tmp_path, records, max_image_pixels=None)  # the user trusts the data
    assert dm.stats["train:samples"] == 3


def _not_images(tmp_path):
    """A text file named like a PNG, a directory, a symlink loop and a missing file: what a user might pass."""
    (tmp_path / "notes.png").write_text("these are notes, not pixels\n")
    (tmp_path / "folder.png").mkdir()
    os.symlink(tmp_path / "loop_b.png", tmp_path / "loop_a.png")
    os.symlink(tmp_path / "loop_a.png", tmp_path / "loop_b.png")
    return {"notes.png": "not an image Pillow can read", "folder.png": "a directory, not an image file",
            "loop_a.png": "a symlink loop", "missing.png": "does not exist"}


def test_an_image_named_on_the_command_line_that_cannot_load_is_one_line_naming_flag_file_and_fix(tmp_path):
    for name, reason in _not_images(tmp_path).items():
        with pytest.raises(ImageLoadError) as refused:
            load_image(tmp_path / name, "--image")
        message = str(refused.value)
        assert message.startswith(f"--image {str(tmp_path / name)!r}: ") and reason in message, message
        assert message.endswith("pass a readable image file (PNG, JPEG, ...).") and "\n" not in message
        assert classify(refused.value) == ("user", 1)


def test_a_record_whose_image_is_not_an_image_is_refused_at_setup_naming_record_and_reason(tmp_path):
    records = _records(tmp_path, image="images/notes.png")
    (tmp_path / "images" / "notes.png").write_text("these are notes, not pixels\n")
    with pytest.raises(ImageLoadError, match=r"train.json: record 1 \(id='img-01'\): image .*notes.png.*: it is not "
                                             r"an image Pillow can read.*skip_bad_images") as refused:
        _datamodule_at(tmp_path, records)
    assert "\n" not in str(refused.value)

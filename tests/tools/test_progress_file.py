"""Resumable output files under a full disk: DiskFullError names the file and bytes, and nothing partial stays."""

import errno
import json
import os
from pathlib import Path

import pytest

from mgmlora.errors import DiskFullError, classify
from mgmlora.tools import progress_file
from mgmlora.tools.progress_file import appending, read_entries, write_atomically

SETTINGS = {"checkpoint": "sha256:abc", "n": 2}


def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_in_an_atomic_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "predictions.jsonl"
    out.write_text("the previous predictions\n")
    text = "é" * 50  # 100 bytes in UTF-8: the bytes needed, not the characters
    real = Path.write_bytes

    def full(self, data):
        real(self, data[:30])  # what the disk took
        raise _enospc()

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(DiskFullError) as failed:
        write_atomically(out, text)
    assert str(failed.value).startswith(f"{out}: disk full after 30 bytes written (it needs at least 100 bytes; ")
    assert classify(failed.value) == ("user", 1) and "\n" not in str(failed.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]
    assert out.read_text() == "the previous predictions\n"


class _FillingFile:
    """A raw file whose disk fills after `room` more bytes (writes stop there, then ENOSPC)."""

    def __init__(self, raw, room):
        self.raw, self.room = raw, room

    def write(self, data):
        if self.room <= 0:
            raise _enospc()
        n = self.raw.write(bytes(data[:self.room]))
        self.room -= n
        return n

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.raw.close()


def test_a_full_disk_while_appending_cuts_the_entry_off_and_keeps_the_complete_ones(tmp_path, monkeypatch):
    path = tmp_path / "predictions.progress.jsonl"
    with appending(path, SETTINGS) as write:
        write([{"key": "a", "prediction": "x"}])
    before = path.read_bytes()
    entries = [{"key": "b", "prediction": "y" * 40}, {"key": "c", "prediction": "z"}]
    needed = len("".join(json.dumps(e) + "\n" for e in entries).encode())
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: _FillingFile(real_open(self, *a, **k), 25))
    with pytest.raises(DiskFullError) as failed:
        with appending(path, SETTINGS) as write:
            write(entries)
    assert str(failed.value).startswith(f"{path}: disk full after 25 bytes written (it needs at least {needed} bytes")
    assert path.read_bytes() == before  # the 25 bytes of a cut entry are gone again
    monkeypatch.undo()
    with appending(path, SETTINGS) as write:  # a rerun with room goes on from the complete entries
        write(entries)
    assert [e["key"] for e in read_entries(path, SETTINGS)] == ["a", "b", "c"]


def test_a_full_disk_reported_only_at_fsync_also_cuts_the_entry_off(tmp_path, monkeypatch):
    path = tmp_path / "p.jsonl"
    with appending(path, SETTINGS) as write:
        write([{"key": "a"}])
    before = path.read_bytes()

    def fsync(fd):
        raise _enospc()

    monkeypatch.setattr(progress_file.os, "fsync", fsync)
    with pytest.raises(DiskFullError, match=rf"^{path}: disk full"):
        with appending(path, SETTINGS) as write:
            write([{"key": "b"}])
    assert path.read_bytes() == before

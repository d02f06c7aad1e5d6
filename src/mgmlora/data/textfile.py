"""Reading data files as UTF-8 text, with an error that says where the first undecodable byte is.

Python's own `UnicodeDecodeError` names neither the file nor the line ("'utf-8' codec can't decode byte 0xe9 in
position 1234"), which leaves the user searching a multi-gigabyte JSON for one Latin-1 character.
"""

from __future__ import annotations

import codecs
from pathlib import Path


def read_utf8(path: Path, error: type[Exception]) -> str:
    """The text of `path`, decoded as UTF-8 (a leading byte-order mark is dropped).

    Raises:
        error: naming the file, line and column of the first byte that is not UTF-8, and the fix.
    """
    raw = path.read_bytes()
    data = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = len(data[data.rfind(b"\n", 0, err.start) + 1:err.start].decode("utf-8")) + 1  # in characters
        byte = err.start + len(raw) - len(data)
        raise error(f"{path}: line {line}, column {column} (byte {byte}): byte 0x{data[err.start]:02x} is not UTF-8 "
                    f"({err.reason}); re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name} > "
                    f"{path.stem}.utf8{path.suffix}).") from err

"""Which base model an adapter belongs to: a fingerprint recorded when the adapter is saved and compared on load.

An adapter only means something on the base it was trained on; on another base (another size with the same layer
shapes, a fine-tuned variant, a different random init) it loads without complaint and produces nonsense. The
fingerprint is taken from what the base is made of, not from where it lies, so a base copied to another machine
matches and a different base in the same directory does not:

- a base from `model_path`: SHA-256 over config.json and, for every weight file (`*.safetensors`, `*.bin`, `*.pt`,
  `*.pth`), its name, its size, its safetensors header (tensor names, dtypes, shapes) and sampled blocks of its bytes
  at fixed offsets, so it costs a few reads per file however large the model is;
- a randomly initialised preset: the preset's name and `init_seed`, which decide every weight.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from mgmlora.errors import MgmloraError
from mgmlora.models.args import ModelArgs

BASE_KEY = "mgmlora_base_fingerprint"  # in checkpoints and in an exported adapter's mgmlora_run.json
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SAMPLES, _BLOCK = 8, 1 << 16  # blocks sampled per weight file, bytes per block


class BaseMismatchError(MgmloraError):
    """An adapter is being loaded onto another base model than the one it was trained on."""


def _file_digest(digest, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            (header_len,) = struct.unpack("<Q", f.read(8))
            digest.update(f.read(min(header_len, size - 8)))
        for i in range(_SAMPLES):
            f.seek(max(0, (size - _BLOCK) * i // max(_SAMPLES - 1, 1)))
            digest.update(f.read(_BLOCK))


def base_fingerprint(args: ModelArgs) -> str:
    """The fingerprint of the base `args` load (module docstring); "random:<preset>:seed=<n>" for random init."""
    if not args.model_path:
        return f"random:{args.preset}:seed={args.init_seed}"
    folder = Path(args.model_path)
    digest = hashlib.sha256()
    if (folder / "config.json").is_file():
        digest.update((folder / "config.json").read_bytes())
    for path in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        _file_digest(digest, path)
    return "files:" + digest.hexdigest()


def check_base(saved: str | None, current: str, source: str, base: str) -> None:
    """Refuses an adapter whose recorded base fingerprint differs from the base it is loaded onto (None: not recorded).

    Args:
        saved: the fingerprint recorded with the adapter (None for adapters saved before fingerprints existed).
        current: `base_fingerprint` of the base about to receive it.
        source: the adapter's file or directory, named in the message.
        base: the base's model_path or preset, named in the message.
    """
    if saved is None or saved == current:
        return
    raise BaseMismatchError(f"{source}: this adapter was trained on another base model than {base} (fingerprint "
                            f"{saved[:24]}... recorded, {current[:24]}... here); pass the base it was trained on "
                            "(--model_path / model.model.model_path, or the same preset and init_seed).")


__all__ = ["BASE_KEY", "BaseMismatchError", "base_fingerprint", "check_base"]

"""Image loading for any image-text family: every common mode to 8-bit RGB, and the set-up check of every file.

Loading (`load_rgb`) decodes the whole file and brings every common mode to 8-bit RGB with a defined rule, so that
what the towers see does not depend on how a file happened to be saved:

    RGB                      as is
    L, 1, P (opaque), CMYK   Pillow's conversion (CMYK: R = (255 - C)(255 - K) / 255, no ICC colour management)
    I;16*, I                 16-bit grey: v * 255 / 65535, rounded (values outside 0..65535 are clipped)
    F                        float grey in [0, 1]: v * 255, rounded (values outside [0, 1] are clipped)
    RGBA, LA, PA, and P, L or RGB with a transparent palette entry or colour key (PNG tRNS)
                             composited over ALPHA_BACKGROUND (white), as image viewers show them; dropping the
                             alpha channel instead would show whatever colour transparent pixels happen to store

Image size is bounded by Pillow's own decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`), which the LLaVA data
module sets from `data.init_args.max_image_pixels`.

What an image becomes for a model (sizes, normalisation, the tensors its forward takes) is the model family's:
`Processor.image_inputs` (mgmlora.models.processor; MGM's in mgmlora.models.mgm_processor).
"""

from __future__ import annotations

import errno
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

ALPHA_BACKGROUND = (255, 255, 255)  # what transparent pixels become
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a decoded image, by the rules in the module docstring.

    Raises:
        ValueError: for a mode Pillow cannot convert to RGB (its own message).
    """
    if img.mode.startswith(("I", "F")):  # "I", "I;16", "I;16B", "I;16L", "I;16N", "F": more than 8 bits per value
        full_scale = 65535.0 if img.mode.startswith("I") else 1.0
        # float keeps the precision; F -> L rounds and clips to 0..255 (I -> L would truncate instead)
        grey = img.convert("F").point(lambda v: v * (255.0 / full_scale)).convert("L")
        return grey.convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:  # an alpha channel, or a transparent palette/colour key
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img.copy()  # a copy, so that it outlives the file it was read from
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Opens and fully decodes an image, as 8-bit RGB (see the module docstring for each mode).

    Decoding everything (`load`), not only the header, is what surfaces a truncated or corrupt pixel stream here
    rather than later in a training step.

    Raises:
        OSError: missing, unreadable or corrupt file (`PIL.UnidentifiedImageError` is one).
        PIL.Image.DecompressionBombError: more than twice `Image.MAX_IMAGE_PIXELS` pixels (Pillow warns above once).
    """
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


class ImagePathError(ValueError):
    """A record's image path that leaves the image folder (`..`, absolute, a symlink out) or cannot be resolved."""


def image_path(folder: Path, name: str, where: str) -> Path:
    """`folder / name`, refused unless it stays inside `folder` once `..` and symlinks are resolved.

    A data file decides which files training reads: `../../home/user/.ssh/id_rsa`, `/etc/shadow` or a symlink in the
    image folder pointing elsewhere would be opened (and, for images, partly echoed in errors and sample tables).

    Args:
        folder: data.init_args.image_folder.
        name: the record's `image` value.
        where: the record, as the message names it (file, index and id).
    """
    if not isinstance(name, str) or not name:
        raise ImagePathError(f"{where}: 'image' must be a non-empty relative path string, got {name!r}.")
    fix = "use a path relative to data.init_args.image_folder that stays inside it"
    if Path(name).is_absolute():
        raise ImagePathError(f"{where}: image {name!r} is an absolute path; {fix}.")
    if ".." in Path(name).parts:
        raise ImagePathError(f"{where}: image {name!r} contains '..'; {fix}.")
    try:
        root, resolved = folder.resolve(), (folder / name).resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ImagePathError(f"{where}: image {name!r} cannot be resolved ({error}); a symlink loop? {fix}.") from None
    if resolved != root and root not in resolved.parents:
        raise ImagePathError(f"{where}: image {name!r} resolves to {str(resolved)!r}, outside the image folder "
                             f"{str(root)!r} (a symlink out of it?); {fix}.")
    return folder / name


class ImageLoadError(OSError):
    """An image of a data record cannot be used; the message names the data file, the record, the image and the fix."""


def image_problem(path: Path) -> str | None:
    """Why the image at `path` cannot be trained on, in one line; None when it decodes and converts.

    It runs `load_rgb`, the very function training uses, so a file that passes here loads in training too.
    """
    try:
        load_rgb(path)
    except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error...
        return _describe(err)
    return None


def _describe(err: Exception) -> str:
    """What `load_rgb`'s exception `err` means for the user, in one line."""
    if isinstance(err, FileNotFoundError):
        return "the file does not exist"
    if isinstance(err, OSError) and err.errno == errno.ELOOP:
        return "it is a symlink loop"
    if isinstance(err, IsADirectoryError):
        return "it is a directory, not an image file"
    if isinstance(err, UnidentifiedImageError):
        return "it is not an image Pillow can read (not an image file, or a format Pillow does not know)"
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (f"{err} The limit is data.init_args.max_image_pixels = {Image.MAX_IMAGE_PIXELS} pixels (Pillow "
                "errors above twice that, and mgmlora above it); if you trust the data, raise it (null: no limit), or "
                "shrink the image")
    return " ".join(f"{type(err).__name__}: {err}".split())


def load_image(path: str | Path, what: str) -> Image.Image:
    """`load_rgb` for an image a user names directly (a command-line flag): any failure is one line.

    Args:
        path: the image file.
        what: how the message names it, e.g. "--image".

    Raises:
        ImageLoadError: naming `what`, the file, why it cannot be used and the fix.
    """
    try:
        return load_rgb(path)
    except Exception as err:
        raise ImageLoadError(f"{what} {str(path)!r}: {_describe(err)}; pass a readable image file (PNG, JPEG, "
                             "...).") from None


def find_bad_images(paths: list[Path], workers: int | None = None) -> dict[Path, str]:
    """Decodes every image in `paths` in full (threads: Pillow's decoders release the GIL) -> {path: problem}.

    Over `Image.MAX_IMAGE_PIXELS`, Pillow only warns (DecompressionBombWarning) up to twice the limit; here that warning
    is an error too, so the limit the user configured is the limit that holds.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    with warnings.catch_warnings():  # global filters: the pool's threads see this one
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            problems = dict(zip(paths, pool.map(image_problem, paths)))
    return {path: problem for path, problem in problems.items() if problem}

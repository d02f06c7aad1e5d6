"""MGM image preprocessing with Pillow and torch (transformers' CLIPImageProcessor needs torchvision).

As MGM's processor, re-targeted to the aux size (../shared/docs/mgm.md section 4.4): optionally pad to a square with
the CLIP mean colour (`pad`, stage 2 and eval) or resize the shortest edge and centre-crop (`square`, stage 1), then a
bicubic resize to the aux size, scale to [0, 1] and CLIP normalisation -> the aux image (3, 768, 768). The low-res CLIP
input is a bilinear downsample of that *normalised* tensor (not a fresh resize) -> (3, 336, 336).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOUR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
AspectRatio = Literal["pad", "square"]


def load_rgb(path: str | Path) -> Image.Image:
    """Opens an image as RGB (greyscale, palette and RGBA images are converted)."""
    with Image.open(path) as img:
        return img.convert("RGB")


def _pad_to_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), PAD_COLOUR)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def _center_crop_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def preprocess(img: Image.Image, size_aux: int, size: int, aspect: AspectRatio = "pad"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """An RGB image -> (low-res (3, size, size), aux (3, size_aux, size_aux)), CLIP-normalised float32."""
    img = _pad_to_square(img) if aspect == "pad" else _center_crop_square(img)
    img = img.resize((size_aux, size_aux), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size_aux, size_aux, 3)
    aux = pixels.permute(2, 0, 1).float() / 255.0  # (3, S_aux, S_aux)
    aux = (aux - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    low = F.interpolate(aux[None], size=(size, size), mode="bilinear", align_corners=False)[0]  # (3, S, S)
    return low, aux


def blank(size_aux: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The zero images MGM gives text-only samples (their image tokens are never spliced in)."""
    return torch.zeros(3, size, size), torch.zeros(3, size_aux, size_aux)

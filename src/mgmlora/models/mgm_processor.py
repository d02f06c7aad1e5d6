r"""MGM's processor: the Gemma conversation template and MGM's two-resolution image transform.

Template (MGM `conv_gemma`, both stages of MGM-2B; docs/design/mgm.md):

    <bos><start_of_turn>user\n<image>\n{question}<end_of_turn>\n<start_of_turn>model\n{answer}<end_of_turn>\n<eos>

The image goes in front of the first question. Supervised per round: the answer, `<end_of_turn>`, `\n` and `<eos>`;
`<bos>` and the user turn are masked.

Image transform as MGM's processor, re-targeted to the aux size (docs/design/mgm.md): optionally pad to a square
with the CLIP mean colour (`pad`, stage 2 and eval) or resize the shortest edge and centre-crop (`square`, stage 1),
then a bicubic resize to the aux size, scale to [0, 1] and CLIP normalisation -> `images_aux` (3, S_aux, S_aux) for
ConvNeXt. The low-res CLIP input `images` is a bilinear downsample of that *normalised* tensor (not a fresh resize)
-> (3, S, S). A text-only sample gets zero images (their embeddings are never spliced in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from mgmlora.models.processor import IMAGE_PLACEHOLDER, AspectRatio, Processor, Rounds

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOUR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
USER, MODEL, END, BOS, EOS = "<start_of_turn>user\n", "<start_of_turn>model\n", "<end_of_turn>\n", "<bos>", "<eos>"


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


@dataclass(frozen=True)
class MgmProcessor(Processor):
    """MGM's template and transform at one checkpoint's geometry.

    Attributes:
        image_tokens: CLIP patches per image (576 for MGM-2B).
        max_length: tokenizer_model_max_length of the checkpoint (2048).
        size: CLIP input side (336).
        size_aux: ConvNeXt input side (768).
    """

    image_tokens: int
    max_length: int
    size: int
    size_aux: int

    def render(self, rounds: Rounds, has_image: bool) -> tuple[str, list[tuple[int, int]]]:  # noqa: D102
        text, spans = BOS, []
        for i, (question, answer) in enumerate(rounds):
            if i == 0 and has_image:
                question = f"{IMAGE_PLACEHOLDER}\n{question}"
            text += USER + question + END + MODEL
            start = len(text)
            text += answer + END + EOS
            spans.append((start, len(text)))
        return text, spans

    def image_inputs(self, image: Image.Image | None, aspect: AspectRatio) -> dict[str, torch.Tensor]:  # noqa: D102
        low, aux = blank(self.size_aux, self.size) if image is None else preprocess(image, self.size_aux, self.size,
                                                                                    aspect)
        return {"images": low, "images_aux": aux}  # (3, S, S), (3, S_aux, S_aux): MGMForCausalLM's argument names


__all__ = ["CLIP_MEAN", "CLIP_STD", "MgmProcessor", "PAD_COLOUR", "blank", "preprocess"]

"""The ConvNeXt trunk of MGM's high-resolution (aux) tower, in plain PyTorch with timm's parameter names.

MGM keeps only `stem` and `stages` of open_clip's `convnext_large_d_320` (a timm `convnext_large`) and stores them as
`vision_stem.{0,1}` / `vision_stages.S.{downsample.{0,1}, blocks.J.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}}`. Writing
these ~60 lines instead of depending on timm keeps torchvision (and with it a multi-GB CUDA torch) out of the
install; the same layout, loaded from timm's weights, matched timm's `forward_intermediates` bit-exactly
(docs/design/mgm.md). Towers are frozen and kept in eval mode, so drop-path is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

CONVNEXT_LARGE = {"depths": (3, 3, 27, 3), "dims": (192, 384, 768, 1536)}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class _Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """ConvNeXt block: depthwise 7x7 conv, LayerNorm, MLP (4x), layer scale, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.mlp(self.norm(x)) * self.gamma
        return x.permute(0, 3, 1, 2) + shortcut  # (B, C, H, W)


class Stage(nn.Module):
    """Optional 2x2 stride-2 downsample (stages 1-3), then `depth` blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool):
        super().__init__()
        self.downsample = (nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, 2, stride=2))
                           if downsample else nn.Identity())
        self.blocks = nn.Sequential(*(Block(dim) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.blocks(self.downsample(x))


class ConvNeXtTrunk(nn.Module):
    """Stem + four stages; `forward` returns every stage's output (MGM uses all four)."""

    def __init__(self, depths: Sequence[int] = CONVNEXT_LARGE["depths"], dims: Sequence[int] = CONVNEXT_LARGE["dims"]):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt needs 4 depths and 4 dims, got depths={list(depths)} dims={list(dims)}")
        self.dims = tuple(dims)
        self.vision_stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        self.vision_stages = nn.ModuleList(
            Stage(dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0) for i in range(4))

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) -> [(B, d0, S/4, S/4), (B, d1, S/8, S/8), (B, d2, S/16, S/16), (B, d3, S/32, S/32)]."""
        x, outs = self.vision_stem(pixels), []
        for stage in self.vision_stages:
            x = stage(x)
            outs.append(x)
        return outs

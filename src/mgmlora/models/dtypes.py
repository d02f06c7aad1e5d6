"""The floating-point dtypes a setting may name, and the torch dtype each name means.

One map for every setting that names a dtype (the model's base weights, QLoRA's compute dtype, an export's target
dtype), so that they accept the same names and mean the same thing.
"""

from __future__ import annotations

from typing import Literal

import torch

DtypeName = Literal["bfloat16", "float16", "float32"]
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

__all__ = ["DTYPES", "DtypeName"]

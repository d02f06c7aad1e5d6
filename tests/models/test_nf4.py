"""NF4 storage (mgmlora.models.nf4): hand-computed codes, the round-trip error bound, and bitsandbytes' bytes."""

import importlib.util

import pytest
import torch

from mgmlora.models.nf4 import BLOCK, NF4_CODE, dequantize, dynamic_code, quantize

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (the qlora extra)")


def test_hand_computed_codes_and_packing():
    # one block of 64 values with absmax 2: scaled values 1, -1, 0, 0.25 and 60 zeros. 0.25 lies between the codes
    # 0.2461 (index 10) and 0.3379 (11): their midpoint 0.292 is above it, so index 10. Pairs pack high nibble first.
    w = torch.zeros(BLOCK)
    w[:4] = torch.tensor([2.0, -2.0, 0.0, 0.5])
    q = quantize(w, double_quant=False, dtype=torch.float32, backend="torch")
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (32,)
    assert q.codes[:2].tolist() == [(15 << 4) | 0, (7 << 4) | 10]
    assert q.codes[2:].tolist() == [(7 << 4) | 7] * 30  # zeros are code 7 (0.0)
    assert q.absmax.tolist() == [2.0]
    expected = torch.zeros(BLOCK)
    expected[:4] = torch.tensor([2.0, -2.0, 0.0, 2 * NF4_CODE[10]])
    torch.testing.assert_close(dequantize(q, "torch"), expected, rtol=0, atol=0)


@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_is_within_half_the_widest_code_gap_of_each_block(double_quant):
    torch.manual_seed(0)
    w = torch.randn(37, 129) * torch.logspace(-3, 0, 129)  # columns of very different scales, a partial last block
    q = quantize(w, double_quant, torch.float32, "torch")
    back = dequantize(q, "torch")
    assert back.shape == w.shape and back.dtype == torch.float32
    flat, err = w.reshape(-1), (back - w).abs().reshape(-1)
    n = flat.numel()
    absmax = torch.nn.functional.pad(flat.abs(), (0, -n % BLOCK)).view(-1, BLOCK).amax(1)
    per_value = absmax.repeat_interleave(BLOCK)[:n]
    half_gap = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:], strict=False)) / 2  # 0.1385, between 0.72 and 1
    # double quantisation also rounds each absmax to 8 bits: up to ~1% of it on top (one code step of the dynamic map)
    bound = per_value * (half_gap + (0.02 if double_quant else 1e-6))
    assert (err <= bound).all()
    # NF4's known mean relative error on Gaussian weights (0.091 measured with bitsandbytes on the H200)
    g = torch.randn(256, 256)
    rel = (dequantize(quantize(g, double_quant, torch.float32, "torch"), "torch") - g).abs().mean() / g.abs().mean()
    assert 0.08 < rel < 0.10
    assert q.nbytes < w.numel() * (0.5 + (0.02 if double_quant else 0.07))


@needs_bnb
@pytest.mark.parametrize("shape", [(64, 128), (3, 5, 77), (1001,)])
def test_pure_pytorch_nf4_writes_bitsandbytes_bytes(shape):
    torch.manual_seed(1)
    w = torch.randn(shape, dtype=torch.bfloat16)
    ours = quantize(w, False, torch.bfloat16, "torch")
    theirs = quantize(w, False, torch.bfloat16, "bitsandbytes")
    assert torch.equal(ours.codes, theirs.codes) and torch.equal(ours.absmax, theirs.absmax)
    assert torch.equal(dequantize(ours, "torch"), dequantize(theirs, "bitsandbytes"))
    # double quantisation: same 4-bit codes; the 8-bit absmax codes come from bitsandbytes' C kernel, whose rounding
    # differs on rare near-ties, so compare what they decode to
    ours, theirs = quantize(w, True, torch.bfloat16, "torch"), quantize(w, True, torch.bfloat16, "bitsandbytes")
    assert torch.equal(ours.codes, theirs.codes)
    torch.testing.assert_close(ours.absmax_offset, theirs.absmax_offset)
    assert (ours.absmax != theirs.absmax).float().mean() <= 0.2
    torch.testing.assert_close(dequantize(ours, "torch"), dequantize(theirs, "bitsandbytes"), rtol=0.02, atol=1e-3)


@needs_bnb
def test_dynamic_code_is_bitsandbytes_dynamic_map():
    import bitsandbytes.functional as bnbf

    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map(signed=True))

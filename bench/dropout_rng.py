"""Times LoRA dropout inside a compiled decoder layer's input side: how much of a step its random masks cost, and how.

The question it answers: what LoRA dropout costs a checkpointed, compiled step, and whether another way of drawing its
masks costs less. The FP8 Chameleons overlay's loop is slower at the recipe's dropout than at 0, and its profile puts
the difference in the compiled kernels that fuse the RMSNorm, the FP8 input quantisation and the dropout masks
(configs/README.md). Inductor draws each mask element with its own Philox call (`tl.rand`: four 32-bit outputs
computed, one used). This measures the same shape of work alone, forward and backward, compiled, at a real step's
positions:

- `none`: no dropout (the lower bound);
- `inductor`: `torch.nn.functional.dropout` as PEFT calls it, compiled by inductor (what runs today);
- `fallback_random`: the same with inductor's `fallback_random` option (random tensors from ATen's generator);
- `aten_mask`: the keep-mask drawn by ATen's `bernoulli_` (four draws per Philox call) in an opaque custom op, and the
  multiply fused by inductor;
- `triton_mask`: the same with a Triton kernel drawing eight 16-bit draws per Philox call (p rounded to a multiple of
  1/65536); it runs on a GPU only.

Each opaque mask op takes a per-call `salt`: compiled for training, AOTAutograd merges calls of an opaque op with
equal arguments, and q, k and v pass the same input (tests/test_bench.py checks the compiled masks differ).

The modelled work, per layer: RMSNorm of the residual stream, its FP8 row-wise quantisation (the frozen q/k/v
projections' input), three LoRA `A`/`B` pairs on independently dropped copies of the normed input (q, k, v), and one
on a dropped copy of the attention output (o), under bf16 autocast with fp32 adapters (PEFT casts each adapter's input
to fp32 first when dropout is on). Each timing is the median of `--iters` forward+backward calls between their own
pair of CUDA events after `--warmup` calls, and the forward alone likewise; `step_ms` scales them to a checkpointed
step (`--layers` x (forward + forward and backward): the recompute runs the forward again). The JSON is rewritten after
each result; each variant also records the keep rate of its uncompiled function (a check that it drops what it
should; the compiled masks are checked by the test named above).

    PYTHONPATH=src python bench/dropout_rng.py --out bench/results/<date>-dropout_rng-qwen3-30b-a3b-h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: grouped_gemm's CUDA-event timing
from grouped_gemm import time_cuda  # noqa: E402


@torch.library.custom_op("mgmlora_bench::keep_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def keep_mask(x: torch.Tensor, p: float, salt: int) -> torch.Tensor:
    """A bool mask shaped as `x`, True with probability 1 - p, drawn by ATen's `bernoulli_`.

    `salt` differs per call site: AOTAutograd merges calls of an opaque op whose arguments are equal (its tag does
    not stop that), and q, k and v pass the same input.
    """
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)


@keep_mask.register_fake
def _(x: torch.Tensor, p: float, salt: int) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


try:  # the GPU image's torch brings Triton; the CPU install has none (the variant then records its error)
    import triton
    import triton.language as tl

    @triton.jit
    def _keep_mask_kernel(out_ptr, n, seed, threshold, BLOCK: tl.constexpr):
        """Eight mask bytes per Philox call: each 32-bit output gives two 16-bit draws, kept if at least `threshold`.

        A program's 8 x BLOCK elements are eight runs of BLOCK (coalesced stores).
        """
        pid = tl.program_id(0)
        lane = tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(seed, pid * BLOCK + lane)
        base = pid * BLOCK * 8 + lane
        tl.store(out_ptr + base, (r0 & 0xFFFF) >= threshold, mask=base < n)
        tl.store(out_ptr + base + BLOCK, (r0 >> 16) >= threshold, mask=base + BLOCK < n)
        tl.store(out_ptr + base + 2 * BLOCK, (r1 & 0xFFFF) >= threshold, mask=base + 2 * BLOCK < n)
        tl.store(out_ptr + base + 3 * BLOCK, (r1 >> 16) >= threshold, mask=base + 3 * BLOCK < n)
        tl.store(out_ptr + base + 4 * BLOCK, (r2 & 0xFFFF) >= threshold, mask=base + 4 * BLOCK < n)
        tl.store(out_ptr + base + 5 * BLOCK, (r2 >> 16) >= threshold, mask=base + 5 * BLOCK < n)
        tl.store(out_ptr + base + 6 * BLOCK, (r3 & 0xFFFF) >= threshold, mask=base + 6 * BLOCK < n)
        tl.store(out_ptr + base + 7 * BLOCK, (r3 >> 16) >= threshold, mask=base + 7 * BLOCK < n)
except ImportError:
    triton = None


@torch.library.custom_op("mgmlora_bench::keep_mask_triton", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def keep_mask_triton(x: torch.Tensor, p: float, salt: int) -> torch.Tensor:
    """A bool mask shaped as `x`, True with probability 1 - round(65536 p) / 65536, eight draws per Philox call.

    The seed comes from the CPU generator (restored by checkpointing's RNG bookkeeping, so a recompute redraws the
    same mask); `salt` as for `keep_mask`.
    """
    if triton is None or not x.is_cuda:
        raise RuntimeError("keep_mask_triton needs Triton and a CUDA tensor")
    out = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    n, block = out.numel(), 1024
    seed = int(torch.randint(2**31 - 1, ()))
    _keep_mask_kernel[(triton.cdiv(n, 8 * block),)](out, n, seed, round(p * 65536), BLOCK=block)
    return out


@keep_mask_triton.register_fake
def _(x: torch.Tensor, p: float, salt: int) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


def _drop(x: torch.Tensor, p: float, how: str, salt: int = 0) -> torch.Tensor:
    if how == "none" or p == 0:
        return x
    if how == "aten_mask":
        return x * keep_mask(x.detach(), p, salt) * (1.0 / (1.0 - p))
    if how == "triton_mask":
        return x * keep_mask_triton(x.detach(), p, salt) * (65536 / (65536 - round(p * 65536)))
    return F.dropout(x, p, training=True)


def layer_inputs(h: torch.Tensor, attn: torch.Tensor, norm_w: torch.Tensor, adapters: list, p: float, how: str,
                 scaling: float):
    """The dropout-bearing input side of one decoder layer; returns its outputs (FP8 codes, scales, LoRA deltas)."""
    # h: (T, H) bf16 residual stream; attn: (T, heads x head_dim) bf16 attention output
    var = h.float().pow(2).mean(-1, keepdim=True)
    x = (h.float() * torch.rsqrt(var + 1e-6)).to(h.dtype) * norm_w  # (T, H) bf16
    amax = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12)  # (T, 1)
    scale = amax / 448.0
    codes = (x.float() / scale).to(torch.float8_e4m3fn)  # (T, H): the frozen q/k/v projections' FP8 input
    deltas = []
    for i, (a, b) in enumerate(adapters):
        src = x if i < 3 else attn
        with torch.autocast("cuda", torch.bfloat16, enabled=src.is_cuda):
            deltas.append(F.linear(F.linear(_drop(src.float(), p, how, salt=i), a), b) * scaling)  # (T, out)
    return codes, scale, deltas


def main(argv: list[str] | None = None) -> int:
    """Runs each variant and writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--positions", type=int, default=36_864, help="tokens of one step's pack")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--attn_width", type=int, default=4096, help="heads x head_dim (o_proj's input)")
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--layers", type=int, default=48, help="scales the per-call time to a step (x2: recompute)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--variants", default="none,inductor,fallback_random,aten_mask,triton_mask")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16
    h = torch.randn(args.positions, args.hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    attn = torch.randn(args.positions, args.attn_width, device=device, dtype=dtype, generator=gen).requires_grad_()
    norm_w = torch.ones(args.hidden, device=device, dtype=dtype)
    outs = [args.hidden, args.hidden // 4, args.hidden // 4, args.hidden]  # q, k, v (4 kv heads), o
    ins = [args.hidden] * 3 + [args.attn_width]
    adapters = [(torch.randn(args.r, i, device=device, generator=gen).mul_(i ** -0.5).requires_grad_(),
                 torch.randn(o, args.r, device=device, generator=gen).mul_(0.01).requires_grad_())
                for i, o in zip(ins, outs)]
    grads = [torch.randn(args.positions, o, device=device, dtype=dtype, generator=gen) for o in outs]
    result = {"command": "python bench/dropout_rng.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "variants": {}}
    for how in args.variants.split(","):
        options = {"fallback_random": True} if how == "fallback_random" else {}
        fn = torch.compile(layer_inputs, options=options, fullgraph=True) if cuda else layer_inputs

        def forward(fn=fn, how=how):
            return fn(h, attn, norm_w, adapters, args.p, how, 2.0)[2]

        def step(forward=forward):
            torch.autograd.backward(forward(), grads)

        rec: dict = {}
        try:
            with torch.no_grad():  # the keep rate: a dropped input's zeros (none of h is exactly zero)
                x = h.float()
                rec["keep_rate"] = int(torch.count_nonzero(_drop(x, args.p, how))) / x.numel()
            if cuda:
                fwd = time_cuda(forward, args.warmup, args.iters)
                both = time_cuda(step, args.warmup, args.iters)
                rec.update(fwd_ms_median=statistics.median(fwd), ms_median=statistics.median(both),
                           ms_min=min(both), ms_max=max(both))
                # a checkpointed step runs each layer's forward twice (forward, recompute) and its backward once
                rec["step_ms"] = args.layers * (rec["fwd_ms_median"] + rec["ms_median"])
            else:
                step()
                rec["ran"] = True
        except Exception as error:  # noqa: BLE001  (a variant that fails is recorded, the others still run)
            rec["error"] = f"{type(error).__name__}: {error}"[:500]
        for p in [h, attn] + [t for pair in adapters for t in pair]:
            p.grad = None
        result["variants"][how] = rec
        base = result["variants"].get("none", {}).get("step_ms")
        if base and rec.get("step_ms"):
            rec["over_none_step_ms"] = rec["step_ms"] - base
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(how, json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

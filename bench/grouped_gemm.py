"""Times one MoE layer's frozen expert products on the GPU: FP8 grouped GEMM against dequantise + bf16 grouped GEMM.

The question it answers: is `expert_products: fp8` (mgmlora.models.fp8's `_Fp8GroupedLinear`, PyTorch's
`_scaled_grouped_mm`) faster or slower than `expert_products: dequantized` (the codes dequantised to bf16 per call,
then `grouped_mm`) at a real model's shapes, each with its forward and input-gradient backward, eager and compiled?
configs/README.md's "FP8 base" section inferred "about half the bf16 kernel's rate" from two whole-step profiles
at different batch sizes; this measures the two products alone at the same rows.

Rows per expert follow a routing drawn from a Dirichlet-weighted multinomial (seeded), `--positions` x `--top_k`
rows over `--experts` experts. Each timing is the median of `--iters` calls, each between its own pair of CUDA
events, launched back to back after `--warmup` calls (no host sync between them, so the host's launch work hides
behind the device's as it does in a training step). The JSON is rewritten after each result, so a run cut short
keeps what it measured; `graph_breaks` counts dynamo's graph breaks per compiled entry.

    PYTHONPATH=src python bench/grouped_gemm.py --out bench/results/<date>-grouped_gemm-qwen3-30b-a3b-h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from mgmlora.models import fp8, torch_private


def _routing(positions: int, top_k: int, experts: int, seed: int, device: torch.device) -> torch.Tensor:
    """(E,) int32 offsets: the end of each expert's rows, for positions x top_k routed rows."""
    gen = torch.Generator().manual_seed(seed)
    # Dirichlet(8): Gamma(8) draws (sums of 8 exponentials) normalised, a mildly uneven load
    share = -torch.rand(experts, 8, generator=gen).clamp(min=1e-12).log().sum(1)
    counts = torch.multinomial(share, positions * top_k, replacement=True, generator=gen).bincount(minlength=experts)
    return torch.cumsum(counts, 0).to(torch.int32).to(device)


def time_cuda(fn, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of `iters` back-to-back calls of fn, after `warmup` calls."""
    for _ in range(max(warmup, 1)):  # at least one: compilation stays out of the timings
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def _dequantized(weight: fp8.Fp8Weight, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    deq = fp8.dequantize(weight.codes, weight.scale, torch.bfloat16)  # (E, out, in)
    return torch.nn.functional.grouped_mm(x, deq.transpose(-2, -1), offs=offsets)  # (S, out)


def _fp8(weight: fp8.Fp8Weight, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return weight.grouped(x, offsets)  # (S, out)


def main(argv: list[str] | None = None) -> int:
    """Times both expert-product modes per fused weight and writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--positions", type=int, default=36_000, help="tokens of one step's micro-batch")
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    torch.manual_seed(args.seed)
    offsets = _routing(args.positions, args.top_k, args.experts, args.seed, device)
    rows = int(offsets[-1])
    shapes = {"gate_up_proj": (2 * args.intermediate, args.hidden), "down_proj": (args.hidden, args.intermediate)}
    results: dict[str, dict] = {}
    payload = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__},
        "shapes": {"rows": rows, "experts": args.experts, "positions": args.positions, "top_k": args.top_k,
                   "products": {k: list(v) for k, v in shapes.items()}},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, (out_f, in_f) in shapes.items():
        master = torch.randn(args.experts, out_f, in_f, device=device, dtype=torch.bfloat16) * in_f ** -0.5
        weight = fp8.Fp8Weight(master, torch.bfloat16)  # its codes and scales on master's device
        x = torch.randn(rows, in_f, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(rows, out_f, device=device, dtype=torch.bfloat16)
        flops = 2 * rows * out_f * in_f  # one product; the backward's input gradient is another
        ref = _dequantized(weight, x.detach(), offsets).float()
        for mode in ("eager", "compiled"):
            for products, fn in (("dequantized", _dequantized), ("fp8", _fp8)):
                breaks = sum(torch_private.dynamo_counts()[1].values())
                f = torch.compile(fn, dynamic=False) if mode == "compiled" else fn
                out = f(weight, x, offsets)
                err = ((out.float() - ref).norm() / ref.norm()).item()

                def fwd(f=f, weight=weight, x=x):
                    with torch.no_grad():
                        f(weight, x, offsets)

                def fwd_bwd(f=f, weight=weight, x=x, grad=grad):
                    x.grad = None
                    f(weight, x, offsets).backward(grad)

                t_f = time_cuda(fwd, args.warmup, args.iters)
                t_fb = time_cuda(fwd_bwd, args.warmup, args.iters)
                key = f"{name}/{products}/{mode}"
                results[key] = {
                    "forward_ms_median": statistics.median(t_f), "forward_ms_min": min(t_f),
                    "forward_backward_ms_median": statistics.median(t_fb), "forward_backward_ms_min": min(t_fb),
                    "forward_tflops": flops / statistics.median(t_f) / 1e9,
                    "forward_backward_tflops": 2 * flops / statistics.median(t_fb) / 1e9,
                    "relative_error_vs_dequantized_eager": err,
                    "graph_breaks": sum(torch_private.dynamo_counts()[1].values()) - breaks,
                }
                print(key, {k: round(v, 4) for k, v in results[key].items()}, flush=True)
                args.out.write_text(json.dumps(payload, indent=1))
        torch.cuda.empty_cache()
    for mode in ("eager", "compiled"):
        # per step under checkpointing each product runs forward twice (the forward, the recompute) and the input
        # gradient once: forward + forward_backward, over both weights
        per_step = {p: sum(results[f"{n}/{p}/{mode}"][f"{part}_ms_median"] for n in shapes
                           for part in ("forward", "forward_backward")) for p in ("dequantized", "fp8")}
        results[f"checkpointed_step_ms/{mode}"] = per_step
        results[f"fp8_speedup/{mode}/checkpointed_step"] = per_step["dequantized"] / per_step["fp8"]
        for name in shapes:
            for part in ("forward", "forward_backward"):
                d = results[f"{name}/dequantized/{mode}"][f"{part}_ms_median"]
                q = results[f"{name}/fp8/{mode}"][f"{part}_ms_median"]
                results[f"{name}/fp8_speedup/{mode}/{part}"] = d / q
    args.out.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""NF4 on the CPU: mgmlora's pure-PyTorch codec against bitsandbytes' CPU backend and torchao's NF4Tensor.

    python bench/nf4_cpu.py --out bench/results/<date>-nf4_cpu-<machine>.json

Run in an environment that has bitsandbytes and torchao (neither is a default dependency of mgmlora). What it
records, per codec, on the same random weights:

- support: whether the codec stores a 2-D linear weight and a 3-D fused-experts weight (Qwen3-MoE's (E, 2I, H)),
  and the bytes per value it keeps;
- format: whether the codes and scales equal bitsandbytes' bytes (the format checkpoints and kernels share);
- round trip: mean and max absolute error of dequantize(quantize(w)) against w, and the same for the other codecs'
  round trips (same format: identical values);
- speed: median seconds of quantize and dequantize over `--repeats` calls, on this machine's CPU;
- bitsandbytes' own CPU round trip (`quantize_4bit` then `dequantize_4bit`) against mgmlora's on small shapes, the
  last dimension a multiple of the 64-value block or not;
- forward parity: the logits of a tiny random Qwen3 (dense and MoE) whose decoder weights went through each codec,
  against the full-precision model and against each other (mgmlora's load_model with `backend: torch` and
  `backend: bitsandbytes` for the first two; torchao by swapping each decoder linear weight for its NF4Tensor).

The numbers feed the decision recorded in mgmlora.models.nf4's docstring.
"""

import argparse
import importlib.metadata
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mgmlora.models import load_model  # noqa: E402
from mgmlora.models.args import ModelArgs  # noqa: E402
from mgmlora.models.nf4 import dequantize, quantize  # noqa: E402
from mgmlora.models.quantization import QuantizationArgs  # noqa: E402


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torchao_nf4():
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # torchao 0.18's location

    return lambda w: to_nf4(w, 64, 256)


def _installed_mib(name: str) -> float | None:
    """Disk space of the installed distribution `name` (what a default dependency adds to every install)."""
    try:
        files = importlib.metadata.distribution(name).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return round(sum(f.size or 0 for f in files if f.hash) / 2**20, 1)


def codecs() -> dict:
    """The codecs installed here: name -> (quantize(w), dequantize(stored), bytes of stored)."""
    found = {"mgmlora_torch": (lambda w: quantize(w, True, w.dtype, "torch"), lambda q: dequantize(q, "torch"),
                               lambda q: q.nbytes)}
    if _version("bitsandbytes"):
        found["bitsandbytes_cpu"] = (lambda w: quantize(w, True, w.dtype, "bitsandbytes"),
                                     lambda q: dequantize(q, "bitsandbytes"), lambda q: q.nbytes)
    if _version("torchao"):
        to_nf4 = _torchao_nf4()
        found["torchao"] = (to_nf4, lambda q: q.get_original_weight(),
                            lambda q: sum(t.numel() * t.element_size() for t in
                                          (q.quantized_data, q.quantized_scalers, q.quantization_factor)))
    return found


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 5)


def tensor_rows(weights: dict[str, torch.Tensor], repeats: int) -> dict:
    """Support, bytes per value, round-trip error, format equality and speed of every codec on every weight."""
    rows: dict = {}
    for wname, w in weights.items():
        back, stored = {}, {}
        for cname, (quant, dequant, nbytes) in codecs().items():
            try:
                q = quant(w)
            except Exception as error:  # noqa: BLE001  (an unsupported shape is a result)
                rows.setdefault(cname, {})[wname] = {"supported": False, "error": repr(error)[:200]}
                continue
            d = dequant(q).float()
            back[cname], stored[cname] = d, q
            rows.setdefault(cname, {})[wname] = {
                "supported": True, "bits_per_value": round(8 * nbytes(q) / w.numel(), 4),
                "mean_abs_error": (d - w.float()).abs().mean().item(),
                "max_abs_error": (d - w.float()).abs().max().item(),
                "quantize_s": _median_s(lambda quant=quant: quant(w), repeats),
                "dequantize_s": _median_s(lambda dequant=dequant, q=q: dequant(q), repeats)}
        if "mgmlora_torch" in stored and "bitsandbytes_cpu" in stored:
            a, b = stored["mgmlora_torch"], stored["bitsandbytes_cpu"]
            rows["mgmlora_torch"][wname].update({
                "same_4bit_codes_as_bitsandbytes": torch.equal(a.codes, b.codes.view(a.codes.shape)),
                "same_absmax_scales_as_bitsandbytes": torch.equal(a.absmax_scale, b.absmax_scale),
                "absmax_8bit_codes_differing_from_bitsandbytes": (a.absmax != b.absmax).float().mean().item()})
        for cname, d in back.items():
            rows[cname][wname]["max_abs_diff_to"] = {o: (d - e).abs().max().item() for o, e in back.items()
                                                     if o != cname}
    return rows


def bitsandbytes_shapes() -> dict:
    """Max |bitsandbytes' CPU round trip - mgmlora's| per shape (same codes and scales: 0 where both decode alike)."""
    if not _version("bitsandbytes"):
        return {}
    import bitsandbytes.functional as bnbf

    rows = {}
    for shape in [(64, 64), (64, 128), (3, 5, 77), (1001,), (64, 32), (32, 96), (4, 64, 32), (4, 64, 96)]:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        codes, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        ours = quantize(w, False, torch.float32, "torch")
        rows["x".join(map(str, shape))] = {
            "same_codes": torch.equal(ours.codes, codes.view(-1)),
            "max_abs_diff_of_dequantised": (bnbf.dequantize_4bit(codes, state) - dequantize(ours, "torch")).abs().max()
            .item()}
    return rows


def _torchao_model(model_args: ModelArgs, ids: torch.Tensor) -> torch.Tensor | str:
    """Logits of the full-precision model with every decoder nn.Linear weight replaced by torchao's NF4Tensor."""
    to_nf4 = _torchao_nf4()
    loaded = load_model(model_args, quantize=False)
    try:
        for layer in loaded.model.get_submodule(loaded.decoder_layers):
            for module in layer.modules():
                if type(module) is torch.nn.Linear:
                    module.weight = torch.nn.Parameter(to_nf4(module.weight.detach()), requires_grad=False)
            for name, param in list(layer.named_parameters()):
                if param.ndim == 3:  # fused experts: torchao stores 2-D tensors only
                    to_nf4(param.detach())
        return loaded.model(input_ids=ids).logits.float()
    except Exception as error:  # noqa: BLE001  (an unsupported model is a result)
        return repr(error)[:200]


def forward_rows(presets: list[str]) -> dict:
    """Logit differences of each codec's model against the full-precision one and against each other."""
    rows = {}
    for preset in presets:
        with torch.no_grad():
            # the full-precision twin: the same layer-by-layer random init as the quantised models, not quantised
            full_args = ModelArgs(preset=preset, dtype="float32",
                                  quantization=QuantizationArgs(compute_dtype="float32"))
            model = load_model(full_args, quantize=False).model
            ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
            full = model(input_ids=ids).logits
            logits: dict = {}
            for backend in ["torch"] + (["bitsandbytes"] if _version("bitsandbytes") else []):
                quant = QuantizationArgs(compute_dtype="float32", backend=backend)
                model = load_model(ModelArgs(preset=preset, dtype="float32", quantization=quant)).model
                logits[f"mgmlora_{backend}"] = model(input_ids=ids).logits.float()
            if _version("torchao"):
                logits["torchao"] = _torchao_model(full_args, ids)
        rows[preset] = {name: value if isinstance(value, str) else {
            "max_abs_diff_to_full_precision": (value - full).abs().max().item(),
            "mean_abs_diff_to_full_precision": (value - full).abs().mean().item(),
            "full_precision_mean_abs_logit": full.abs().mean().item(),
            "max_abs_diff_to": {o: (value - v).abs().max().item() for o, v in logits.items()
                                if o != name and not isinstance(v, str)}} for name, value in logits.items()}
    return rows


def bitsandbytes_import_log() -> list[str]:
    """What importing bitsandbytes logs (its CPU backend may try to fetch a kernel from the Hugging Face Hub)."""
    if not _version("bitsandbytes"):
        return []
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage()[:300])
    logging.getLogger().addHandler(handler)
    try:
        import bitsandbytes  # noqa: F401
    finally:
        logging.getLogger().removeHandler(handler)
    return records


def main() -> None:
    """Runs every comparison and writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import_log = bitsandbytes_import_log()
    torch.manual_seed(0)
    weights = {"linear_4096x4096_bf16": torch.randn(4096, 4096).bfloat16(),
               "experts_8x1536x1024_bf16": (0.02 * torch.randn(8, 1536, 1024)).bfloat16()}
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "versions": {p: _version(p) for p in ("torch", "bitsandbytes", "torchao", "transformers")},
        "installed_mib": {p: _installed_mib(p) for p in ("bitsandbytes", "torchao")},
        "bitsandbytes_import_log": import_log,
        "bitsandbytes_cpu_round_trip_by_shape": bitsandbytes_shapes(),
        "tensors": tensor_rows(weights, args.repeats),
        "forward": forward_rows(["tiny-qwen3", "tiny-qwen3-moe"]),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Where MGM-2B's image path spends its time, and what compiling the frozen towers buys.

    python bench/image_path.py --out bench/results/<date>-image_path-mgm2b-h200.json [--images 1 2 3]

Builds MGM-2B at its real shapes (random init, bf16, on the GPU) and times, for micro-batches of N images:
- `clip`: the frozen CLIP tower's forward (no grad), `aux`: the frozen ConvNeXt tower's forward (no grad),
- `encode`: `encode_images` as the training step runs it (towers, the aux maps' upsampling and concatenation, patch-info
  mining and `mm_projector`), forward and backward into the trainable projectors,
each eager, then with both towers `torch.compile`d (`compiled`; `encode` still runs the upsampling, mining and
projector eagerly), then also with the ConvNeXt in channels-last memory format (`compiled+channels_last`), then as
`speed.compile` runs it (`image_path`: `MGMForCausalLM.compile_image_path`, the towers and the upsampling, mining and
projector compiled; channels-last undone). The compiled runs' `encode` output is compared with the eager one (max
relative difference, bf16). bench/results/2026-12-04-image_path-mgm2b-h200.json predates the `image_path` setting.
Medians over `--steps` timed calls after `--warmup` untimed ones (CUDA synchronised).
Writes one JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import peft
import torch
import transformers

from mgmlora.models import load_model
from mgmlora.models.args import ModelArgs
from mgmlora.training.lora import LoraArgs
from mgmlora.training.trainable import Trainability, apply_trainability


def timed(fn, warmup: int, steps: int, sync) -> list[float]:
    """Seconds of each timed call of `fn` (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    """Builds MGM-2B, times each piece of the image path per setting, writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="mgm-2b", help="tiny-mgm: a CPU smoke run of this script")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with device:
        loaded = load_model(ModelArgs(preset=args.preset, dtype="bfloat16"))
    model, _ = apply_trainability(loaded, LoraArgs(preset="balanced", lora_dropout=0.0), Trainability())
    model.to(device).train()
    mgm, info = loaded.model, loaded.info
    gen = torch.Generator(device=device).manual_seed(0)

    def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(n, 3, info.image_size, info.image_size, generator=gen, device=device),
                torch.randn(n, 3, info.image_size_aux, info.image_size_aux, generator=gen, device=device))

    def pieces(images, images_aux):
        def clip():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                mgm.vision_tower(images.to(torch.bfloat16), output_hidden_states=True)

        def aux():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                mgm.vision_tower_aux(images_aux.to(torch.bfloat16))

        def encode():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                mgm.encode_images(images, images_aux).float().sum().backward()
            for p in model.parameters():
                p.grad = None
        return {"clip": clip, "aux": aux, "encode": encode}

    def reference(n: int) -> torch.Tensor:
        images, images_aux = inputs_fixed[n]
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            return mgm.encode_images(images, images_aux).float()

    inputs_fixed = {n: inputs(n) for n in args.images}
    eager_out = {n: reference(n) for n in args.images}
    settings = {}
    for setting in ("eager", "compiled", "compiled+channels_last", "image_path"):
        torch.compiler.reset()
        if setting.startswith("compiled"):
            mgm.vision_tower.compile()
            mgm.vision_tower_aux.compile()
        if setting == "compiled+channels_last":
            mgm.vision_tower_aux.to(memory_format=torch.channels_last)
        if setting == "image_path":
            mgm.vision_tower_aux.to(memory_format=torch.contiguous_format)
            mgm.compile_image_path()
        rows = {}
        for n in args.images:
            row = {}
            for name, fn in pieces(*inputs_fixed[n]).items():
                s = timed(fn, args.warmup, args.steps, sync)
                row[f"{name}_s_median"] = statistics.median(s)
                row[f"{name}_s_all"] = s
            out = reference(n)
            row["encode_max_rel_diff_vs_eager"] = float((out - eager_out[n]).abs().max()
                                                         / eager_out[n].abs().max())
            rows[n] = row
            print(setting, n, {k: round(v, 5) for k, v in row.items() if not k.endswith("_all")}, flush=True)
        settings[setting] = rows
    mgm.uncompile_image_path()
    result = {
        "command": "python bench/image_path.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
        "model": args.preset, "image_size": info.image_size, "image_size_aux": info.image_size_aux,
        "warmup": args.warmup, "steps": args.steps, "settings": settings,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

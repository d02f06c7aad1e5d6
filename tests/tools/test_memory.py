"""The memory estimator against the committed GPU peaks it was not fitted on (bench/results), and bin/estimate.py.

Tolerance: the estimate of `torch.cuda.max_memory_allocated` is within 15% of each held-out measured peak
(TOLERANCE). The files its constants were fitted on (CALIBRATION) are not a test of it, and neither are the tiny CPU
models (RECOMPUTE_LIVE was set on them, and their allocator peak varies with the machine's CPU kernels).
"""

import json
import os
import shlex
from dataclasses import replace

import pytest

from mgmlora.cli import parse_files
from mgmlora.commands import estimate as estimate_cli
from mgmlora.errors import UsageError
from mgmlora.models.args import ModelArgs
from mgmlora.models.quantization import QuantizationArgs
from mgmlora.tools.memory import RunShape, estimate, run_from_tree
from mgmlora.training.lora import LoraArgs
from mgmlora.training.loss import SpeedArgs
from mgmlora.training.trainable import Trainability
from tests.conftest import ROOT, launch_files, load_script


def run_from_config(paths, overrides=None):
    """The estimate's inputs as bin/estimate.py gets them: the CLI's parser, then the library."""
    return run_from_tree(parse_files(paths, overrides))


@pytest.mark.parametrize("override,message", [
    (["--data.init_args.batch_size", "0"], r"^data.init_args.batch_size must be >= 1 \(got 0\)\.$"),
    (["--trainer.accumulate_grad_batches", "0"], r"^trainer.accumulate_grad_batches must be >= 1 \(got 0\)\.$"),
    (["--data.init_args.max_tokens", "0"], r"^data.init_args.max_tokens must be >= 1 \(got 0\)\.$"),
    (["--data.init_args.max_length", "0"], r"^data.init_args.max_length must be >= 1 \(got 0\)\.$"),
])
def test_counts_fit_refuses_are_refused_not_estimated_as_fitting(override, message):
    # before: batch_size 0 was "total 0.00 GiB ... verdict: fits", accumulate 0 silently estimated as 1
    with pytest.raises(UsageError, match=message):
        run_from_config([ROOT / "configs" / "demo.yaml"], override)


RESULTS = ROOT / "bench" / "results"


train_step = load_script(ROOT / "bench" / "train_step.py", "train_step")
TOLERANCE = 0.15  # the estimate's bar: within 15% of the measured peak (torch.cuda.max_memory_allocated)
# Runs made before `model.speed` existed computed the loss on full logits; their commands cannot say so.
FULL_LOSS_BEFORE_SPEED = {"2026-11-23-mgm2b_lora_zero2_2048-h100.json", "2026-11-23-mgm2b_lora_zero2_24gib-h100.json",
                          "2026-11-23-mgm2b_full_zero2_24gib-h100.json",
                          "2026-11-23-mgm2b_full_zero2_offload_24gib-h100.json",
                          "2026-11-23-qwen3-30b-a3b_lora_chameleons_zero2_1gpu-h100.json",
                          "2026-11-23-qwen3-30b-a3b_lora_chameleons_zero3_1gpu-h100.json"}
# Smoke runs trained on the bundled ~315-token sample under max_length 1024: their rows were far shorter than the
# config's limit, so the config cannot describe them (they are not memory measurements of the config).
SHORT_ROW_SMOKE_RUNS = {"2026-11-23-mgm2b_lora-smoke-h100.json", "2026-11-23-qwen3-8b_lora_chameleons-smoke-h100.json",
                        "2026-11-23-qwen3-30b-a3b_lora_chameleons-smoke-h100.json"}


# Calibration: the results committed when the estimate's constants were set (docs/design/memory.md). ACT_HIDDEN,
# ACT_MLP and WORKSPACE_GIB were fitted on the first 17 files (2026-11-23, with the estimator itself); RECOMPUTE_LIVE
# was set on the tiny CPU models while checking that the next 11 GPU files moved by at most ~1.5%; MOE_BACKWARD_ROWS
# on the last two. Every other file is held out: the estimate predicts it, it was not fitted to it. Only held-out
# files test the estimate; FULL_LOSS_BEFORE_SPEED above names calibration files too and stays for the record.
CALIBRATION = frozenset({
    # fitted on (commit of the estimator)
    "2026-11-23-gpu_tests-h100.json", "2026-11-23-mgm2b_full_zero2_24gib-h100.json",
    "2026-11-23-mgm2b_full_zero2_offload_24gib-h100.json", "2026-11-23-mgm2b_lora-smoke-h100.json",
    "2026-11-23-mgm2b_lora_zero2_2048-h100.json", "2026-11-23-mgm2b_lora_zero2_24gib-h100.json",
    "2026-11-23-qwen3-30b-a3b_lora_chameleons-smoke-h100.json",
    "2026-11-23-qwen3-30b-a3b_lora_chameleons_zero2_1gpu-h100.json",
    "2026-11-23-qwen3-30b-a3b_lora_chameleons_zero3_1gpu-h100.json",
    "2026-11-23-qwen3-8b_lora_chameleons-smoke-h100.json",
    "2026-11-23-train_step-mgm2b-h100.json", "2026-11-23-train_step-qwen3-30b-a3b-h100.json",
    "2026-11-23-train_step_parity-mgm2b-h100.json", "2026-11-23-train_step_parity-qwen3-30b-a3b-h100.json",
    "2026-11-23-train_step_profile-mgm2b-h100.json", "2026-11-23-train_step_r8_attention-qwen3-30b-a3b-h100.json",
    "2026-11-23-train_step_r8_experts-qwen3-30b-a3b-h100.json",
    # looked at while RECOMPUTE_LIVE was set
    "2026-11-23-mgm2b_lora_zero2_1gpu-h200.json", "2026-11-23-mgm2b_lora_zero2_2gpu-h200.json",
    "2026-11-23-mgm2b_lora_zero2_acc8_fastpath_off-h200.json", "2026-11-23-mgm2b_lora_zero2_acc8_fastpath_on-h200.json",
    "2026-11-23-qwen3-30b-a3b_lora_chameleons_zero2_1gpu-h200.json",
    "2026-11-23-qwen3-30b-a3b_lora_chameleons_zero2_2gpu-h200.json",
    "2026-11-23-qwen3-30b-a3b_lora_chameleons_zero3_2gpu-h200.json", "2026-11-23-train_step_fast-mgm2b-h200.json",
    "2026-11-23-train_step_fast-qwen3-30b-a3b-h200.json", "2026-11-23-train_step_levers-mgm2b-h200.json",
    "2026-11-23-train_step_levers-qwen3-30b-a3b-h200.json",
    # the MoE backward term (`"MoE layer's backward (fitted)"`) was set in session 43 on these two: the growth of the
    # FP8 overlay's peak from the loop's largest pack to the isolated worst-case step
    "2026-12-06-qwen3-30b-a3b_lora_chameleons_fp8_loop_dropout0-h100.json",
    "2026-12-06-train_step_fp8_keepattn_worstcase_x64-qwen3-30b-a3b-h100.json",
})


def _fit_smoke_cases(held_out: bool):
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        if not result.get("command", "").startswith("python bench/fit_smoke.py") or path.name in SHORT_ROW_SMOKE_RUNS:
            continue
        if not result.get("peak_mem_alloc_gib"):  # a CPU run (a loop profile): no GPU memory to predict
            continue
        if (path.name not in CALIBRATION) == held_out:
            gap = pytest.mark.xfail(strict=True, reason="known estimate gap") if path.name in RUN_GAPS else ()
            yield pytest.param(path.name, result, id=path.name, marks=gap)


# Known gaps of the estimate, kept visible: strict expected failures turn into errors once the estimate covers them.
# Both are held-out rows. MGM-2B with 8 packed samples and checkpointing: the estimate is 18% (chunked) and 35% (liger)
# low; not yet found which term misses (the vision path of 8 images and the recomputed layer at 16k positions are the
# candidates).
# MGM-2B's compiled steps without checkpointing come out higher than measured, more so since the image path compiles
# too (394c9b7) and with 1,024-position loss chunks: 1.04x (2026-11-30) to 1.13x (bf16 x2) and 1.17x (FP8 x3), which
# the estimate does not model (inductor keeps fewer of the image path's tensors): on the safe side, outside 15% here
# (the same FP8 x3 step on an H100 in session 34: 1.17x as well).
ESTIMATE_GAPS = {"2026-11-30-train_step_budget-mgm2b-h200.json:chunked+packing+nocast+fused+compilex8",
                 "2026-11-30-train_step_budget-mgm2b-h200.json:liger+packing+nocast+fused+compilex8",
                 "2026-12-05-train_step_fp8-mgm2b-h200.json:chunked+packing+nocast+fused+compile+nockptx3",
                 "2026-12-05-train_step_fp8_best_x3-mgm2b-h100.json:chunked+packing+nocast+fused+compile+nockptx3",
                 *(f"2026-12-06-train_step_fp8_best_x3_call{n}-mgm2b-h200.json:chunked+packing+nocast+fused+compile"
                   "+nockptx3" for n in (1, 2, 3)),  # the same step, three calls of session 37
                 # and profiled on an H100 in session 44 (1.17x), and beside the compiled loss in session 44's A/B,
                 # which holds less still (1.28x: the estimate bounds `compiled` by the eager chunk's fp32 copies)
                 "2026-12-06-train_step_profile_fp8_x3-mgm2b-h100.json:chunked+packing+nocast+fused+compile+nockptx3",
                 *(f"2026-12-06-train_step_fp8_x3_compiled_loss_ab{n}-mgm2b-h200.json:{loss}+packing+nocast+fused"
                   "+compile+nockptx3" for n in (1, 2) for loss in ("chunked", "compiled"))}

# MGM-2B's 128 samples over 64 balanced micro-batches with the chunked loss ran out of memory at the 24 GiB cap with
# 21.1 GiB allocated and 1.7 GiB reserved but free (fragmentation under varying row shapes, which the estimate does
# not model); the estimate at the worst-case micro-batch (2 x 2048 positions) is 23.5 GiB, under the cap.
# The FP8 packed loop at 40 micro-batches ran out of memory at the 24 GiB cap (23.31 GiB allocated) while the estimate
# at the largest micro-batch it could reach (5,182 positions, 5,248 padded) is 22.4 GiB; its 48-micro-batch runs
# measure 22.28 GiB against an estimate of 20.34 (9% under, inside the 15% bar). The estimate misses about 2 GiB of
# the FP8 packed loop (not yet found which term; the bf16 packed loop's estimate is within 1% of its measurement).
RUN_GAPS = {"2026-12-04-mgm2b_lora_recipe_loop_24gib_window128_acc64_chunked-h200.json",
            "2026-12-06-mgm2b_lora_packed_fp8_loop_24gib_acc40-h200.json"}
# Packed runs that predate bench/fit_smoke.py's `positions_per_micro_batch`, with the largest pack that later runs of
# the same command, data (bench/make_chameleons.py, same arguments) and seed recorded: the Chameleons recipe's 64
# samples in one pack on one GPU, whose largest pack the session-42 loops recorded as 36,890 positions
# (2026-12-06-qwen3-30b-a3b_lora_chameleons_fp8_loop*-h100.json). Sized there, not at the worst case of 64 x 1,024
# positions, which their data never reached (median tokens/s x step time: about 36,100-36,200 a step).
PACK_AS_RECORDED_LATER = {"2026-12-06-qwen3-30b-a3b_lora_chameleons_1gpu_x64_compile_fp8_keepattn-h100.json": 36890,
                          "2026-12-06-qwen3-30b-a3b_lora_chameleons_1gpu_x64_compile_fp8-h100.json": 36890}


def _train_step_cases(held_out: bool):
    for path in sorted(RESULTS.glob("*train_step*.json")):
        if (path.name in CALIBRATION) == held_out:
            continue
        result = json.loads(path.read_text())
        for variant, rec in result["variants"].items():
            if "peak_alloc_gib" in rec:
                case = f"{path.name}:{variant}"
                gap = pytest.mark.xfail(strict=True, reason="known estimate gap") if case in ESTIMATE_GAPS else ()
                yield pytest.param(result, variant, rec, id=case, marks=gap)


# Configs changed after some runs: each entry restores a config's settings as they were when the run was made (before
# the run's own overrides, which still win). (result file name prefix, config) -> overrides; every matching prefix
# applies, in order.
ZERO2 = ["--config", "configs/strategy/zero2.yaml"]  # mgm2b_lora.yaml ran under ZeRO-2 until 2026-11-30's loop runs
_MGM_BEFORE_PACKING = ["--model.speed.packing", "false", "--model.speed.pad_to_multiple", "0"]
CONFIG_AS_RUN = {
    ("2026-11-23", "configs/mgm2b_lora.yaml"): ["--model.model.gradient_checkpointing", "true", *_MGM_BEFORE_PACKING,
                                                *ZERO2],
    **{(prefix, "configs/mgm2b_lora.yaml"): [*_MGM_BEFORE_PACKING, *ZERO2]
       for prefix in ("2026-11-30-mgm2b_lora_24gib-", "2026-11-30-mgm2b_lora_24gib_acc16",
                      "2026-11-30-mgm2b_lora_24gib_rows2048", "2026-11-30-mgm2b_lora_nocap")},
    ("2026-11-30-mgm2b_lora_24gib_loop-", "configs/mgm2b_lora.yaml"): ZERO2,
    # mgm2b_lora_packed.yaml was a whole file (ZeRO-2, no row padding) when these runs were made; now an overlay
    ("2026-11-30-mgm2b_lora_packed", "configs/mgm2b_lora_packed.yaml"): ["--model.speed.pad_to_multiple", "0", *ZERO2],
    # bench/ab_mgm_loop.sh's old side (b846d97's configs unpacked into .ab_old/): the packed overlay used Liger's loss
    **{(prefix, "configs/mgm2b_lora_packed.yaml"): ["--model.speed.loss", "liger", "--model.speed.loss_chunk_size",
                                                   "2048"]
       for prefix in ("2026-12-04-mgm2b_lora_recipe_loop_24gib_packed_round2_before_imagecompile",
                      "2026-12-04-mgm2b_lora_recipe_loop_24gib_window128_acc56_liger_before_imagecompile")},
    # expert LoRA ran through PEFT's path (W + B A per call) until the split became the default (session 29)
    ("2026-11-30-qwen3-30b-a3b_qlora_experts_r8", "configs/qwen3-30b-a3b_qlora_chameleons.yaml"): [
        "--model.speed.expert_lora", "peft"],
    ("2026-11-23", "configs/qwen3-30b-a3b_lora_chameleons.yaml"): [
        "--model.speed.packing", "false", "--model.speed.loss", "chunked", "--data.init_args.batch_size", "2",
        "--trainer.accumulate_grad_batches", "4"],
}


# Loop runs whose `data.max_tokens` only checked: the estimate is taken at the largest micro-batch their sampler formed
# (bench/micro_batches.py: 2026-12-06-mgm2b_packed_largest_micro_batch-cpu.json), padded to speed.pad_to_multiple
# (128), not at the cap they were given (6,144), which no micro-batch of theirs came near.
FORMED_MAX_TOKENS = {"2026-12-06-mgm2b_lora_packed_fp8_loop_24gib_acc48": 4480,  # 4,444 formed
                     "2026-12-06-mgm2b_lora_packed_fp8_loop_24gib_acc40": 5248}  # 5,182 formed, the most it could reach


def _config_as_run(name: str, config: str) -> list[str]:
    return [o for (prefix, path), overrides in CONFIG_AS_RUN.items() if path == config and name.startswith(prefix)
            for o in overrides]


def test_the_held_out_measurements_are_most_of_the_committed_ones():
    assert all((RESULTS / name).is_file() for name in CALIBRATION)  # the list names real files
    runs = [len(list(_fit_smoke_cases(held_out))) for held_out in (False, True)]
    steps = [len(list(_train_step_cases(held_out))) for held_out in (False, True)]
    assert runs[1] >= 40 and steps[1] >= 60, (runs, steps)  # 48 runs and 70 steps held out, 14 and 43 calibrate


@pytest.mark.integration  # dozens of cases, 0.1-1 s each: together ~20 s of the fast tier's 2 minutes on CI
@pytest.mark.parametrize("name,result", list(_fit_smoke_cases(held_out=True)))
def test_estimate_predicts_held_out_training_runs(name, result, in_repo_root):
    _check_training_run(name, result)


def _check_training_run(name, result):
    args = shlex.split(result["command"])[3:]
    if args[0] == "--memory_cap_gib":
        args = args[2:]
    # an A/B run's old side read an older commit's configs from .ab_old/ (bench/ab_mgm_loop.sh): CONFIG_AS_RUN
    # restores how they differed
    configs = [os.path.normpath(args[i + 1]).removeprefix(".ab_old/") for i, a in enumerate(args) if a == "--config"]
    # a recipe that is now an overlay runs after its base (fragments under configs/strategy/ stay as named)
    configs = [str(f.relative_to(ROOT)) for c in configs
               for f in (launch_files(ROOT / c) if (ROOT / c).parent == ROOT / "configs" else [ROOT / c])]
    overrides = [a for i, a in enumerate(args[1:]) if a != "--config" and args[i] != "--config"]
    restored = [o for c in configs for o in _config_as_run(name, c)]
    if any(c.startswith("configs/strategy/") for c in configs):  # the run named its strategy: it wins
        restored = [o for i, o in enumerate(restored) if ZERO2 not in (restored[i:i + 2], restored[i - 1:i + 1])]
    overrides = restored + overrides
    if name in FULL_LOSS_BEFORE_SPEED:
        overrides += ["--model.speed.loss", "full"]
    overrides += [o for prefix, formed in FORMED_MAX_TOKENS.items() if name.startswith(prefix)
                  for o in ("--data.init_args.max_tokens", str(formed))]
    model, lora, trainability, speed, shape = run_from_config(configs, overrides)
    formed = result.get("positions_per_micro_batch") or (
        {"max": PACK_AS_RECORDED_LATER[name]} if name in PACK_AS_RECORDED_LATER else None)
    if formed and speed.packing and shape.window_samples is None and not result.get("oom"):
        # a packed run that recorded its packs (bench/fit_smoke.py): sized at its largest, padded as the run padded
        # it, not at the config's worst case (batch_size x max_length), which the run's data never reached; an
        # out-of-memory run never recorded the pack that failed, so it keeps the worst case
        multiple = max(speed.pad_to_multiple, 1)
        largest = -(-formed["max"] // multiple) * multiple
        shape = replace(shape, seq_len=-(-largest // shape.batch_size))
    est = estimate(model, lora, trainability, speed, shape)
    if result.get("oom"):  # the run asked for more than its cap: the estimate must not say it fits
        assert est.total_gib > result["memory_cap_gib"], est.items
        return
    measured = result["peak_mem_alloc_gib"]
    assert abs(est.total_gib / measured - 1) <= TOLERANCE, (est.total_gib, measured, est.items)


@pytest.mark.integration  # dozens of cases, 0.1-1 s each: together ~20 s of the fast tier's 2 minutes on CI
@pytest.mark.parametrize("result,variant,rec", list(_train_step_cases(held_out=True)))
def test_estimate_predicts_held_out_benchmark_steps(result, variant, rec):
    _check_bench_step(result, variant, rec)


def _check_bench_step(result, variant, rec):
    name, flags, _ = train_step.parse_variant(variant)
    est = _estimate_bench_step(result, name, flags, rec)
    assert abs(est.total_gib / rec["peak_alloc_gib"] - 1) <= TOLERANCE, (est.total_gib, rec["peak_alloc_gib"])


def _estimate_bench_step(result, name, flags, rec):
    """The estimate of one bench/train_step.py variant: its model, LoRA, loss, packing and batch geometry."""
    lora = LoraArgs(preset=result["lora"]["preset"], lora_dropout=0.0,
                    target_experts=result["lora"].get("target_experts", False),
                    **({"r": result["lora"]["r"], "lora_alpha": 2 * result["lora"]["r"]} if result["lora"].get("r")
                       else {}))
    command = shlex.split(result["command"])
    chunk = int(command[command.index("--chunk") + 1]) if "--chunk" in command else 2048  # train_step's default
    keep = "all" if "keepexperts" in flags else "gate_up" if "keepgateup" in flags else "none"
    speed = SpeedArgs(loss="full" if name == "plain" else "chunked", packing="packing" in flags,
                      expert_lora="split" if "splitexperts" in flags else "peft", loss_chunk_size=chunk,
                      compile="compile" in flags, keep_expert_outputs=keep, keep_attention_outputs="keepattn" in flags)
    if name == "liger":
        speed.loss = "liger"  # constructed directly: the liger package is not needed to estimate
    samples = rec["samples_per_step"]
    if speed.packing:  # the packed row's positions, spread over the samples (MGM: one image each)
        shape = RunShape(batch_size=samples, seq_len=int(rec["positions_per_step"] / samples))
    else:
        shape = RunShape(batch_size=samples, seq_len=int(rec["padded_positions_per_step"] / samples))
    model = ModelArgs(preset=result["model"], gradient_checkpointing="nockpt" not in flags,
                      dtype="bfloat16", quantization=_quantization_as_run(result.get("quantization")))
    return estimate(model, lora, Trainability(), speed, shape)


def _quantization_as_run(recorded) -> QuantizationArgs | None:
    """A run's `--quant`: a dict since `--expert_products` exists; the bare format name before it (2026-12-05's first
    FP8 runs, when FP8 experts always multiplied in FP8)."""
    if recorded is None or recorded == "none":
        return None
    if isinstance(recorded, str):
        return QuantizationArgs(quant_type=recorded, **({"expert_products": "fp8"} if recorded == "fp8" else {}))
    return QuantizationArgs(**recorded)


def test_estimate_cli_gives_a_verdict_and_the_cheapest_fix(in_repo_root, capsys):
    result = estimate_cli.main(["--config", "configs/mgm2b_lora.yaml", "--gpu_memory_gib", "24",
                                "--model.trainable.llm", "full"])
    assert result["fits"] is False and "offload" in result["cheapest_fix"]["change"]
    assert result["cheapest_fix"]["total_gib"] <= 24
    out = capsys.readouterr().out
    assert "optimizer states" in out and "LM head + loss" in out and "does NOT fit" in out
    lora = estimate_cli.main(["--config", "configs/mgm2b_lora.yaml", "--gpu_memory_gib", "24", "--json"])
    assert lora["fits"] is True and lora["trainable_per_component"]["lora adapters"][0] > 0


@pytest.mark.integration  # over 1 s: keeps the fast tier under CI's 2 minutes
def test_a_config_training_refuses_gets_the_refusal_not_a_figure(in_repo_root):
    """An NF4 MoE base without checkpointing stops at start in training (fastpath.py): the estimate says why."""
    qlora = ["--config", "configs/qwen3-30b-a3b_qlora_chameleons.yaml"]
    assert estimate_cli.main([*qlora, "--json"])["total_gib"] > 0  # the recipe checkpoints
    with pytest.raises(UsageError, match="gradient_checkpointing: true only: NF4 experts"):
        estimate_cli.main([*qlora, "--model.model.gradient_checkpointing", "false"])
    fp8 = estimate_cli.main([*qlora, "--model.model.gradient_checkpointing", "false", "--json",
                             "--model.model.quantization.quant_type", "fp8"])
    assert fp8["total_gib"] > 0  # frozen FP8 experts train without it


@pytest.mark.integration  # dozens of cases, 0.1-1 s each: together ~20 s of the fast tier's 2 minutes on CI
@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_can_be_estimated(path, in_repo_root):
    est = estimate(*run_from_config([str(f) for f in launch_files(path)]))
    assert est.total_gib > 0 and all(v >= 0 for v in est.items.values())


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
def test_kept_expert_outputs_are_counted_per_moe_layer_and_routed_row(in_repo_root):
    from mgmlora.models.transformers_private import checkpoint_inside_forward

    config = ["configs/qwen3-30b-a3b_lora_chameleons.yaml"]
    estimates = {keep: estimate(*run_from_config(config, ["--model.speed.keep_expert_outputs", keep,
                                                          "--model.speed.compile", "false"]))
                 for keep in ("none", "gate_up", "all")}
    shape = estimates["none"].settings["shape"]
    tokens = shape["batch_size"] * shape["seq_len"]
    # Qwen3-30B-A3B (its config.json): 48 MoE layers, 8 experts per token of width 768, hidden 2048; bf16 outputs
    gate_up = 48 * tokens * 8 * 2 * 768 * 2 / 2**30
    down = 48 * tokens * 8 * 2048 * 2 / 2**30
    key = "kept expert outputs (speed.keep_expert_outputs)"
    assert key not in estimates["none"].items
    assert estimates["gate_up"].items[key] == pytest.approx(gate_up)
    assert estimates["all"].items[key] == pytest.approx(gate_up + down)
    assert estimates["all"].total_gib - estimates["none"].total_gib == pytest.approx(gate_up + down)
    # compiled layers that hold their own checkpoint never recompute the down projection: `all` keeps gate/up only
    compiled = estimate(*run_from_config(config, ["--model.speed.keep_expert_outputs", "all"]))  # compile: true
    assert compiled.items[key] == pytest.approx(gate_up if checkpoint_inside_forward() else gate_up + down)


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
def test_kept_attention_outputs_are_counted_per_layer_and_position(in_repo_root):
    config = ["configs/qwen3-30b-a3b_lora_chameleons.yaml"]
    off, on = (estimate(*run_from_config(config, ["--model.speed.keep_attention_outputs", flag]))
               for flag in ("false", "true"))
    shape = off.settings["shape"]
    tokens = shape["batch_size"] * shape["seq_len"]
    # Qwen3-30B-A3B (its config.json): 48 layers, 32 query heads of dimension 128; bf16 output, float32 log-sum-exp
    kept = 48 * tokens * 32 * (128 * 2 + 4) / 2**30
    key = "kept attention outputs (speed.keep_attention_outputs)"
    assert key not in off.items and on.items[key] == pytest.approx(kept)
    assert on.total_gib - off.total_gib == pytest.approx(kept)


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
def test_lora_dropout_counts_each_adapters_dropped_input_in_the_recomputed_layer(in_repo_root):
    config = ["configs/qwen3-30b-a3b_lora_chameleons.yaml"]  # the chameleons preset: dropout 0.05
    on, off = (estimate(*run_from_config(config, extra)) for extra in ([], ["--model.lora.lora_dropout", "0.0"]))
    shape = on.settings["shape"]
    tokens = shape["batch_size"] * shape["seq_len"]
    # Qwen3-30B-A3B (its config.json): LoRA on q, k, v (input 2,048 each) and o (input 32 heads x 128 = 4,096); a bf16
    # dropped copy and a one-byte mask each, one layer's under checkpointing
    dropped = tokens * (3 * 2048 + 4096) * (2 + 1) / 2**30
    key = "LoRA dropout (dropped inputs and masks)"
    assert key not in off.items and on.items[key] == pytest.approx(dropped)
    assert on.total_gib - off.total_gib == pytest.approx(dropped)
    # against the measurement: the FP8 overlay's loop with and without dropout, one call, the same packs; the term at
    # their largest pack is within 20% of the difference of their peaks (it is 15% over)
    runs = [json.loads((RESULTS / f"2026-12-06-qwen3-30b-a3b_lora_chameleons_fp8_loop{tag}-h100.json").read_text())
            for tag in ("", "_dropout0")]
    assert runs[0]["positions_per_micro_batch"] == runs[1]["positions_per_micro_batch"]
    measured = runs[0]["peak_mem_alloc_gib"] - runs[1]["peak_mem_alloc_gib"]
    counted = runs[0]["positions_per_micro_batch"]["max"] * (3 * 2048 + 4096) * (2 + 1) / 2**30
    assert abs(counted / measured - 1) <= 0.2, (counted, measured)


@pytest.mark.integration  # several estimates of a 30B model's meta copy: ~2 s
def test_the_moe_backward_allowance_is_per_routed_row_and_is_the_fit_it_claims(in_repo_root):
    """A checkpointed MoE model gets MOE_BACKWARD_ROWS hidden-size values per routed row (top_k per token) for the
    layer in its backward; dense models and runs without checkpointing none. The factor is the one that makes the
    estimate grow as the two calibration peaks did (docs/design/memory.md): half or double it would not."""
    overlay = ["configs/qwen3-30b-a3b_lora_chameleons.yaml", "configs/qwen3-30b-a3b_lora_chameleons_fp8.yaml"]
    key = "MoE layer's backward (fitted)"
    est = estimate(*run_from_config(overlay))
    shape = est.settings["shape"]
    # Qwen3-30B-A3B (its config.json): hidden 2,048, 8 experts per token; bf16 values
    per_row = 2048 * 2 / 2**30
    assert est.items[key] == pytest.approx(shape["batch_size"] * shape["seq_len"] * 8 * 2 * per_row)
    no_ckpt = ["--model.model.gradient_checkpointing", "false", "--model.speed.keep_attention_outputs", "false"]
    assert key not in estimate(*run_from_config(overlay, no_ckpt)).items
    assert key not in estimate(*run_from_config(["configs/qwen3-8b_lora_chameleons.yaml"])).items  # dense
    # the calibration pair at LoRA dropout 0: the overlay's loop (largest pack recorded) and the isolated step at the
    # worst case (64 x 1,024 positions), different programs around the same layers: their peaks' difference is what
    # the extra positions hold
    loop = json.loads((RESULTS / "2026-12-06-qwen3-30b-a3b_lora_chameleons_fp8_loop_dropout0-h100.json").read_text())
    step = json.loads((RESULTS / "2026-12-06-train_step_fp8_keepattn_worstcase_x64-qwen3-30b-a3b-h100.json")
                      .read_text())
    measured = next(iter(step["variants"].values()))["peak_alloc_gib"] - loop["peak_mem_alloc_gib"]
    model, lora, trainability, speed, shape = run_from_config(overlay, ["--model.lora.lora_dropout", "0.0"])
    packs = (-(-loop["positions_per_micro_batch"]["max"] // 64), 1024)
    at = [estimate(model, lora, trainability, speed, replace(shape, seq_len=n)) for n in packs]
    grown = at[1].total_gib - at[0].total_gib
    allowance = at[1].items[key] - at[0].items[key]  # at the factor in use
    for factor, close in ((1.0, True), (0.5, False), (2.0, False)):
        with_factor = grown + (factor - 1) * allowance
        assert (abs(with_factor / measured - 1) <= 0.02) == close, (factor, with_factor, measured)


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
def test_lora_dropout_is_not_counted_without_checkpointing(in_repo_root):
    """MGM-2B's recipe (dropout 0.1, no checkpointing): its measured runs sit within 15% without a dropout term."""
    est = estimate(*run_from_config(["configs/mgm2b_lora.yaml"]))
    assert not est.settings["model"]["gradient_checkpointing"]
    assert "LoRA dropout (dropped inputs and masks)" not in est.items
    ckpt = estimate(*run_from_config(["configs/mgm2b_lora.yaml"], ["--model.model.gradient_checkpointing", "true"]))
    assert "LoRA dropout (dropped inputs and masks)" in ckpt.items  # the same recipe checkpointed: counted


def test_kept_attention_outputs_training_refuses_get_the_refusal_not_a_figure(in_repo_root):
    with pytest.raises(UsageError, match="keep_attention_outputs: true keeps the output of SDPA's attention kernel"):
        estimate_cli.main(["--config", "configs/qwen3-8b_lora_chat.yaml", "--model.model.attn_implementation",
                           "eager", "--model.speed.keep_attention_outputs", "true"])


@pytest.mark.parametrize("overrides", [
    ["--config", "configs/qwen3-8b_lora_chat.yaml"],  # dense
    ["--config", "configs/qwen3-30b-a3b_lora_chameleons.yaml", "--model.model.gradient_checkpointing", "false"],
    ["--config", "configs/qwen3-30b-a3b_lora_chameleons.yaml", "--model.lora.target_experts", "true",
     "--model.speed.expert_lora", "peft"]])
def test_kept_expert_outputs_training_refuses_get_the_refusal_not_a_figure(overrides, in_repo_root):
    with pytest.raises(UsageError, match="model.speed.keep_expert_outputs: all"):
        estimate_cli.main([*overrides, "--model.speed.keep_expert_outputs", "all"])


def test_largest_batch_size_is_the_last_one_that_fits(in_repo_root):
    from dataclasses import replace

    from mgmlora.tools.memory import largest_batch_size

    run = run_from_config(["configs/qwen3-30b-a3b_lora_chameleons.yaml"], ["--model.speed.packing", "true"])
    model_args, lora, trainable, speed, shape = run
    best = largest_batch_size(*run, 80)
    assert best >= 1
    assert estimate(model_args, lora, trainable, speed, replace(shape, batch_size=best)).fits(80)
    assert not estimate(model_args, lora, trainable, speed, replace(shape, batch_size=best + 1)).fits(80)
    assert largest_batch_size(*run, 10) == 0  # 57 GiB of frozen weights never fit 10 GiB


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
def test_config_overrides_accept_lightning_cli_short_forms(in_repo_root):
    short = run_from_config(["configs/mgm2b_lora.yaml", "configs/strategy/zero2.yaml"], [
        "--data.max_length", "512", "--data.batch_size", "4", "--trainer.strategy.stage", "3", "--trainer.devices",
        "[0,1]"])
    long = run_from_config(["configs/mgm2b_lora.yaml", "configs/strategy/zero2.yaml"], [
        "--data.init_args.max_length", "512", "--data.init_args.batch_size", "4",
        "--trainer.strategy.init_args.stage", "3", "--trainer.devices", "2"])
    assert short[-1] == long[-1]
    assert (short[-1].seq_len, short[-1].batch_size, short[-1].zero_stage, short[-1].world_size) == (512, 4, 3, 2)
    named = run_from_config(["configs/demo_chat.yaml"], ["--trainer.strategy", "deepspeed_stage_2_offload"])[-1]
    assert (named.zero_stage, named.offload_optimizer) == (2, True)


@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_weights_are_itemised_at_the_bytes_the_quantised_model_holds(double_quant):
    from dataclasses import replace

    from mgmlora.models import load_model
    from mgmlora.models.quantization import Nf4Weight, QuantizationArgs
    from mgmlora.tools.memory import GIB

    quant = QuantizationArgs(compute_dtype="float32", backend="torch", double_quant=double_quant)
    args = ModelArgs(preset="tiny-qwen3-moe", dtype="float32", quantization=quant)
    shape = RunShape(batch_size=2, seq_len=64, precision="32-true", device="cpu")
    lora = LoraArgs(preset="balanced")
    items = estimate(args, lora, Trainability(), SpeedArgs(), shape).items
    model = load_model(args).model
    stored = sum(b.nbytes for m in model.modules() if isinstance(m, Nf4Weight) for b in m.buffers())
    assert items["base weights (4-bit NF4)"] * GIB == pytest.approx(stored, rel=0.01)
    # what is not quantised stays at the model dtype: the two lines and the 4-bit count add up to the full base
    full = estimate(replace(args, quantization=None), lora, Trainability(), SpeedArgs(), shape).items
    quantised_weights = sum(m.shape.numel() for m in model.modules() if isinstance(m, Nf4Weight))
    not_quantised = items["base weights (frozen, not quantised)"] * GIB
    assert not_quantised + quantised_weights * 4 == pytest.approx(full["base weights (frozen)"] * GIB, rel=1e-9)


@pytest.mark.parametrize("expert_products", ["dequantized", "fp8"])
def test_fp8_weights_are_itemised_at_the_bytes_the_fp8_model_holds(expert_products):
    from dataclasses import replace

    from mgmlora.models import load_model
    from mgmlora.models.fp8 import Fp8Linear, Fp8Weight
    from mgmlora.models.quantization import QuantizationArgs
    from mgmlora.tools.memory import GIB

    args = ModelArgs(preset="tiny-qwen3-moe", dtype="float32",
                     quantization=QuantizationArgs(quant_type="fp8", compute_dtype="float32",
                                                   expert_products=expert_products))
    shape = RunShape(batch_size=2, seq_len=64, precision="32-true", device="cpu")
    lora = LoraArgs(preset="balanced")
    items = estimate(args, lora, Trainability(), SpeedArgs(), shape).items
    model = load_model(args).model
    fp8 = [m for m in model.modules() if isinstance(m, (Fp8Weight, Fp8Linear))]
    stored = sum(t.nbytes for m in fp8 for t in (m.e4m3, m.scale))
    assert items["base weights (FP8)"] * GIB == stored  # one byte per weight and a 4-byte scale per row, exactly
    full = estimate(replace(args, quantization=None), lora, Trainability(), SpeedArgs(), shape).items
    quantised_weights = sum(m.e4m3.numel() for m in fp8)
    not_quantised = items["base weights (frozen, not quantised)"] * GIB
    assert not_quantised + quantised_weights * 4 == pytest.approx(full["base weights (frozen)"] * GIB, rel=1e-9)
    experts = max(sum(m.shape.numel() for m in layer.modules() if isinstance(m, Fp8Weight) and len(m.shape) == 3)
                  for layer in model.model.layers)
    if expert_products == "fp8":  # no dequantised copy: the backward's transposed codes of the largest layer, 1 byte
        assert "dequantised weights (one layer, transient)" not in items
        assert items["FP8 codes read transposed (one layer, transient)"] * GIB == experts
    else:  # one layer's experts dequantised to the compute dtype (float32 here), as NF4's
        assert "FP8 codes read transposed (one layer, transient)" not in items
        assert items["dequantised weights (one layer, transient)"] * GIB == experts * 4


@pytest.mark.parametrize("expert_lora,copies", [("peft", 3), ("split", 1)])
def test_4bit_expert_lora_dequantises_one_layer_and_peft_also_merges_it(expert_lora, copies):
    # PEFT's path adds the weight + delta and its gradient to the dequantised experts; split LoRA forms neither
    from mgmlora.models import load_model
    from mgmlora.models.quantization import Nf4Weight, QuantizationArgs
    from mgmlora.tools.memory import GIB

    args = ModelArgs(preset="tiny-qwen3-moe", dtype="float32",
                     quantization=QuantizationArgs(compute_dtype="float32", backend="torch"))
    shape = RunShape(batch_size=2, seq_len=64, precision="32-true", device="cpu")
    lora = LoraArgs(preset="chameleons", lora_dropout=0.0, target_experts=True)
    items = estimate(args, lora, Trainability(), SpeedArgs(expert_lora=expert_lora), shape).items
    experts = load_model(args).model.model.layers[0].mlp.experts
    one_layer = sum(m.shape.numel() for m in experts.modules() if isinstance(m, Nf4Weight)) * 4  # fp32 compute
    assert items["dequantised weights (one layer, transient)"] * GIB == pytest.approx(copies * one_layer, rel=1e-9)


@pytest.mark.integration  # over 1 s: keeps the fast tier under CI's 2 minutes
def test_a_4bit_moe_run_is_never_told_to_use_deepspeed(in_repo_root, capsys):
    # configs/qwen3-30b-a3b_qlora_chameleons.yaml with expert LoRA r8: 28.6 GiB estimated (27.6 measured on an H200).
    # Without the 4-bit base the cheapest fix would be optimizer offload, which DeepSpeed cannot run on 4-bit experts.
    experts = ["--model.lora.r", "8", "--model.lora.lora_alpha", "16", "--model.lora.target_experts", "true"]
    result = estimate_cli.main(["--config", "configs/qwen3-30b-a3b_qlora_chameleons.yaml", "--gpu_memory_gib", "24",
                                *experts])
    assert result["fits"] is False and result["cheapest_fix"] is None
    assert "a quantised MoE base runs without DeepSpeed" in capsys.readouterr().out
    # the candidate the filter removes would have fitted: without it, the answer above would be offload
    offload = estimate_cli.main(["--config", "configs/qwen3-30b-a3b_qlora_chameleons.yaml", "--config",
                                 "configs/strategy/zero2_offload.yaml", "--gpu_memory_gib", "24", *experts, "--json"])
    assert offload["fits"] is True


def test_fp8_rows_and_kept_weights_are_counted_as_quantize_layers_stores_them():
    """A linear the FP8 kernels cannot take stays in the model dtype, and experts the model keeps transposed
    ((E, in, out)) have their last dimension as output rows: one FP8 scale each."""
    import torch
    from torch import nn

    from mgmlora.models.fp8 import Fp8Linear, Fp8Weight
    from mgmlora.models.quantization import QuantizationArgs, quantize_layers
    from mgmlora.tools.memory import _quantizable

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.is_transposed = True
            self.gate_up_proj = nn.Parameter(torch.randn(4, 32, 64))  # (E, hidden, 2 x intermediate)
            self.down_proj = nn.Parameter(torch.randn(4, 32, 48))  # (E, intermediate, hidden)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts, self.proj, self.odd = Experts(), nn.Linear(32, 48), nn.Linear(32, 40)  # 40: not 16-aligned

    layers = nn.ModuleList([Layer()])
    linears, experts, rows = _quantizable(layers, fp8_only=True)
    assert linears == [48 * 32] and experts == [4 * 32 * 64 + 4 * 32 * 48]
    assert rows == 48 + 4 * 64 + 4 * 48  # by hand: the output rows
    counts = quantize_layers(layers, QuantizationArgs(quant_type="fp8", compute_dtype="float32"), torch.device("cpu"))
    assert counts == {"linear": 1, "experts": 2, "kept": 1}
    stored = [m for m in layers.modules() if isinstance(m, (Fp8Weight, Fp8Linear))]
    assert sum(m.scale.numel() for m in stored) == rows  # one scale per row, as stored
    assert _quantizable(layers.__class__([Layer()]), fp8_only=False)[0] == [48 * 32, 40 * 32]  # NF4 takes any shape


def test_a_dense_fp8_model_counts_the_transposed_codes_whatever_its_expert_setting():
    # dense linears never dequantise: the backward reads the largest one's codes transposed, one byte each
    from mgmlora.models import load_model
    from mgmlora.models.fp8 import Fp8Linear
    from mgmlora.tools.memory import GIB

    args = ModelArgs(preset="tiny-qwen3", dtype="float32",
                     quantization=QuantizationArgs(quant_type="fp8", compute_dtype="float32"))
    items = estimate(args, LoraArgs(preset="balanced"), Trainability(), SpeedArgs(),
                     RunShape(batch_size=2, seq_len=64, precision="32-true", device="cpu")).items
    largest = max(m.e4m3.numel() for m in load_model(args).model.modules() if isinstance(m, Fp8Linear))
    assert "dequantised weights (one layer, transient)" not in items
    assert items["FP8 codes read transposed (one layer, transient)"] * GIB == largest


def test_a_budget_keeps_the_headroom_free():
    """The verdict (and the largest micro-batch, the cheapest fix and the speed plan through it) keeps HEADROOM_GIB of
    the budget free: 79.5 GiB of allocations do not fit an 80 GiB card, whose CUDA context and fragments need room."""
    from mgmlora.tools.memory import HEADROOM_GIB, Estimate, format_estimate

    assert HEADROOM_GIB == 1.0
    est = Estimate(items={"weights": 79.5}, total_gib=79.5, trainable={})
    assert not est.fits(80) and est.fits(80.5)
    assert "verdict: does NOT fit in 80 GiB (with 1 GiB kept free" in format_estimate(est, 80)

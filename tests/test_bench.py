"""bench/train_step.py runs on CPU with a tiny model, and its fast paths start on the plain path's loss curve."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, load_script


@pytest.mark.integration
def test_train_step_benchmark_writes_every_variant_and_the_fast_path_tracks_the_plain_one(tmp_path):
    out = tmp_path / "bench.json"
    # inductor needs a C++ compiler on the CPU; without one, tests/training/test_fastpath.py covers compile (aot_eager)
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    variants = "plain,chunked,chunked+packing,chunked+packing+dense,plainx4,chunked+nocast+fused+nockpt"
    variants += ",chunked+compile" if compiler else ""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--model", "tiny-qwen3",
                           "--variants", variants, "--warmup", "0", "--steps", "4",
                           "--lr", "1e-3", "--budget_gib", "1000", "--profile", "--out", str(out)],
                          capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    variants = result["variants"]
    assert set(variants) == {"plain", "chunked", "chunked+packing", "chunked+packing+dense", "plainx4",
                             "chunked+nocast+fused+nockpt"} | (
        {"chunked+compile"} if compiler else set())
    for name, rec in variants.items():
        assert rec["tokens_per_s"] > 0 and rec["flops_per_step_model"] > 0 and len(rec["losses"]) == 4, name
        # --profile: the top operators; no kernel kinds without a GPU
        assert rec["profile_top_ops"] and rec["profile_device"] is None and "profile_error" not in rec, name
        assert rec["profile_compiled_graphs"] == 0, name  # the profiled step comes after the compilation
        assert not any(op["op"].startswith("ProfilerStep") for op in rec["profile_top_ops"]), name  # a marker, no op
        # hardware FLOPs add the checkpointed recompute: none without checkpointing
        recompute = rec["flops_per_step_hardware"] - rec["flops_per_step_model"]
        assert recompute == 0 if name.endswith("nockpt") else recompute > 0, name
    # same weights, same batches, fp32: the fast paths follow the plain path step by step
    assert variants["chunked"]["loss_max_rel_diff_vs_plain"] < 1e-4
    assert variants["chunked+packing"]["loss_max_rel_diff_vs_plain"] < 1e-4
    assert variants["chunked+packing+dense"]["loss_max_rel_diff_vs_plain"] < 1e-4  # dense mask vs per-sample attention
    # every variant fits 1000 GiB: each path's best is its fastest variant (recomputed here from the records)
    best = result["best_within_budget"]
    fastest = lambda names: max(names, key=lambda n: variants[n]["tokens_per_s"])  # noqa: E731
    assert best["plain"] == fastest([n for n in variants if n.startswith("plain")])
    assert best["ours"] == fastest([n for n in variants if not n.startswith("plain")])
    assert abs(best["ratio"] - variants[best["ours"]]["tokens_per_s"] / variants[best["plain"]]["tokens_per_s"]) < 1e-3
    assert variants["chunked+nocast+fused+nockpt"]["loss_max_rel_diff_vs_plain"] < 1e-4  # each switch is exact
    if compiler:
        assert variants["chunked+compile"]["loss_max_rel_diff_vs_plain"] < 1e-3  # inductor reorders float sums
    assert variants["plainx4"]["samples_per_step"] == 4 and "loss_max_rel_diff_vs_plain" not in variants["plainx4"]
    assert variants["plain"]["padded_positions_per_step"] >= variants["plain"]["positions_per_step"]
    assert "plain" in proc.stdout and "x plain" in proc.stdout  # the printed table


def _bench_module(name="train_step"):
    return load_script(ROOT / "bench" / f"{name}.py")


def test_best_within_budget_excludes_variants_over_the_budget_and_failed_ones():
    records = {"plain": {"tokens_per_s": 100, "peak_alloc_gib": 10},
               "plainx4": {"tokens_per_s": 300, "peak_alloc_gib": 30},  # faster, but over 24 GiB
               "chunked": {"tokens_per_s": 150, "peak_alloc_gib": 9},
               "chunked+packingx8": {"tokens_per_s": 400, "peak_alloc_gib": 20},
               "chunked+packingx16": {"oom": "CUDA out of memory"}}
    best = _bench_module().best_within_budget(records, 24)
    assert (best["plain"], best["ours"], best["ratio"]) == ("plain", "chunked+packingx8", 4.0)
    assert _bench_module().best_within_budget(records, 5)["ratio"] is None  # nothing fits: no ratio


def test_a_variant_whose_flags_fail_half_way_leaves_the_model_as_it_found_it():
    # +splitexperts without expert LoRA fails after +eagerexperts and +nocast have been applied; the next variant
    # must not run on their leftovers
    from mgmlora.models import load_model
    from mgmlora.models.args import ModelArgs
    from mgmlora.models.transformers_private import experts_implementation
    from mgmlora.training.fastpath import lora_layers
    from mgmlora.training.lora import LoraArgs
    from mgmlora.training.trainable import Trainability, apply_trainability

    loaded = load_model(ModelArgs(preset="tiny-qwen3-moe"))
    model, _ = apply_trainability(loaded, LoraArgs(preset="balanced", lora_dropout=0.0), Trainability())
    before = experts_implementation(loaded.model.config)
    with pytest.raises(ValueError, match="splitexperts"):
        _bench_module().switch_on(model, loaded, {"eagerexperts", "nocast", "splitexperts"})
    assert experts_implementation(loaded.model.config) == before
    assert all(layer.cast_input_dtype_enabled for layer in lora_layers(model))


@pytest.mark.parametrize(("quant_type", "target_experts", "flags", "refused"), [
    ("nf4", False, {"nockpt"}, True), ("fp8", False, {"nockpt"}, False), ("fp8", True, {"nockpt"}, True),
    ("fp8", True, {"nockpt", "fastexperts", "splitexperts"}, False)])
def test_nockpt_on_a_quantised_moe_is_refused_where_training_refuses_it(quant_type, target_experts, flags, refused):
    from mgmlora.models import load_model
    from mgmlora.models.args import ModelArgs
    from mgmlora.models.quantization import QuantizationArgs
    from mgmlora.training.lora import LoraArgs
    from mgmlora.training.trainable import Trainability, apply_trainability

    quant = QuantizationArgs(quant_type=quant_type, compute_dtype="float32")
    loaded = load_model(ModelArgs(preset="tiny-qwen3-moe", gradient_checkpointing=True, quantization=quant))
    model, _ = apply_trainability(loaded, LoraArgs(preset="balanced", target_experts=target_experts), Trainability())
    bench = _bench_module()
    if refused:
        with pytest.raises(ValueError, match="nockpt"):
            bench.switch_on(model, loaded, flags)
        return
    bench.switch_off(bench.switch_on(model, loaded, flags))


def test_packed_attention_flags_need_packing():
    parse = _bench_module().parse_variant
    assert parse("chunked+packing+flexx8") == ("chunked", {"packing", "flex"}, 8)
    for bad in ("chunked+flex", "chunked+packing+flex+dense"):
        try:
            parse(bad)
        except SystemExit:
            continue
        raise AssertionError(f"{bad} was accepted")


def _fit_smoke():
    """bench/fit_smoke.py as a module (it imports loop_timing from its own folder)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return _bench_module("fit_smoke")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_fit_smoke_records_generation_cost_against_training_time():
    """bench/fit_smoke.py's `generation` field from scalars as TensorBoard returns them (gen_cost reads it)."""
    fit_smoke = _fit_smoke()
    assert fit_smoke._generation_cost({"perf/step_time_s": [9.0, 2.0]}) is None  # the run did not generate
    cost = fit_smoke._generation_cost({"val_gen/time_s": [3.0, 5.0], "val_gen/rougeL": [0.1, 0.2],
                                       "perf/train_time_s": [10.0, 40.0], "perf/step_time_s": [9.0, 4.0, 5.0, 6.0]})
    # median step after two warm-up steps: 5.5 s; 10% of training time allows 0.55 s per step, so a 5 s
    # validation needs 5 / 0.55 = 9.1 steps between validations
    assert cost["time_s_total"] == 8.0 and cost["share_of_train_time"] == 0.2 and cost["step_time_s_median"] == 5.5
    assert cost["steps_between_validations_for_10pct"] == 9.1
    assert cost["scores"] == {"val_gen/rougeL": [0.1, 0.2]}


def test_fit_smoke_records_every_micro_batchs_positions_and_its_largest():
    """Peak memory follows the largest micro-batch: fit_smoke keeps each one's positions, warm-up steps included."""
    from types import SimpleNamespace

    timing = _fit_smoke()._CountingTiming()
    assert timing.positions() is None
    text_only = SimpleNamespace(info=SimpleNamespace(image_tokens=0))
    # by hand: attention masks of 5, 2 and 7 real positions (padding 0) -> 3 micro-batches, largest 7, median 5
    for mask in ([1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]):
        batch = SimpleNamespace(attention_mask=torch.tensor([mask]))
        timing.on_train_batch_end(None, text_only, None, batch, 0)
    assert timing.positions() == {"micro_batches": 3, "max": 7, "median": 5}


def test_busy_time_counts_overlaps_once_and_names_the_largest_gaps():
    busy_and_gaps = _bench_module("loop_timing").busy_and_gaps
    # by hand: a and b overlap -> busy [0, 12]; c and d touch -> busy [20, 31]; e -> [40, 50];
    # busy 12 + 11 + 10 = 33 us of a 50 us span; gaps 8 us (b -> c) and 9 us (d -> e)
    out = busy_and_gaps([(20, 30, "c"), (0, 10, "a"), (5, 12, "b"), (30, 31, "d"), (40, 50, "e")])
    assert out["busy_s"] == pytest.approx(33e-6) and out["span_s"] == pytest.approx(50e-6)
    assert out["idle_share"] == pytest.approx(17 / 50, abs=1e-4)
    assert [(g["us"], g["after"], g["before"]) for g in out["largest_gaps"]] == [(9, "d", "e"), (8, "b", "c")]
    assert busy_and_gaps([])["idle_share"] is None


def test_a_profiled_fit_smoke_run_reports_no_loop_speed():
    fit_smoke = _fit_smoke()
    timing = {"tokens_per_s_median": 13.0, "supervised_tokens_per_s_median": 7.0, "step_time_s_median": 25.0,
              "loop_timing": {"loop_overhead": 0.6}}
    plain = {"oom": False, **timing, "loop_profile": None}
    assert fit_smoke._withhold_profiled_timing(plain) == plain
    profiled = fit_smoke._withhold_profiled_timing({**plain, "loop_profile": {"profiled_micro_batches": 8}})
    assert profiled["timing_with_profiler"] == timing
    assert all(profiled[k] is None for k in timing) and profiled["loop_profile"] == {"profiled_micro_batches": 8}


def test_device_time_splits_by_kernel_kind_without_counting_overlaps_twice():
    loop_timing = _bench_module("loop_timing")
    # by hand, in us: a grouped GEMM [0, 40], a cuBLAS GEMM [40, 60], a flash kernel [70, 90] overlapping a compiled
    # kernel [80, 100] on another stream, a vectorized add [110, 115] and an unknown kernel [115, 120]
    kernels = [(0, 40, "cutlass::device_kernel<...GroupProblemShape<...>>"), (40, 60, "nvjet_sm90_tst_256x160"),
               (70, 90, "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
                         "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >>"),
               (80, 100, "triton_per_fused_add_sum_0"),
               (110, 115, "at::native::vectorized_elementwise_kernel<4, add>"), (115, 120, "mystery")]
    out = loop_timing.device_breakdown(kernels)
    # busy: [0, 60] + [70, 100] + [110, 120] = 100 us of a 120 us span
    assert out["busy_ms"] == pytest.approx(0.1) and out["span_ms"] == pytest.approx(0.12)
    assert out["idle_share"] == pytest.approx(20 / 120, abs=1e-4)
    kinds = out["kinds"]
    assert list(kinds) == ["grouped gemm", "gemm", "attention", "compiled (triton)", "elementwise", "other"]
    assert kinds["grouped gemm"]["share_of_busy"] == pytest.approx(0.4)
    assert kinds["attention"]["ms"] == pytest.approx(0.02) and kinds["compiled (triton)"]["ms"] == pytest.approx(0.02)
    assert sum(k["kernels"] for k in kinds.values()) == 6
    # each kind names its kernels by time: two launches of one compiled kernel add up, the longer kernel comes first
    more = kernels + [(120, 150, "triton_poi_fused_mul_1"), (150, 160, "triton_per_fused_add_sum_0")]
    top = loop_timing.device_breakdown(more, top_per_kind=1)["kinds"]["compiled (triton)"]["top"]
    assert top == [{"name": "triton_per_fused_add_sum_0", "ms": pytest.approx(0.03), "launches": 2}]


def test_a_wait_inside_a_library_is_named_by_the_library_frame_and_ours_by_ours():
    loop_timing = _bench_module("loop_timing")
    lightning_wait = ["<built-in method item of Tensor object>", "torch/optim/optimizer.py(90): _get_value",
                      "lightning/pytorch/loops/optimization/automatic.py(307): _training_step",
                      "src/mgmlora/cli.py(248): main"]
    assert loop_timing._library(lightning_wait) == lightning_wait[2]
    assert loop_timing._source(lightning_wait) == "mgmlora/cli.py(248): main"
    ours = ["nn.Module: Linear_0", "src/mgmlora/training/loss.py(101): lm_loss", "lightning/pytorch/x.py(1): f"]
    assert loop_timing._library(ours) is None  # our own code waits: no library to name
    assert loop_timing._library(["torch/utils/checkpoint.py(1): f"]) is None
    # the bench scripts appear by file name alone; the standard library's top-level modules are no library
    assert loop_timing._library(["contextlib.py(141): __exit__", "fit_smoke.py(210): on_train_batch_end"]) is None
    assert loop_timing._source(["contextlib.py(141): __exit__", "fit_smoke.py(210): f"]) == "fit_smoke.py(210): f"


@pytest.mark.integration
def test_the_loop_profile_counts_the_host_waits_of_real_micro_batches(tmp_path):
    import lightning as L

    from mgmlora.data.datamodule import ChatDataModule
    from mgmlora.models.args import ModelArgs
    from mgmlora.training.checkpoint import AdapterCheckpointIO
    from mgmlora.training.lora import LoraArgs
    from mgmlora.training.loss import SpeedArgs
    from mgmlora.training.module import LoraLitModule
    from mgmlora.training.optim import OptimArgs
    from tests.conftest import TOKENIZER, TRAIN, connect_data

    loop_timing = _bench_module("loop_timing")
    profile = loop_timing.LoopProfile(skip_steps=1, micro_batches=2, trace=str(tmp_path / "trace.json"))
    module = LoraLitModule(ModelArgs(preset="tiny-qwen3", tokenizer_path=str(TOKENIZER), dtype="float32",
                                     gradient_checkpointing=False), LoraArgs(preset="balanced"), OptimArgs(lr=1e-3),
                           speed=SpeedArgs(packing=True))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, accumulate_grad_batches=2, logger=False, callbacks=[profile],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, plugins=[AdapterCheckpointIO()], default_root_dir=tmp_path)
    trainer.fit(module, connect_data(ChatDataModule(str(TRAIN), batch_size=2, seed=1), module))
    summary = profile.summary()
    assert summary["profiled_micro_batches"] == 2 and summary["skipped_optimizer_steps"] == 1
    # the chunked loss picks the supervised positions with a boolean mask: one nonzero per micro-batch at least
    waits = summary["host_waits_per_micro_batch"]
    assert waits["aten::nonzero"]["count"] >= 1
    assert any(k.startswith("aten::nonzero @ mgmlora/training/loss.py") for k in waits)  # named by its function
    # a wait inside a library (here transformers' check for restarting position ids) is named by its frame as well
    assert any(" in transformers/" in k or " in lightning/" in k for k in waits), sorted(waits)
    assert summary["idle_share"] is None and summary["kinds"] == {}  # no device activity on the CPU
    assert (tmp_path / "trace.json").stat().st_size > 0


@pytest.mark.parametrize(("flag", "skipped_per_layer"), [("keepgateup", 1), ("keepexperts", 2)])
def test_kept_expert_outputs_switch_on_and_off_like_the_other_flags(flag, skipped_per_layer):
    import torch

    from mgmlora.models import load_model
    from mgmlora.models.args import ModelArgs
    from mgmlora.training.lora import LoraArgs
    from mgmlora.training.trainable import Trainability, apply_trainability
    from tests.models.test_recompute import _GroupedGemms

    loaded = load_model(ModelArgs(preset="tiny-qwen3-moe", dtype="float32"))
    model, _ = apply_trainability(loaded, LoraArgs(preset="balanced", lora_dropout=0.0), Trainability())
    model.train()
    ids = torch.randint(0, 512, (2, 16))

    def backward_gemms() -> int:
        loss = model(input_ids=ids, labels=ids).loss
        with _GroupedGemms() as counted:
            loss.backward()
        return counted.count

    bench = _bench_module()
    before = backward_gemms()
    undo = bench.switch_on(model, loaded, {flag})
    assert backward_gemms() == before - 2 * skipped_per_layer  # two MoE layers' kept GEMMs are not recomputed
    bench.switch_off(undo)
    assert backward_gemms() == before  # whole-layer recompute again
    for bad in ("chunked+keepexperts+nockpt", "chunked+keepgateup+keepexperts", "chunked+keepattn+nockpt"):
        with pytest.raises(SystemExit, match="keepgateup or \\+keepexperts"):
            bench.parse_variant(bad)
    with pytest.raises(SystemExit, match="FlexAttention"):
        bench.parse_variant("chunked+packing+flex+keepattn")


def test_profiles_leave_out_annotation_ranges_and_keep_operators():
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    annotation = _bench_module("loop_timing").annotation
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("Optimizer.step#AdamW.step"):  # as torch.optim marks its step
            torch.ones(4, 4) @ torch.ones(4, 4)
    marked = {e.key: annotation(e) for e in prof.key_averages()}
    assert marked["Optimizer.step#AdamW.step"] and not marked["aten::mm"]


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
@pytest.mark.parametrize("extra", [[], ["--data.init_args.drop_last", "true"],
                                   ["--trainer.devices", "2", "--trainer.strategy", "ddp"]])
def test_micro_batches_reports_the_largest_micro_batch_of_fits_own_sampler(extra, tmp_path, monkeypatch, in_repo_root):
    # bench/micro_batches.py says which positions a run's micro-batches reached: the ones fit's sampler forms, on every
    # rank and with the run's drop_last, not those of a one-rank sampler that wraps the last window
    from mgmlora.cli import main as cli_main

    script = load_script(ROOT / "bench" / "micro_batches.py")
    fit = ["--config", "configs/demo.yaml", "--data.init_args.batch_size", "1", "--data.init_args.window_samples", "12",
           "--data.init_args.seed", "11", *extra]
    out = tmp_path / "mb.json"
    monkeypatch.setattr(sys, "argv", ["micro_batches.py", str(out), "--accumulate", "3", "5", "--", *fit])
    script.main()
    reported = json.loads(out.read_text())["largest_micro_batch"]
    for accumulate in (3, 5):
        cli = cli_main([*fit, "--trainer.accumulate_grad_batches", str(accumulate), "--trainer.accelerator", "cpu",
                        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                        "--trainer.callbacks", "[]"], run=False)
        data = cli.datamodule
        data.trainer = cli.trainer
        data.setup("fit")
        sampler = data._train_sampler()  # the sampler fit iterates
        formed = max(sum(sampler.costs[i] for i in batch) for batch in sampler._epoch_batches(0, accumulate))
        assert reported[str(accumulate)] == [formed], (extra, accumulate)


def test_grouped_gemm_routes_every_row_to_one_expert():
    """bench/grouped_gemm.py's offsets: one end per expert, non-decreasing, positions x top_k rows in all."""
    routing = _bench_module("grouped_gemm")._routing
    offsets = routing(positions=100, top_k=8, experts=16, seed=0, device=torch.device("cpu"))
    assert offsets.shape == (16,) and offsets.dtype == torch.int32
    assert int(offsets[-1]) == 800 and bool((offsets[1:] >= offsets[:-1]).all())
    assert torch.equal(offsets, routing(100, 8, 16, 0, torch.device("cpu")))  # seeded: the same rows per run


def test_dropout_rng_runs_every_variant_and_records_what_it_cannot_run(tmp_path):
    """bench/dropout_rng.py on the CPU: each variant's uncompiled dropout keeps about 1 - p (binomial bounds), the
    no-dropout variant keeps everything, and the Triton variant (GPU only) records its error instead of stopping."""
    out = tmp_path / "d.json"
    assert _bench_module("dropout_rng").main(["--out", str(out), "--positions", "256", "--hidden", "64",
                                              "--attn_width", "64", "--r", "4", "--p", "0.25"]) == 0
    variants = json.loads(out.read_text())["variants"]
    assert variants["none"]["keep_rate"] == 1.0
    sd = (0.25 * 0.75 / (256 * 64)) ** 0.5
    for name in ("inductor", "fallback_random", "aten_mask"):
        assert abs(variants[name]["keep_rate"] - 0.75) < 5 * sd, name
        assert variants[name]["ran"] is True
    assert "error" in variants["triton_mask"]
    x = torch.randn(512, 64) + 10  # no zeros: a zero out is a dropped element
    for how in ("inductor", "aten_mask"):  # kept elements are rescaled by 1 / (1 - p)
        y = _bench_module("dropout_rng")._drop(x, 0.25, how, salt=1)
        kept = y != 0
        assert torch.allclose(y[kept], x[kept] / 0.75), how


@pytest.mark.integration
@pytest.mark.parametrize("how", ["inductor", "aten_mask"])
def test_dropout_rng_draws_an_own_mask_per_adapter_when_compiled(how):
    """Compiled (inductor on the CPU), q, k and v each draw their own mask from the same normed input: with three
    identical adapters their outputs still differ. Inductor may merge identical calls of an opaque op; the compiled
    function must not."""
    bench = _bench_module("dropout_rng")
    torch.manual_seed(0)
    h, attn = torch.randn(64, 16, requires_grad=True), torch.randn(64, 32, requires_grad=True)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    adapters = [(a, b)] * 3 + [(torch.randn(4, 32), torch.randn(16, 4))]
    fn = torch.compile(bench.layer_inputs, fullgraph=True)  # a training graph: the one a step runs
    _, _, (q, k, v, _) = fn(h, attn, torch.ones(16), adapters, 0.5, how, 1.0)
    assert not torch.equal(q, k) and not torch.equal(k, v) and not torch.equal(q, v)

#!/usr/bin/env bash
# The GPU half of mgmlora's checks and measurements, in as few machine-minutes as possible.
#
#   bash bench/gpu_suite.sh fences|tests|mgm|mgm_lora|mgm_full|qwen|speed|parity|profile|levers|sweep|levers+sweep|multi [OUT_DIR]
#
# Run from the repository root on a CUDA machine. Wheels the image lacks (deepspeed 0.19.8 and its dependencies,
# jsonargparse and its dependencies) are installed from ./.whl when that folder exists (see bench/results/README.md).
# Parts (each fits one 10-minute call):
#   tests  every GPU-marked test (DeepSpeed ZeRO-2/3 save/reload with plain PEFT, accumulate 128 vs plain, bf16 fit)
#   mgm    MGM-2B at real shapes capped at 24 GiB: LoRA (configs/mgm2b_lora.yaml as written: one GPU, accumulate 128,
#          realistic lengths, a checkpoint at step 2) and the full fine-tune without and with optimizer offload
#          (mgm_lora: the LoRA run alone)
#   qwen   Qwen3-30B-A3B LoRA on one GPU, ZeRO-2 and ZeRO-3 (STAGES="2 3"), synthetic Chameleons-length data
#   speed  bench/train_step.py: plain transformers + PEFT vs mgmlora's step, MGM-2B and Qwen3-30B-A3B
#   parity the same from identical LoRA weights without warm-up: per-step losses of the fast paths vs the plain path
#          at real shapes, and the plain path at 8 samples per micro-batch
#   profile  MGM-2B step profiles (plain vs chunked) and Qwen3-30B-A3B expert LoRA vs attention-only (r8, 8 samples)
#   levers the fast path's model-level switches (+nocast, +fused, +compile, +nockpt) on MGM-2B, and Qwen3-30B-A3B's
#          experts as grouped GEMM vs transformers' per-expert loop
#   sweep  configs/sweep/mgm2b_lora_vs_full.yaml at real shapes (random init, synthetic rows), table + plots
#   levers+sweep  both at once on a 2-GPU machine: levers on GPU 0, the sweep on GPU 1
#   fast   the fast path's switches combined, without another job on the machine: MGM-2B (10 timed steps) and
#          Qwen3-30B-A3B attention LoRA r64 (plain at 2 and 8 samples vs liger + packing at 8)
#   fitpath the switches in the real training loop (MGM-2B, ZeRO-2, 8 micro-batches per step, off vs on), and
#          MGM-2B LoRA on one GPU with accumulation 64 (the 1-GPU reference for the multi part's 2-GPU run)
#   fill   the configs without a GPU row yet: qwen3-8b_lora_chameleons.yaml as written (plain Lightning, fused AdamW
#          with clipping) on synthetic Chameleons data, mgm2b_stage1.yaml (accumulate 16 instead of 64)
#   multi  several GPUs (2-GPU machine): Qwen3-30B-A3B on 1 and 2 GPUs (ZeRO-2) and 2 GPUs (ZeRO-3), MGM-2B on 2 GPUs
#          (ZeRO-2, accumulation 64 per GPU = the recipe's global 128), each with a checkpoint at the last step
#   moe_loop  (2 GPUs, side by side): Qwen3-30B-A3B with transformers' vs mgmlora's experts within 80 GiB,
#          r8 expert LoRA vs attention; MGM-2B recipes in the fit loop with the loop-overhead figure
#   experts14  (1 GPU): Qwen3-30B-A3B with mgmlora's experts vs plain within 80 GiB + parity, r8 expert
#          LoRA vs attention, the Chameleons recipe as written on one GPU
#   chameleons_1v2  (2 GPUs): the Chameleons recipe's optimizer step (global batch 64) on 1 and 2 GPUs
#   after16_mgm / after16_qwen  the budget runs' plain and fast best again after the package re-layout
#   experts_split  (1 GPU) Qwen3-30B-A3B r8 expert LoRA split beside the frozen experts vs PEFT's path, both compiled,
#          and attention-only LoRA compiled (model.speed.expert_lora)
#   peer_qwen / peer_qwen_experts / peer_mgm  (1 GPU each, under 10 minutes) ours against the peer a user would pick
#          instead, in interleaved rounds (bench/peers/rounds.py): TRL's SFTTrainer tuned for speed on Qwen3-30B-A3B
#          within 80 GiB (attention LoRA r64; expert LoRA r8), the plain transformers + PEFT path on MGM-2B within 24 GiB
#   ab     (1 GPU) this tree against another in ./.ab_old (`git archive <rev> src bench`, untracked, so it travels with
#          the working tree): Qwen3-30B-A3B attention LoRA on the FP8 base, compiled, x80 (VARIANT), interleaved rounds
#          (bench/peers/rounds.py --peer old); the A/B of one change to the step, AB names it in the result file;
#          OURS_VARIANT runs this tree's side with another variant (a setting's A/B: .ab_old = this tree)
#   fp8_nockpt  (1 GPU) Qwen3-30B-A3B attention LoRA on the FP8 base without checkpointing (x16-x32) against the
#          checkpointed x80, one process
#   keep_experts  (1 GPU) Qwen3-30B-A3B attention LoRA, compiled, keeping the frozen expert GEMMs' outputs under
#          checkpointing (x16-x32; QUANT=fp8 on the FP8 base, x24-x48, and no checkpointing at x16) against
#          whole-layer recompute, one process
#   recipe_mgm_fp8  (1 GPU) configs/mgm2b_lora_packed.yaml on the FP8 base in the fit loop under 24 GiB (56
#          micro-batches per 128 samples; ACCS=48 another call) and the best isolated FP8 step in the same call
#   fp8    the FP8 base against its bf16 twin (loss gap, first-look speed; Qwen3-30B-A3B 16 layers) and MGM-2B's step
#          on it; OURS_ARGS="--quant fp8" TAG=fp8 runs peer_qwen / peer_mgm on the FP8 base
#   qlora_qwen / qlora_qwen_experts / qlora_mgm / qlora_parity  (1 GPU each; bitsandbytes 0.50.2 from ./.whl) the
#          4-bit base: Qwen3-30B-A3B QLoRA attention r64 and expert r8 in the fit loop under 24 GiB, MGM-2B QLoRA
#          under 8 GiB, and 4-bit vs bf16 from identical weights (50-step losses, tokens/s)
#   budget_qwen / budget_mgm  each path's fastest variant within 80 / 24 GiB (bench/train_step.py
#          --budget_gib), packed attention vs FlexAttention, Qwen3-30B-A3B r8 attention vs expert LoRA with profiles
#   fences  (1 GPU) the fast path after the private-attribute fences (MGM's attention set through the configs'
#          constructor, experts on torch.nn.functional.grouped_mm only, uncompile through mgmlora.models.torch_private):
#          the same variants and shapes as the 2026-11-30 budget rows, to compare tokens/s and peak memory with them
#   gen_cost  validation generation (GenerationEval at the configs' default subset: 64 prompts, 64 new tokens, batch
#          16, greedy) in the real fit loop: MGM-2B LoRA (configs/mgm2b_lora.yaml, 24 GiB cap, a validation after each
#          of 2 optimizer steps) and the Qwen3-30B-A3B Chameleons recipe on one GPU (global batch 64 as 8 packed x
#          accumulate 8, a validation every 3 of 6 steps); random init never stops early, so every reply runs to
#          64 tokens (worst case)
#   experts_fp8_qwen  (1 GPU) one MoE layer's frozen expert products at Qwen3-30B-A3B's shapes, FP8 grouped GEMM
#          against dequantise + bf16 grouped GEMM, eager and compiled (bench/grouped_gemm.py); then the FP8 overlay's
#          isolated x64 kept-attention step and its fit loop at LoRA dropout 0 (the loop-vs-step ratio at equal
#          dropout, same call), then the step with expert_products fp8 where the products alone ran faster
#   dropout_rng  (1 GPU) LoRA dropout's masks in a compiled layer's input side: inductor's, ATen's, a Triton kernel's,
#          none
#   profile_mgm_fp8  (1 GPU) MGM-2B's best isolated step within 24 GiB (FP8 x3) with one steady-state step profiled
#   peer_loop_qwen  (1 GPU) configs/qwen3-30b-a3b_lora_chameleons_fp8.yaml as shipped in the fit loop against TRL's
#          SFTTrainer at the recipe's LoRA dropout, interleaved rounds (bench/peers/loop.py as ours' side)
#   loopgap_qwen  (1 GPU) configs/qwen3-30b-a3b_lora_chameleons_fp8.yaml's fit loop, which ran 0.90x its isolated
#          step: the loop as shipped, with LoRA dropout 0 (the bench step's and the TRL runner's), and one optimizer
#          step profiled (LOOP_PROFILE=1); then the isolated step at the pack's worst case, 64 x 1,024 positions, for
#          its peak memory
# Results land in OUT_DIR (default bench/results/new) as JSON, one file per run, each holding its exact command.
set -uo pipefail
part=${1:?part: tests|mgm|mgm_full|qwen|speed|parity|profile|qlora_qwen|qlora_qwen_experts|qlora_mgm|qlora_parity}
out=${2:-bench/results/new}
mkdir -p "$out"
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  touch /tmp/site/.installed  # parts started side by side install once
fi
if [ -d /tmp/site ]; then
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
day=$(date -u +%F)
gpu=$(python3 -c "import torch; n=torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
smoke() {  # NAME LIMIT_S ARGS...: one bench/fit_smoke.py run, killed after LIMIT_S seconds
  local name=$1 limit=$2; shift 2
  echo "== $name"
  # -k: a fit stops at SIGTERM only after its current micro-batch (mgmlora.training.preemption), and one that is still
  # compiling can hold the call to its limit; SIGKILL follows 60 s later
  timeout -k 60 "$limit" python3 bench/fit_smoke.py "$out/$day-$name-$gpu.json" "$@" > "$out/$name.log" 2>&1
  echo "rc=$? $(grep -E '"(oom|peak_mem_alloc_gib|step_time_s_median|tokens_per_s_median|optimizer_steps)"' \
    "$out/$day-$name-$gpu.json" 2>/dev/null | tr -d '\n ')"
  tail -n 3 "$out/$name.log"
}
z2="--config configs/strategy/zero2.yaml"  # configs/mgm2b_lora.yaml runs without DeepSpeed since 2026-11-30
common="--trainer.limit_val_batches 0 --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir /tmp/tb"
# configs/qwen3-30b-a3b_lora_chameleons_fp8.yaml's fit on bench/make_chameleons.py's /tmp/chameleons_big.json
qwen_fp8_fit="fit --config configs/qwen3-30b-a3b_lora_chameleons.yaml --config configs/qwen3-30b-a3b_lora_chameleons_fp8.yaml
     --model.model.model_path null --model.model.tokenizer_path tests/assets/tokenizer
     --data.init_args.train_path /tmp/chameleons_big.json --trainer.log_every_n_steps 1
     --trainer.num_sanity_val_steps 0 $common"
mgm="--model.model.model_path null --model.model.tokenizer_path tests/assets/gemma_tokenizer
     --data.init_args.train_path /tmp/mgm_real.json --data.init_args.image_folder tests/assets/llava
     --data.init_args.num_workers 4 $common"
[[ $part == mgm* || $part == recipe_mgm* || $part == gen_cost* || $part == qlora_mgm || $part == fitloop || $part == parity14 || $part == loop* || $part == *sweep || $part == multi || $part == fitpath || $part == fill ]] && \
  python3 bench/make_long_llava.py /tmp/mgm_real.json --text_tokens 100 1500 --copies 11 && \
  python3 bench/make_long_llava.py /tmp/mgm_val.json --text_tokens 100 1500 --copies 1 --seed 1
vs_best() {  # LOOP_JSON BEST_JSON: adds recipe_loop_vs_best_step (the loop's tokens/s over the best isolated step's)
  python3 - "$1" "$2" <<'PY'
import json, sys
loop_path, best_path = sys.argv[1:]
try:
    loop, best = json.load(open(loop_path)), json.load(open(best_path))
except (OSError, ValueError) as error:  # a run that left no JSON (time limit) has no ratio
    sys.exit(f"recipe_loop_vs_best_step: {error}")
best_tps = best.get("ours_tokens_per_s_median") or next(iter(best.get("variants", {}).values()), {}).get("tokens_per_s")
loop["best_step_tokens_per_s"] = best_tps
loop["best_step_file"] = best_path
# a profiled run (LOOP_PROFILE) reports no tokens/s: bench/fit_smoke.py withholds it
tps = loop.get("tokens_per_s_median")
loop["recipe_loop_vs_best_step"] = tps / best_tps if tps and best_tps else None
json.dump(loop, open(loop_path, "w"), indent=2)
print(loop_path, "recipe_loop_vs_best_step", loop["recipe_loop_vs_best_step"])
PY
}
levers() {
  timeout 300 python3 bench/train_step.py --model mgm-2b --variants \
    plain,chunked,chunked+nocast,chunked+fused,chunked+nocast+fused,chunked+nocast+fused+compile,\
chunked+nocast+fused+nockpt,liger+nocast+fused,plain+nockpt \
    --out "$out/$day-train_step_levers-mgm2b-$gpu.json" 2>&1 | tail -n 12
  timeout 200 python3 bench/train_step.py --model qwen3-30b-a3b --r 8 --target_experts --warmup 1 --steps 4 \
    --variants liger+packingx8,liger+packing+eagerexpertsx8,liger+packing+nocast+fusedx8 \
    --out "$out/$day-train_step_levers-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 6
}
sweep() {  # 10 optimizer steps of 8 micro-batches per variant (not the recipe's 128: GPU minutes), same rows
  OMP_NUM_THREADS=8 timeout ${SWEEP_LIMIT:-560} python3 bench/sweep.py --sweep configs/sweep/mgm2b_lora_vs_full.yaml \
    --steps 10 --output "$out/sweep_mgm2b" ${SWEEP_GPUS:+--gpus $SWEEP_GPUS} -- $mgm \
    --data.init_args.val_path /tmp/mgm_val.json --trainer.limit_val_batches 8 --trainer.val_check_interval 40 \
    --trainer.accumulate_grad_batches 8 --trainer.log_every_n_steps 1 \
    > "$out/sweep.log" 2>&1
  echo "sweep rc=$?"; tail -n 5 "$out/sweep.log"
}
case $part in
  tests)
    python3 -m pytest -m gpu -q -s tests 2>&1 | tee "$out/gpu_tests.log"
    ;;
  mgm|mgm_lora)
    # shellcheck disable=SC2086
    smoke mgm2b_lora_1gpu_24gib 330 --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml $mgm \
      --trainer.max_steps 2 --trainer.callbacks+=ModelCheckpoint --trainer.callbacks.every_n_train_steps=2 \
      --trainer.callbacks.filename=probe-{step}
    [[ $part == mgm_lora ]] && exit 0
    ;;&
  mgm|mgm_full)
    full="--model.trainable.llm full --model.optim.lr 1e-5 --trainer.max_steps 2 --trainer.accumulate_grad_batches 4"
    # shellcheck disable=SC2086
    smoke mgm2b_full_zero2_24gib 120 --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml \
      --config configs/strategy/zero2.yaml $mgm $full
    # shellcheck disable=SC2086
    smoke mgm2b_full_zero2_offload_24gib 240 --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml \
      --config configs/strategy/zero2_offload.yaml $mgm $full
    ;;
  qwen)
    python3 bench/make_chameleons.py /tmp/chameleons_synth.json --users 64 --items 12
    qwen="--model.model.model_path null --model.model.tokenizer_path tests/assets/tokenizer
          --data.init_args.train_path /tmp/chameleons_synth.json --trainer.devices 1 --trainer.max_steps 6
          --trainer.log_every_n_steps 1 --trainer.num_sanity_val_steps 0 $common"
    for stage in ${STAGES:-2 3}; do
      # shellcheck disable=SC2086
      smoke qwen3-30b-a3b_lora_chameleons_zero${stage}_1gpu 280 fit \
        --config configs/qwen3-30b-a3b_lora_chameleons.yaml --config configs/strategy/zero${stage}.yaml $qwen
    done
    ;;
  speed)
    timeout 240 python3 bench/train_step.py --model mgm-2b --variants plain,chunked,liger \
      --out "$out/$day-train_step-mgm2b-$gpu.json" 2>&1 | tail -n 8
    timeout 330 python3 bench/train_step.py --model qwen3-30b-a3b \
      --variants plain,chunked,chunked+packing,chunked+packingx8,liger+packingx8 \
      --out "$out/$day-train_step-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 10
    ;;
  parity)
    timeout 200 python3 bench/train_step.py --model mgm-2b --variants plain,chunked,liger --warmup 0 --steps 30 \
      --lr 1e-4 --out "$out/$day-train_step_parity-mgm2b-$gpu.json" 2>&1 | tail -n 6
    timeout 300 python3 bench/train_step.py --model qwen3-30b-a3b \
      --variants plain,chunked+packing,liger+packing,plainx8 --warmup 0 --steps 20 --lr 1e-4 \
      --out "$out/$day-train_step_parity-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 7
    ;;
  profile)
    timeout 100 python3 bench/train_step.py --model mgm-2b --variants plain,chunked --warmup 1 --steps 3 --profile \
      --out "$out/$day-train_step_profile-mgm2b-$gpu.json" 2>&1 | tail -n 4
    for experts in "" "--target_experts"; do
      name=attention; [ -n "$experts" ] && name=experts
      timeout 100 python3 bench/train_step.py --model qwen3-30b-a3b --r 8 $experts --variants chunked+packingx8 \
        --warmup 1 --steps 4 --out "$out/$day-train_step_r8_${name}-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 3
    done
    ;;
  levers)
    levers
    ;;
  sweep)
    sweep
    ;;
  levers+sweep)
    SWEEP_GPUS=1 sweep &
    CUDA_VISIBLE_DEVICES=0 levers
    wait
    ;;
  fast)
    timeout 300 python3 bench/train_step.py --model mgm-2b --steps 10 --variants plain,chunked,chunked+nocast+fused,\
chunked+nocast+fused+compile,chunked+nocast+fused+compile+nockpt,liger+nocast+fused+compile,plain+nockpt \
      --out "$out/$day-train_step_fast-mgm2b-$gpu.json" 2>&1 | tail -n 10
    timeout 250 python3 bench/train_step.py --model qwen3-30b-a3b \
      --variants plain,liger+packingx8,liger+packing+nocast+fusedx8,plainx8 \
      --out "$out/$day-train_step_fast-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 7
    ;;
  after16_mgm)  # after the re-layout (typed batch, LoadedModel.forward_hidden, one packed-row builder): the budget
    # run's MGM-2B plain best and fast best again, to compare with 2026-11-30-train_step_budget-mgm2b-h200.json
    timeout 290 python3 bench/train_step.py --model mgm-2b --budget_gib 24 --steps 5 \
      --variants plainx2,chunked+packing+nocast+fused+compile+nockptx2 \
      --out "$out/$day-train_step_after16-mgm2b-$gpu.json" 2>&1 | tail -n 4
    ;;
  after16_qwen)  # the same for Qwen3-30B-A3B (2026-11-30-train_step_budget_fastexperts-qwen3-30b-a3b-h200.json)
    timeout 420 python3 bench/train_step.py --model qwen3-30b-a3b --budget_gib 80 --steps 8 \
      --variants plainx8,liger+packing+nocast+fused+fastexpertsx48 \
      --out "$out/$day-train_step_after16-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 4
    ;;
  fitpath)
    steps="--trainer.accumulate_grad_batches 8 --trainer.max_steps 6 --trainer.log_every_n_steps 1"
    # shellcheck disable=SC2086
    smoke mgm2b_lora_zero2_acc8_fastpath_off 150 fit --config configs/mgm2b_lora.yaml $z2 $mgm $steps
    # shellcheck disable=SC2086
    smoke mgm2b_lora_zero2_acc8_fastpath_on 200 fit --config configs/mgm2b_lora.yaml $z2 $mgm $steps \
      --model.speed.compile true --model.optim.fused true
    # shellcheck disable=SC2086
    smoke mgm2b_lora_zero2_1gpu 200 fit --config configs/mgm2b_lora.yaml $z2 $mgm --trainer.devices 1 \
      --trainer.accumulate_grad_batches 64 --trainer.max_steps 2
    ;;
  fill)
    python3 bench/make_chameleons.py /tmp/chameleons_synth.json --users 64 --items 12
    # shellcheck disable=SC2086
    smoke qwen3-8b_lora_chameleons_1gpu 170 fit --config configs/qwen3-8b_lora_chameleons.yaml \
      --model.model.model_path null --model.model.tokenizer_path tests/assets/tokenizer \
      --data.init_args.train_path /tmp/chameleons_synth.json --trainer.max_steps 6 --trainer.log_every_n_steps 1 \
      --trainer.num_sanity_val_steps 0 $common
    # shellcheck disable=SC2086
    smoke mgm2b_stage1_zero2 200 fit --config configs/mgm2b_stage1.yaml $mgm --trainer.accumulate_grad_batches 16 \
      --trainer.max_steps 3
    ;;
  multi)
    python3 bench/make_chameleons.py /tmp/chameleons_synth.json --users 64 --items 12
    qwen="--model.model.model_path null --model.model.tokenizer_path tests/assets/tokenizer
          --data.init_args.train_path /tmp/chameleons_synth.json --trainer.max_steps 6
          --trainer.log_every_n_steps 1 --trainer.num_sanity_val_steps 0 $common
          --trainer.callbacks+=ModelCheckpoint --trainer.callbacks.every_n_train_steps=6"
    for run in "2 1" "2 2" "3 2"; do
      set -- $run
      # shellcheck disable=SC2086
      smoke qwen3-30b-a3b_lora_chameleons_zero${1}_${2}gpu 200 fit --config configs/qwen3-30b-a3b_lora_chameleons.yaml \
        --config configs/strategy/zero${1}.yaml $qwen --trainer.devices $2
    done
    # shellcheck disable=SC2086
    smoke mgm2b_lora_zero2_2gpu 200 fit --config configs/mgm2b_lora.yaml $z2 $mgm --trainer.devices 2 \
      --trainer.accumulate_grad_batches 64 --trainer.max_steps 2 --trainer.callbacks+=ModelCheckpoint \
      --trainer.callbacks.every_n_train_steps=2
    ;;
  budget_qwen)
    # each path's best within 80 GiB (Qwen3-30B-A3B attention LoRA r64, Chameleons-like lengths), packed
    # rows through mgmlora's packed attention (varlen kernel) vs FlexAttention; then r8 attention vs expert LoRA at the
    # best pack with a profile of each
    q="liger+packing+nocast+fused"
    timeout 330 python3 bench/train_step.py --model qwen3-30b-a3b --budget_gib 80 --variants \
      plain,plainx8,plainx16,${q}x8,${q}x16,${q}x32,${q}x48,${q}+flexx32,${q}+densex16 \
      --out "$out/$day-train_step_budget-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 13
    for experts in "" "--target_experts"; do
      name=attention; [ -n "$experts" ] && name=experts
      timeout 100 python3 bench/train_step.py --model qwen3-30b-a3b --r 8 $experts --variants ${q}x32 --profile \
        --warmup 1 --steps 4 --out "$out/$day-train_step_r8_${name}_x32-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 3
    done
    ;;
  fences)
    # the commands of 2026-11-30-train_step_budget-mgm2b-h200.json (two of its variants) and
    # 2026-11-30-train_step_budget_fastexperts-qwen3-30b-a3b-h200.json (all of it: tokens/s and the 30-step losses)
    cp="chunked+packing+nocast+fused+compile"; q="liger+packing+nocast+fused+fastexperts"
    timeout 280 python3 bench/train_step.py --model mgm-2b --budget_gib 24 --steps 5 --variants ${cp}x8,plain \
      --out "$out/$day-train_step_fences-mgm2b-$gpu.json" 2>&1 | tail -n 6
    timeout 280 python3 bench/train_step.py --model qwen3-30b-a3b --budget_gib 80 --warmup 0 --steps 30 --lr 1e-4 \
      --variants plainx8,${q}x8,${q}x48 --out "$out/$day-train_step_fences-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 6
    ;;
  budget_mgm)
    # each path's best within 24 GiB (MGM-2B, 2048-position rows): micro-batch, packing (mgmlora's packed
    # attention vs FlexAttention), checkpointing on/off
    c="chunked+nocast+fused+compile"; cp="chunked+packing+nocast+fused+compile"; lp="liger+packing+nocast+fused+compile"
    timeout 500 python3 bench/train_step.py --model mgm-2b --budget_gib 24 --steps 5 --variants \
      plain,plainx2,plain+nockpt,$c,$c+nockpt,${cp}x8,${cp}+nockptx2,${lp}+nockptx2,${lp}+nockptx3,${lp}x8 \
      --out "$out/$day-train_step_budget-mgm2b-$gpu.json" 2>&1 | tail -n 18
    ;;
  fitloop)
    # the recipes as now written in the real fit loop, 4 optimizer steps each (medians over steps 3-4, so
    # compilation is excluded), with the GPU-marked tests beside them (tiny models) to save a machine start
    python3 -m pytest -m gpu -q -s tests > "$out/gpu_tests.log" 2>&1 &
    python3 bench/make_long_llava.py /tmp/mgm_long4.json --text_tokens 100 1500 --copies 22
    long="--data.init_args.train_path /tmp/mgm_long4.json --trainer.max_steps 4"
    # shellcheck disable=SC2086
    smoke mgm2b_lora_24gib 240 --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml $mgm $long
    # shellcheck disable=SC2086
    smoke mgm2b_lora_packed_24gib 200 --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml --config configs/mgm2b_lora_packed.yaml $mgm $long
    python3 bench/make_chameleons.py /tmp/chameleons_big.json --users 256 --items 12
    # shellcheck disable=SC2086
    smoke qwen3-30b-a3b_lora_chameleons_1gpu_x32 150 fit --config configs/qwen3-30b-a3b_lora_chameleons.yaml \
      --model.model.model_path null --model.model.tokenizer_path tests/assets/tokenizer \
      --data.init_args.train_path /tmp/chameleons_big.json --trainer.devices 1 --trainer.max_steps 5 \
      --data.init_args.batch_size 32 --trainer.accumulate_grad_batches 2 --trainer.log_every_n_steps 1 \
      --trainer.num_sanity_val_steps 0 $common
    wait
    tail -n 3 "$out/gpu_tests.log"
    ;;
  moe_loop)
    # on a 2-GPU machine, two jobs side by side (one per GPU; they share the host's CPUs): GPU 0 Qwen3-30B-A3B
    # within 80 GiB with transformers' experts vs mgmlora's (model.experts_implementation), then r8 attention vs
    # expert LoRA with mgmlora's experts; GPU 1 the MGM-2B recipes in the fit loop as written (4 optimizer steps each,
    # medians over steps 3-4) with the loop-overhead figure
    q="liger+packing+nocast+fused"
    (
      export CUDA_VISIBLE_DEVICES=0
      timeout 300 python3 bench/train_step.py --model qwen3-30b-a3b --budget_gib 80 --variants \
        plainx8,${q}x32,${q}+fastexpertsx32,${q}x48,${q}+fastexpertsx48 \
        --out "$out/$day-train_step_experts-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 9
      for experts in "" "--target_experts"; do
        name=attention; [ -n "$experts" ] && name=experts
        timeout 110 python3 bench/train_step.py --model qwen3-30b-a3b --r 8 $experts --variants ${q}+fastexpertsx32 \
          --profile --warmup 1 --steps 4 \
          --out "$out/$day-train_step_r8_${name}_fastexperts_x32-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 3
      done
    ) > "$out/moe.log" 2>&1 &
    python3 bench/make_long_llava.py /tmp/mgm_long4.json --text_tokens 100 1500 --copies 22
    long="--data.init_args.train_path /tmp/mgm_long4.json --trainer.max_steps 4"
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=1 smoke mgm2b_lora_24gib_loop 330 --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml \
      $mgm $long
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=1 smoke mgm2b_lora_packed_24gib_loop 200 --memory_cap_gib 24 fit \
      --config configs/mgm2b_lora.yaml --config configs/mgm2b_lora_packed.yaml $mgm $long
    wait
    cat "$out/moe.log"
    ;;
  experts14)
    # one GPU: Qwen3-30B-A3B with mgmlora's experts against the plain path within 80 GiB in one run, which
    # doubles as the learning-parity check (30 steps from identical LoRA weights, no warm-up; parity at the same
    # micro-batch: x8); r8 attention vs expert LoRA with mgmlora's experts; the Chameleons recipe as now written
    # (mgmlora's experts) on one GPU at its global batch 64 (8 packed x accumulate 8), 6 steps
    q="liger+packing+nocast+fused+fastexperts"
    timeout 200 python3 bench/train_step.py --model qwen3-30b-a3b --budget_gib 80 --warmup 0 --steps 30 --lr 1e-4 \
      --variants plainx8,${q}x8,${q}x48 --out "$out/$day-train_step_budget_fastexperts-qwen3-30b-a3b-$gpu.json" \
      2>&1 | tail -n 6
    for experts in "" "--target_experts"; do
      name=attention; [ -n "$experts" ] && name=experts
      timeout 100 python3 bench/train_step.py --model qwen3-30b-a3b --r 8 $experts --variants ${q}x32 \
        --warmup 1 --steps 4 --out "$out/$day-train_step_r8_${name}_fastexperts_x32-qwen3-30b-a3b-$gpu.json" 2>&1 \
        | tail -n 2
    done
    python3 bench/make_chameleons.py /tmp/chameleons_big.json --users 256 --items 12
    # shellcheck disable=SC2086
    smoke qwen3-30b-a3b_lora_chameleons_1gpu_global64_fastexperts 150 fit \
      --config configs/qwen3-30b-a3b_lora_chameleons.yaml --model.model.model_path null \
      --model.model.tokenizer_path tests/assets/tokenizer --data.init_args.train_path /tmp/chameleons_big.json \
      --trainer.devices 1 --trainer.max_steps 6 --trainer.accumulate_grad_batches 8 --trainer.log_every_n_steps 1 \
      --trainer.num_sanity_val_steps 0 $common
    ;;
  combo14)
    # in one 2-GPU call: side by side, GPU 0 Qwen3-30B-A3B with transformers' vs mgmlora's experts within
    # 80 GiB and r8 expert LoRA with mgmlora's experts, GPU 1 configs/mgm2b_lora.yaml without DeepSpeed (plain
    # Lightning strategy, 4 steps of accumulate 128: is ZeRO-2's per-micro-batch work the loop's overhead?); then the
    # chameleons_1v2 part
    q="liger+packing+nocast+fused"
    (
      export CUDA_VISIBLE_DEVICES=0
      timeout 200 python3 bench/train_step.py --model qwen3-30b-a3b --budget_gib 80 --steps 4 --variants \
        ${q}x32,${q}+fastexpertsx32,${q}x48,${q}+fastexpertsx48 \
        --out "$out/$day-train_step_experts-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 8
    ) > "$out/moe.log" 2>&1 &
    python3 bench/make_long_llava.py /tmp/mgm_long4.json --text_tokens 100 1500 --copies 22
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=1 smoke mgm2b_lora_24gib_loop_nodeepspeed 220 --memory_cap_gib 24 fit \
      --config configs/mgm2b_lora.yaml $mgm --data.init_args.train_path /tmp/mgm_long4.json --trainer.max_steps 4 \
      --trainer.strategy auto
    wait
    cat "$out/moe.log"
    ;;&
  combo14|chameleons_1v2)
    # on a 2-GPU machine: the Chameleons recipe's optimizer step (global batch 64 = 8 packed samples per
    # micro-batch x accumulation x GPUs) on 1 GPU (accumulate 8) and 2 GPUs (accumulate 4), ZeRO-2 as written,
    # synthetic Chameleons-length data, 6 steps each (medians over steps 3-6)
    python3 bench/make_chameleons.py /tmp/chameleons_big.json --users 256 --items 12
    for n in 1 2; do
      # shellcheck disable=SC2086
      smoke qwen3-30b-a3b_lora_chameleons_${n}gpu_global64 170 fit --config configs/qwen3-30b-a3b_lora_chameleons.yaml \
        --model.model.model_path null --model.model.tokenizer_path tests/assets/tokenizer \
        --data.init_args.train_path /tmp/chameleons_big.json --trainer.devices $n --trainer.max_steps 6 \
        --trainer.accumulate_grad_batches $((8 / n)) --trainer.log_every_n_steps 1 --trainer.num_sanity_val_steps 0 \
        $common ${EXPERTS:+--model.model.experts_implementation $EXPERTS}
    done
    ;;
  parity14)
    # learning parity of the new packed settings at real shapes (same micro-batch, identical LoRA weights,
    # no warm-up), then where MGM-2B's loop loses time against its step: the recipe (accumulate 16 here, 6 steps) on
    # 2048-position rows (the step's shapes), and on realistic rows without compile / with expandable segments
    timeout 150 python3 bench/train_step.py --model mgm-2b --variants \
      plainx2,chunked+packing+nocast+fused+nockptx2,chunked+packing+nocast+fused+compile+nockptx2 --warmup 0 \
      --steps 30 --lr 1e-4 --out "$out/$day-train_step_parity_packed-mgm2b-$gpu.json" 2>&1 | tail -n 5
    timeout 130 python3 bench/train_step.py --model qwen3-30b-a3b --variants plainx8,liger+packing+nocast+fusedx8 \
      --warmup 0 --steps 30 --lr 1e-4 --out "$out/$day-train_step_parity_packed-qwen3-30b-a3b-$gpu.json" 2>&1 \
      | tail -n 4
    python3 bench/make_long_llava.py /tmp/mgm_2048.json --copies 6
    diag="--trainer.accumulate_grad_batches 16 --trainer.max_steps 6"
    # shellcheck disable=SC2086
    smoke mgm2b_lora_24gib_rows2048_acc16 80 --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml $mgm $diag \
      --data.init_args.train_path /tmp/mgm_2048.json
    # shellcheck disable=SC2086
    smoke mgm2b_lora_24gib_acc16 80 --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml $mgm $diag
    # shellcheck disable=SC2086
    smoke mgm2b_lora_24gib_acc16_nocompile 70 --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml $mgm $diag \
      --model.speed.compile false
    ;;
  loopdiag)
    # MGM-2B's loop on realistic rows (acc 16, 6 steps) with the allocator's expandable segments, and without
    # the 24 GiB cap: is the loop's loss on varying row lengths the capped caching allocator's churn?
    diag="--trainer.accumulate_grad_batches 16 --trainer.max_steps 6"
    # shellcheck disable=SC2086
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True smoke mgm2b_lora_24gib_acc16_expandable 80 --memory_cap_gib 24 \
      fit --config configs/mgm2b_lora.yaml $mgm $diag
    # shellcheck disable=SC2086
    smoke mgm2b_lora_nocap_acc16 80 fit --config configs/mgm2b_lora.yaml $mgm $diag
    ;;
  loopshapes)
    # the same loop on rows of about 1,576 positions (576 image + ~1,000 text: a handful of distinct
    # lengths): per-micro-batch cost vs realistic rows (about 200 distinct lengths) and vs 2048-position rows
    python3 bench/make_long_llava.py /tmp/mgm_1000.json --text_tokens 1000 1000 --copies 6
    # shellcheck disable=SC2086
    smoke mgm2b_lora_24gib_acc16_text1000 80 --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml $mgm \
      --trainer.accumulate_grad_batches 16 --trainer.max_steps 6 --data.init_args.train_path /tmp/mgm_1000.json
    ;;
  loopbucket)
    # realistic rows at micro-batch 1, each row packed and padded to a multiple of 128 positions
    # (speed.pad_to_multiple): a dozen distinct shapes instead of hundreds
    # shellcheck disable=SC2086
    smoke mgm2b_lora_24gib_acc16_bucket128 90 --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml $mgm \
      --trainer.accumulate_grad_batches 16 --trainer.max_steps 6 --model.speed.packing true \
      --model.speed.pad_to_multiple 128
    ;;
  gen_cost|gen_cost_mgm|gen_cost_qwen)
    if [[ $part != gen_cost_qwen ]]; then
      python3 bench/make_long_llava.py /tmp/mgm_val64.json --text_tokens 100 1500 --copies 3 --seed 1  # 72 records
      # shellcheck disable=SC2086
      smoke mgm2b_lora_gen_cost_24gib 250 --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml $mgm \
        --data.init_args.val_path /tmp/mgm_val64.json --trainer.max_steps 2 --trainer.val_check_interval 128 \
        --trainer.limit_val_batches 8 --trainer.num_sanity_val_steps 0 --trainer.log_every_n_steps 1
    fi
    if [[ $part != gen_cost_mgm ]]; then
      # 256 users x 12 items: enough micro-batches per epoch (64) for a validation every 24 (3 optimizer steps)
      python3 bench/make_chameleons.py /tmp/chameleons_synth256.json --users 256 --items 12
      # shellcheck disable=SC2086
      smoke qwen3-30b-a3b_lora_chameleons_gen_cost_1gpu 330 fit --config configs/qwen3-30b-a3b_lora_chameleons.yaml \
        --model.model.model_path null --model.model.tokenizer_path tests/assets/tokenizer \
        --data.init_args.train_path /tmp/chameleons_synth256.json \
        --trainer.accumulate_grad_batches 8 --trainer.devices 1 --trainer.max_steps 6 --trainer.val_check_interval 24 \
        --trainer.log_every_n_steps 1 --trainer.num_sanity_val_steps 0 $common --trainer.limit_val_batches 4
    fi
    for f in "$out"/*gen_cost*.json; do
      python3 -c "import json,sys; print(sys.argv[1], json.dumps(json.load(open(sys.argv[1])).get('generation')))" "$f"
    done
    ;;
  qlora_qwen|qlora_qwen_experts)
    # QLoRA (4-bit NF4 base, experts included) in the real fit loop under a 24 GiB allocator cap, one GPU, synthetic
    # Chameleons-length data, random init at real shapes (each layer initialised on the GPU and quantised before the
    # next, mgmlora.models.layerwise). qlora_qwen: configs/qwen3-30b-a3b_qlora_chameleons.yaml as written (attention r64,
    # 8 packed samples per micro-batch), accumulate 2 for 4 steps; qlora_qwen_experts: the same with expert LoRA r8
    python3 bench/make_chameleons.py /tmp/chameleons_synth.json --users 64 --items 12
    qwen="--model.model.model_path null --model.model.tokenizer_path tests/assets/tokenizer
          --data.init_args.train_path /tmp/chameleons_synth.json --trainer.max_steps 4
          --trainer.accumulate_grad_batches 2 --trainer.log_every_n_steps 1 --trainer.num_sanity_val_steps 0 $common"
    name=qwen3-30b-a3b_qlora_chameleons_24gib; extra=""
    if [[ $part == qlora_qwen_experts ]]; then
      name=qwen3-30b-a3b_qlora_experts_r8_24gib
      extra="--model.lora.r 8 --model.lora.lora_alpha 16 --model.lora.lora_dropout 0.0 --model.lora.target_experts true"
    fi
    # shellcheck disable=SC2086
    smoke $name 570 --memory_cap_gib 24 fit --config configs/qwen3-30b-a3b_qlora_chameleons.yaml $qwen $extra
    ;;
  qlora_mgm)
    # configs/mgm2b_qlora.yaml as written (Gemma decoder 4-bit, checkpointing, Liger loss) under an 8 GiB cap,
    # realistic rows (576 image + 100-1500 text tokens), 2 optimizer steps of 16 micro-batches
    # shellcheck disable=SC2086
    smoke mgm2b_qlora_8gib 330 --memory_cap_gib 8 fit --config configs/mgm2b_qlora.yaml $mgm \
      --trainer.max_steps 3 --trainer.accumulate_grad_batches 16
    ;;
  qlora_parity)
    # 4-bit vs bf16 base from identical weights: 50 steps each, per-step loss gap and tokens/s at the same micro-batch
    # (8 packed Chameleons-length samples, Liger loss, fused AdamW), all 48 layers (the bf16 twin takes 57 GiB)
    timeout 570 python3 bench/qlora_parity.py --model qwen3-30b-a3b --steps 50 --batch_size 8 \
      --variant liger+packing+fused --out "$out/$day-qlora_parity-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 4
    ;;
  fp8)
    # the FP8 base (model.model.quantization.quant_type: fp8, experts dequantized) against its bf16 twin from identical
    # weights, compiled step, 16 of Qwen3-30B-A3B's 48 layers at 32 packed Chameleons-length samples: per-step loss
    # gap over 30 steps (lr 1e-4) and a first look at tokens/s; then MGM-2B's step with the FP8 Gemma decoder (its
    # build quantises on the GPU after a whole-model CPU build: about 2 minutes) within 24 GiB. The
    # interleaved ratios against the peers: OURS_ARGS="--quant fp8" TAG=fp8 with peer_qwen / peer_mgm
    q="liger+packing+nocast+fused+fastexperts+compile"
    timeout 330 python3 bench/qlora_parity.py --model qwen3-30b-a3b --quant_type fp8 --layers 16 --steps 30 --warmup 3 \
      --batch_size 32 --lr 1e-4 --variant $q --out "$out/$day-fp8_parity-qwen3-30b-a3b-16layers-$gpu.json" 2>&1 | tail -n 3
    timeout 330 python3 bench/train_step.py --model mgm-2b --quant fp8 --chunk 1024 --warmup 3 --steps 5 \
      --variants chunked+packing+nocast+fused+compile+nockptx2,chunked+packing+nocast+fused+compile+nockptx3 \
      --out "$out/$day-train_step_fp8-mgm2b-$gpu.json" 2>&1 | tail -n 4
    ;;
  fp8_nockpt)
    # Qwen3-30B-A3B attention LoRA r64 on the FP8 base without gradient checkpointing (frozen FP8 experts then keep
    # only their codes for the backward, quantization.set_expert_backward: every layer's activations, no weights): the
    # micro-batches that may fit 80 GiB, against the checkpointed x80 on the same base, one process; then pick
    # OURS_SWEEP for OURS_ARGS="--quant fp8" TAG=fp8 bash bench/gpu_suite.sh peer_qwen
    q="liger+packing+nocast+fused+fastexperts+compile"
    timeout 570 python3 bench/train_step.py --model qwen3-30b-a3b --quant fp8 --warmup 3 --steps 5 \
      --variants ${NOCKPT_SWEEP:-${q}+nockptx16,${q}+nockptx24,${q}+nockptx32,${q}x80} \
      --out "$out/$day-train_step_fp8_nockpt-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 6
    ;;
  keep_experts)
    # Qwen3-30B-A3B attention LoRA r64, compiled: the checkpointed step keeping the frozen expert GEMMs' outputs
    # (model.speed.keep_expert_outputs: +keepgateup / +keepexperts, mgmlora.models.recompute) against whole-layer
    # recompute, one process. QUANT=fp8 runs it on the FP8 base (its own default sweep: more room for kept outputs,
    # and no checkpointing at all at x16, fp8_nockpt's smallest, for the same process's comparison)
    q="liger+packing+nocast+fused+fastexperts+compile"
    if [[ ${QUANT:-} == fp8 ]]; then
      sweep=${KEEP_SWEEP:-${q}x80,${q}+keepgateupx48,${q}+keepexpertsx24,${q}+nockptx16}
    else
      sweep=${KEEP_SWEEP:-${q}x64,${q}+keepgateupx16,${q}+keepgateupx24,${q}+keepgateupx32}
    fi
    timeout 570 python3 bench/train_step.py --model qwen3-30b-a3b ${QUANT:+--quant $QUANT} --warmup 3 --steps 5 \
      --variants "$sweep" --out "$out/$day-train_step_keep_experts${QUANT:+_$QUANT}-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 6
    ;;
  peer_qwen|peer_qwen_experts)
    # ours against TRL's SFTTrainer tuned for speed (bench/peers/trl_sft.py), interleaved rounds in this one session
    # (bench/peers/rounds.py): Qwen3-30B-A3B within 80 GiB, Chameleons lengths; round 1 sweeps each side's settings,
    # later rounds rerun each side's best. peer_qwen: attention LoRA r64 (the recipe's); peer_qwen_experts: r8 on
    # attention and every expert (lora.target_experts), both sides on the same targets
    targets=attention; lora=""; ours_sweep=${OURS_SWEEP:-liger+packing+nocast+fused+fastexperts+compilex80,liger+packing+nocast+fused+fastexperts+compilex96}
    peer_sweep=${PEER_SWEEP:-80,96}  # the 2026-12-04 run swept 64,80 on both sides (80 won both; 96 untried)
    if [[ $part == peer_qwen_experts ]]; then
      targets=experts; lora="--r 8 --target_experts"
      # PEFT's expert path (speed.expert_lora: peft) and the split (the default since session 29), both compiled, at
      # TRL's best pack
      ours_sweep=${OURS_SWEEP:-liger+packing+nocast+fused+fastexperts+compilex48,liger+packing+nocast+fused+fastexperts+splitexperts+compilex48}
      peer_sweep=${PEER_SWEEP:-32,48}
    fi
    timeout ${LIMIT:-580} python3 bench/peers/rounds.py --model qwen3-30b-a3b --budget_gib 80 --targets $targets \
      --peer trl --rounds ${ROUNDS:-3} --timeout ${RUN_LIMIT:-240} \
      --ours "bench/train_step.py --model qwen3-30b-a3b $lora ${OURS_ARGS:-} --warmup 3 --steps 5 --variants {sweep}" \
      --ours_sweep "$ours_sweep" \
      --peer_cmd "bench/peers/trl_sft.py --model qwen3-30b-a3b $lora --warmup 3 --steps 5 --batch_sizes {sweep}" \
      --peer_sweep "$peer_sweep" --out "$out/$day-peer_trl-qwen3-30b-a3b-$targets${TAG:+-$TAG}-$gpu.json" 2>&1 | tail -n 8
    ;;
  peer_mgm)
    # ours against the plain transformers + PEFT path (TRL has no MGM model class), MGM-2B within 24 GiB, 2048-position
    # rows, interleaved rounds; round 1 sweeps each side's settings (plain pushed until it leaves the budget). Ours
    # runs the chunked loss in 1,024-position chunks (OURS_ARGS adds to or overrides it), which leaves room for 3 rows within 24 GiB; the
    # 2026-12-04 rounds swept chunks of 2,048 at x2 and Liger at x8
    timeout ${LIMIT:-580} python3 bench/peers/rounds.py --model mgm-2b --budget_gib 24 --targets attention \
      --peer plain --rounds ${ROUNDS:-3} --timeout ${RUN_LIMIT:-200} \
      --ours "bench/train_step.py --model mgm-2b --steps 5 --chunk 1024 ${OURS_ARGS:-} --variants {sweep}" \
      --ours_sweep "${OURS_SWEEP:-chunked+packing+nocast+fused+compile+nockptx2,chunked+packing+nocast+fused+compile+nockptx3}" \
      --peer_cmd "bench/train_step.py --model mgm-2b --steps 5 --variants {sweep}" \
      --peer_sweep "${PEER_SWEEP:-plainx2,plainx3,plain+nockpt}" \
      --out "$out/$day-peer_plain-mgm-2b-attention${TAG:+-$TAG}-$gpu.json" \
      2>&1 | tail -n 8
    ;;
  recipe_qwen)
    # configs/qwen3-30b-a3b_lora_chameleons.yaml on one GPU with speed.compile on, in the real fit loop (global batch
    # 64 as 64 packed samples x accumulate 1; DeepSpeed ZeRO-2 as written), then the compiled step under torch.profiler
    # (bench/train_step.py --profile: top device operators of a step after the compiled warm-up). RECIPE_ARGS adds
    # to the fit's arguments and STEP_ARGS to the step's, STEP_VARIANT replaces the step's variant (the default is the
    # base recipe's settings, without kept outputs), TAG names both. The FP8 overlay, whose step keeps the attention
    # outputs: RECIPE_ARGS="--config configs/qwen3-30b-a3b_lora_chameleons_fp8.yaml" STEP_ARGS="--quant fp8"
    # STEP_VARIANT=liger+packing+nocast+fused+fastexperts+compile+keepattnx64
    python3 bench/make_chameleons.py /tmp/chameleons_big.json --users 256 --items 12
    # shellcheck disable=SC2086
    smoke qwen3-30b-a3b_lora_chameleons_1gpu_x64_compile${TAG:+_$TAG} 300 fit \
      --config configs/qwen3-30b-a3b_lora_chameleons.yaml \
      --model.model.model_path null --model.model.tokenizer_path tests/assets/tokenizer \
      --data.init_args.train_path /tmp/chameleons_big.json --trainer.devices 1 --trainer.max_steps 6 \
      --data.init_args.batch_size 64 --trainer.accumulate_grad_batches 1 --model.speed.compile true \
      --trainer.log_every_n_steps 1 --trainer.num_sanity_val_steps 0 $common ${RECIPE_ARGS:-}
    # shellcheck disable=SC2086
    timeout 240 python3 bench/train_step.py --model qwen3-30b-a3b --warmup 3 --steps 3 --profile ${STEP_ARGS:-} \
      --variants ${STEP_VARIANT:-liger+packing+nocast+fused+fastexperts+compilex64} \
      --out "$out/$day-train_step_profile_compiled${TAG:+_$TAG}-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 3
    ;;
  experts_fp8_qwen)
    gg="$out/$day-grouped_gemm_fp8_vs_bf16-qwen3-30b-a3b-$gpu.json"
    timeout 110 python3 bench/grouped_gemm.py --out "$gg" 2>&1 | tail -n 12
    step="--model qwen3-30b-a3b --quant fp8 --warmup 3 --steps 4
          --variants liger+packing+nocast+fused+fastexperts+compile+keepattnx64"
    # shellcheck disable=SC2086
    timeout 140 python3 bench/train_step.py $step --expert_products dequantized \
      --out "$out/$day-train_step_fp8_keepattn_x64_experts_dequantized-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 2
    timeout 30 python3 bench/make_chameleons.py /tmp/chameleons_big.json --users 256 --items 12
    # shellcheck disable=SC2086
    smoke qwen3-30b-a3b_lora_chameleons_fp8_loop_dropout0_b 130 $qwen_fp8_fit --trainer.max_steps 6 \
      --model.lora.lora_dropout 0.0
    # the whole step with FP8 expert products only where the products alone ran faster per checkpointed step
    # (compiled: forward twice, input gradient once, both weights), and only in the time left of a 560 s call
    left=$((540 - SECONDS))
    if [ "$left" -gt 90 ] && python3 -c "import json, sys
sys.exit(0 if json.load(open(sys.argv[1]))['results']['fp8_speedup/compiled/checkpointed_step'] > 1 else 1)" "$gg"
    then
      # shellcheck disable=SC2086
      timeout "$left" python3 bench/train_step.py $step --expert_products fp8 \
        --out "$out/$day-train_step_fp8_keepattn_x64_experts_fp8-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 2
    else
      echo "FP8-experts step not run: $left s left, or the products alone were not faster"
    fi
    ;;
  loopgap_qwen)
    python3 bench/make_chameleons.py /tmp/chameleons_big.json --users 256 --items 12
    # shellcheck disable=SC2086
    smoke qwen3-30b-a3b_lora_chameleons_fp8_loop 150 $qwen_fp8_fit --trainer.max_steps 6
    # shellcheck disable=SC2086
    smoke qwen3-30b-a3b_lora_chameleons_fp8_loop_dropout0 150 $qwen_fp8_fit --trainer.max_steps 6 --model.lora.lora_dropout 0.0
    export LOOP_PROFILE=1
    # shellcheck disable=SC2086
    smoke qwen3-30b-a3b_lora_chameleons_fp8_loop_profile 150 $qwen_fp8_fit --trainer.max_steps 3
    unset LOOP_PROFILE
    timeout 120 python3 bench/train_step.py --model qwen3-30b-a3b --quant fp8 --lengths fixed --seq 1024 --warmup 2 \
      --steps 2 --variants liger+packing+nocast+fused+fastexperts+compile+keepattnx64 \
      --out "$out/$day-train_step_fp8_keepattn_worstcase_x64-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 3
    ;;
  dropout_rng)
    # LoRA dropout's random masks in a compiled layer's input side at the FP8 overlay's pack (bench/dropout_rng.py)
    timeout ${LIMIT:-300} python3 bench/dropout_rng.py --out "$out/$day-dropout_rng-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 6
    ;;
  profile_mgm_fp8)
    # the best isolated MGM-2B step within 24 GiB (FP8 base, 3 packed rows, the 2.09x rounds' setting) with one step
    # profiled after compilation, the steady state (the committed x2 profile of 2026-12-05 is not: its profiled
    # stretch is mostly device idle): where its time goes against the 45% MFU target
    timeout ${LIMIT:-200} python3 bench/train_step.py --model mgm-2b --steps 5 --chunk 1024 --quant fp8 \
      --variants chunked+packing+nocast+fused+compile+nockptx3 --profile \
      --out "$out/$day-train_step_profile_fp8_x3-mgm2b-$gpu.json" 2>&1 | tail -n 4
    ;;
  peer_loop_qwen)
    # the shipped recipe in the real fit loop against TRL at the same LoRA config, interleaved rounds in this session:
    # configs/qwen3-30b-a3b_lora_chameleons_fp8.yaml as shipped (LoRA dropout 0.05, 64 samples per step, 6 optimizer
    # steps, bench/peers/loop.py) against TRL's SFTTrainer tuned for speed at LoRA dropout 0.05 (the chameleons
    # preset's), at PEER_SWEEP (default x80, its best in the dropout-0 sweeps; a sweep of several sizes runs them in one
    # process, where a later size has run out of memory that fits alone). Two rounds fit one call: run the part in
    # two calls on one machine and join their complete rounds with bench/peers/merge_rounds.py
    python3 bench/make_chameleons.py /tmp/chameleons_big.json --users 256 --items 12
    timeout ${LIMIT:-560} python3 bench/peers/rounds.py --model qwen3-30b-a3b --budget_gib 80 --targets attention \
      --peer trl --rounds ${ROUNDS:-2} --timeout ${RUN_LIMIT:-200} \
      --ours "bench/peers/loop.py $qwen_fp8_fit --trainer.max_steps 6" --ours_sweep loop \
      --peer_cmd "bench/peers/trl_sft.py --model qwen3-30b-a3b --lora_dropout 0.05 --warmup 3 --steps 5 --batch_sizes {sweep}" \
      --peer_sweep "${PEER_SWEEP:-80}" --out "$out/$day-peer_trl_loop-qwen3-30b-a3b-attention-fp8${TAG:+_$TAG}-$gpu.json" 2>&1 | tail -n 8
    ;;
  experts_split)
    # expert LoRA split beside the frozen experts (model.speed.expert_lora: split, +splitexperts) against PEFT's path
    # (W + B A per expert on every call; under +compile its experts stay eager), and attention-only LoRA: Qwen3-30B-A3B
    # r8, 32 packed samples, one session. The committed ..._r8_{experts,attention}_split_x32 and
    # ..._r8_experts_split_compile_x32 files ran commit 1faae6c, an earlier split reverted after them (its compile
    # failed on the B factor's layout: mgmlora.models.experts.contiguous_factor)
    q="liger+packing+nocast+fused+fastexperts"
    timeout 340 python3 bench/train_step.py --model qwen3-30b-a3b --r 8 --target_experts --warmup 3 --steps 5 \
      --variants ${q}+splitexperts+compilex32,${q}+compilex32,${q}+splitexpertsx32 \
      --out "$out/$day-train_step_r8_experts_split_vs_peft_x32-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 4
    timeout 200 python3 bench/train_step.py --model qwen3-30b-a3b --r 8 --warmup 3 --steps 5 --variants ${q}+compilex32 \
      --out "$out/$day-train_step_r8_attention_compile_x32-qwen3-30b-a3b-$gpu.json" 2>&1 | tail -n 2
    ;;
  recipe_mgm)
    # configs/mgm2b_lora.yaml as written (micro-batch 1 x accumulate 128, compile, no checkpointing) in the real fit
    # loop under a 24 GiB cap on realistic rows (576 image + 100-1500 text positions), 4 optimizer steps (medians over
    # steps 3-4); recipe_loop_vs_best_step: its tokens/s over the best isolated step within 24 GiB (BEST_STEP_JSON: a
    # peer_mgm rounds file, or a bench/train_step.py file whose first variant is the best step)
    python3 bench/make_long_llava.py /tmp/mgm_long4.json --text_tokens 100 1500 --copies 22
    # shellcheck disable=SC2086
    smoke mgm2b_lora_recipe_loop_24gib 300 --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml $mgm \
      --data.init_args.train_path /tmp/mgm_long4.json --trainer.max_steps 4
    vs_best "$out/$day-mgm2b_lora_recipe_loop_24gib-$gpu.json" \
      "${BEST_STEP_JSON:-bench/results/2026-12-04-train_step_best_imagecompile-mgm2b-h200.json}"
    ;;
  recipe_mgm_fp8)
    # configs/mgm2b_lora_packed.yaml on the FP8 base (model.model.quantization.quant_type: fp8) in the real fit loop
    # under a 24 GiB cap, the same rows and 4 optimizer steps as recipe_mgm_window, at 56 micro-batches per 128
    # samples (the overlay's; ACCS="48" in a second call for fewer, fuller ones), then the best isolated FP8 step within
    # 24 GiB in the same call (x3, as in 2026-12-05's peer rounds): recipe_loop_vs_best_step in each loop's JSON. On a
    # cold machine the first optimizer step compiles for over 220 s (session 33; 111 s with inductor's cache warm,
    # bench/results/2026-12-05-mgm2b_lora_packed_fp8_first_step_recompiles-h100.json), hence 330 s per loop
    python3 bench/make_long_llava.py /tmp/mgm_long4.json --text_tokens 100 1500 --copies 22
    for acc in ${ACCS:-56}; do
      # the overlay's 4,608-position cap fits its 56 micro-batches of these rows; fewer, fuller ones need more
      cap=$(( acc < 56 ? 6144 : 4608 ))
      # shellcheck disable=SC2086
      smoke mgm2b_lora_packed_fp8_loop_24gib_acc$acc ${RUN_LIMIT:-330} --memory_cap_gib 24 fit \
        --config configs/mgm2b_lora.yaml --config configs/mgm2b_lora_packed.yaml $mgm \
        --data.init_args.train_path /tmp/mgm_long4.json --trainer.max_steps 4 \
        --model.model.quantization.quant_type fp8 --trainer.accumulate_grad_batches "$acc" \
        --data.init_args.max_tokens "$cap"
    done
    best="$out/$day-train_step_fp8_best_x3-mgm2b-$gpu.json"
    timeout -k 10 170 python3 bench/train_step.py --model mgm-2b --quant fp8 --chunk 1024 --warmup 3 --steps 5 \
      --variants chunked+packing+nocast+fused+compile+nockptx3 --out "$best" 2>&1 | tail -n 2
    for acc in ${ACCS:-56}; do
      vs_best "$out/$day-mgm2b_lora_packed_fp8_loop_24gib_acc$acc-$gpu.json" "$best"
    done
    ;;
  ab)
    # the A/B of one change to the Qwen3-30B-A3B step against the tree in .ab_old, both sides the FP8 x80 compiled
    # step that 2026-12-05's profile2 ran
    [ -f .ab_old/bench/train_step.py ] || { echo "ab: no .ab_old; first: git archive <rev> src bench | (mkdir -p .ab_old && tar -x -C .ab_old)"; exit 2; }
    v=${VARIANT:-liger+packing+nocast+fused+fastexperts+compilex80}
    timeout ${LIMIT:-580} python3 bench/peers/rounds.py --model qwen3-30b-a3b --budget_gib 80 --targets attention \
      --peer old --peer_pythonpath "${PYTHONPATH/$PWD\/src/$PWD/.ab_old/src}" --rounds ${ROUNDS:-2} \
      --timeout ${RUN_LIMIT:-200} \
      --ours "bench/train_step.py --model qwen3-30b-a3b --quant fp8 --warmup 3 --steps 5 --variants {sweep}" \
      --ours_sweep "${OURS_VARIANT:-$v}" \
      --peer_cmd ".ab_old/bench/train_step.py --model qwen3-30b-a3b --quant fp8 --warmup 3 --steps 5 --variants {sweep}" \
      --peer_sweep "$v" --out "$out/$day-ab_${AB:-change}-qwen3-30b-a3b-fp8-$gpu.json" 2>&1 | tail -n 6
    ;;
  recipe_mgm_window)
    # the recipe's 128 samples per optimizer step grouped into fewer, balanced packed micro-batches
    # (data.window_samples 128, mgmlora.data.sampling.BalancedWindowBatchSampler) against the recipe as written
    # (one sample per micro-batch), in the fit loop under a 24 GiB cap on the same realistic rows, 4 optimizer steps
    python3 bench/make_long_llava.py /tmp/mgm_long4.json --text_tokens 100 1500 --copies 22
    long="--data.init_args.train_path /tmp/mgm_long4.json --trainer.max_steps 4"
    # shellcheck disable=SC2086
    smoke mgm2b_lora_recipe_loop_24gib_x1 220 --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml $mgm $long
    for run in ${WINDOW_RUNS:-56:chunked:1024 48:chunked:1024}; do  # accumulate_grad_batches:speed.loss[:chunk]
      IFS=: read -r acc loss chunk <<< "$run"
      # shellcheck disable=SC2086
      smoke mgm2b_lora_recipe_loop_24gib_window128_acc${acc}_$loss${chunk:-} 220 --memory_cap_gib 24 fit \
        --config configs/mgm2b_lora.yaml $mgm $long --data.init_args.window_samples 128 \
        --trainer.accumulate_grad_batches "$acc" --model.speed.loss "$loss" \
        --model.speed.loss_chunk_size "${chunk:-2048}"
    done
    ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac

# The MGM-2B recipe loop, one run after another on one machine, at an older commit and at HEAD (interleaved when RUNS
# repeats them): what a code change did to the fit loop, apart from the host's spread.
#
#   git archive <commit> src bench configs | (mkdir -p .ab_old && tar -x -C .ab_old)   # on the dev machine
#   RUNS="old:base new:base" bash bench/ab_mgm_loop.sh          # on the GPU, .ab_old and .whl carried
#
# Each RUNS entry is SIDE:SETTING[:LOSS[:CHUNK]]: SIDE old (.ab_old's code and configs) or new (this tree); SETTING
# base (configs/mgm2b_lora.yaml as written, one sample per micro-batch) or packed (plus configs/mgm2b_lora_packed.yaml);
# LOSS and CHUNK override speed.loss and speed.loss_chunk_size. Realistic rows (576 image + 100-1500 text positions),
# a 24 GiB cap, 4 optimizer steps; each run's JSON lands in $OUT/r as <index>_<entry>.json. Each run stops after LIMIT
# seconds (220), the first after LIMIT_FIRST (LIMIT + 120): on a fresh machine it compiles with a cold cache.
# LOOP_PROFILE=N (and LOOP_TRACE) in the environment add bench/loop_timing.py's LoopProfile to each run; a profiled
# run reports no tokens/s (the profiler runs inside the measured steps), so profile in a separate run.
set -u
mkdir -p "$OUT/r"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && touch /tmp/site/.installed
python3 bench/make_long_llava.py /tmp/mgm_long4.json --text_tokens 100 1500 --copies 22
A="--model.model.model_path null --model.model.tokenizer_path tests/assets/gemma_tokenizer
   --data.init_args.image_folder tests/assets/llava --data.init_args.num_workers 4 --trainer.limit_val_batches 0
   --trainer.enable_progress_bar false --data.init_args.train_path /tmp/mgm_long4.json --trainer.max_steps 4"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
i=0
for entry in ${RUNS:-old:base new:base}; do
  IFS=: read -r side setting loss chunk <<< "$entry"
  if [[ $side != old && $side != new ]] || [[ $setting != base && $setting != packed ]]; then
    echo "RUNS entry $entry: SIDE must be old or new and SETTING base or packed" >&2; exit 2
  fi
  root=. path=/tmp/site:$PWD/src
  if [ "$side" = old ]; then root=.ab_old path=/tmp/site; fi
  configs="--config $root/configs/mgm2b_lora.yaml"
  if [ "$setting" = packed ]; then configs="$configs --config $root/configs/mgm2b_lora_packed.yaml"; fi
  extra=""
  if [ -n "${loss:-}" ]; then extra="--model.speed.loss $loss"; fi
  if [ -n "${chunk:-}" ]; then extra="$extra --model.speed.loss_chunk_size $chunk"; fi
  name="${i}_${entry//:/_}"
  limit=${LIMIT:-220}
  if [ "$i" = 0 ]; then limit=${LIMIT_FIRST:-$((limit + 120))}; fi  # the first run also fills the compile cache
  # shellcheck disable=SC2086
  PYTHONPATH=$path timeout "$limit" python3 $root/bench/fit_smoke.py "$OUT/r/$name.json" --memory_cap_gib 24 \
    fit $configs $A $extra --trainer.logger.init_args.save_dir "/tmp/tb_$name" > "$OUT/r/$name.log" 2>&1
  echo "$name rc=$? $(python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(d.get('tokens_per_s_median'),
    d.get('step_time_s_median'), d.get('peak_mem_alloc_gib'), d.get('oom'), d.get('train_loss'))" "$OUT/r/$name.json" \
    2>/dev/null)"
  i=$((i + 1))
done
nproc; python3 -c "import torch,transformers,peft,lightning;print(torch.__version__,transformers.__version__,peft.__version__,lightning.__version__)"

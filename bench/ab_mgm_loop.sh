set -u
mkdir -p $OUT/r
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && touch /tmp/site/.installed
python3 bench/make_long_llava.py /tmp/mgm_long4.json --text_tokens 100 1500 --copies 22
A="--model.model.model_path null --model.model.tokenizer_path tests/assets/gemma_tokenizer --data.init_args.image_folder tests/assets/llava --data.init_args.num_workers 4 --trainer.limit_val_batches 0 --trainer.enable_progress_bar false --data.init_args.train_path /tmp/mgm_long4.json --trainer.max_steps 4"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PYTHONPATH=/tmp/site timeout 220 python3 .ab_old/bench/fit_smoke.py $OUT/r/old_c41ff26.json --memory_cap_gib 24 fit --config .ab_old/configs/mgm2b_lora.yaml $A --trainer.logger.init_args.save_dir /tmp/tb_old > $OUT/r/old.log 2>&1; echo old rc=$?
PYTHONPATH=/tmp/site:$PWD/src timeout 220 python3 bench/fit_smoke.py $OUT/r/new_head.json --memory_cap_gib 24 fit --config configs/mgm2b_lora.yaml $A --trainer.logger.init_args.save_dir /tmp/tb_new > $OUT/r/new.log 2>&1; echo new rc=$?
for f in $OUT/r/old_c41ff26.json $OUT/r/new_head.json; do python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[1], d.get('tokens_per_s_median'), d.get('step_time_s_median'), d.get('peak_mem_alloc_gib'))" $f; done
nproc; python3 -c "import torch,transformers,peft,lightning;print(torch.__version__,transformers.__version__,peft.__version__,lightning.__version__)"

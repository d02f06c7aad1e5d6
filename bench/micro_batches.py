"""The largest micro-batch a run's balanced windows form on its data, per accumulate_grad_batches (CPU, no model).

    python bench/micro_batches.py OUT.json --accumulate 56 48 40 --epochs 1 -- --config configs/mgm2b_lora.yaml \
        --config configs/mgm2b_lora_packed_fp8.yaml --data.init_args.train_path /tmp/mgm_long4.json ...

Builds the run's data exactly as `fit` does (the arguments after `--` are `fit`'s; the model's tokenizer and image
geometry only, no weights) and splits each window of `data.window_samples` samples over each `--accumulate` count
with the sampler `fit` uses (mgmlora.data.sampling.BalancedWindowBatchSampler). Why: a GPU run's peak memory follows
the positions of its largest micro-batch, not the `data.max_tokens` cap, which only checks them; this says which
positions a measured run actually reached, and so which cap its measurement supports.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

from mgmlora.cli import main as cli_main
from mgmlora.data.sampling import BalancedWindowBatchSampler


def main() -> None:
    """Writes OUT.json: per accumulate count, the largest micro-batch's positions in each of the first epochs."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--accumulate", type=int, nargs="+", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)  # the list, not its text: values may hold spaces
    args = parser.parse_args(argv[:split])
    fit_args = argv[split + 1 :] + ["--trainer.accelerator", "cpu", "--trainer.logger", "false",
                                    "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"]
    cli = cli_main(fit_args, run=False)
    data = cli.datamodule
    data.trainer = cli.trainer
    data.setup("fit")
    samples = data.splits["train"]
    costs = data.positions(samples)  # positions per sample, image expansion included, as the sampler is given them
    hp = data.hparams
    result = {"command": "python bench/micro_batches.py " + shlex.join(sys.argv[1:]),
              "samples": len(costs), "mean_positions": sum(costs) / len(costs), "longest_sample": max(costs),
              "window_samples": hp.window_samples, "max_tokens": hp.max_tokens, "largest_micro_batch": {}}
    for accumulate in args.accumulate:
        # as DataModule._train_sampler builds it: every rank's micro-batches (largest() covers them all), the
        # window of window_samples x world_size samples, and the last partial window dropped or wrapped like fit's
        sampler = BalancedWindowBatchSampler([s.num_supervised for s in samples], costs, hp.window_samples,
                                             accumulate=accumulate, shuffle=hp.shuffle, seed=hp.seed,
                                             world_size=cli.trainer.world_size, drop_last=hp.drop_last)
        result["largest_micro_batch"][str(accumulate)] = [sampler.largest([e], accumulate)[0]
                                                          for e in range(args.epochs)]
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["largest_micro_batch"]))


if __name__ == "__main__":
    main()

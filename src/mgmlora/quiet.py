"""Third-party notices that every run printed and that do not concern mgmlora's users, silenced one by one.

Each entry matches one notice by its text and origin, never a whole category or logger, so a new warning from the
same library still shows. `bin/*.py` and `bench/sweep.py` install them through `mgmlora.errors.run`; a test runs the
demo and checks that none of them is printed (which also fails if an upstream change makes a filter miss).

Gemma's `hidden_act="gelu"` notice is not filtered: it is not emitted any more (mgmlora.models.mgm builds the Gemma
config without the key that triggers it, then sets the exact GELU MGM-2B was trained with).
"""

from __future__ import annotations

import logging
import sys
import warnings

LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"

# (message regex, category, module regex) for warnings.filterwarnings, each with why it is noise for our users.
WARNINGS: list[tuple[str, type[Warning], str]] = [
    # PEFT's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5 deprecated; mgmlora
    # itself uses activation_checkpointing_enable. Nothing for the user to change.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
    # Lightning's combined loader builds torch's deprecated LeafSpec on every batch; a Lightning/torch matter.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    # mgmlora.cli.parse_config (mgmlora estimate, mgmlora show-samples) hands the tool's arguments to LightningCLI's
    # parser on purpose; LightningCLI warns whenever a process with arguments does that.
    (r"LightningCLI's args parameter is intended to run from within Python", UserWarning, ""),
    # PEFT warns on every export / generate / score that the adapter config's `base_model_name_or_path` differs from
    # the model it is loaded onto: mgmlora builds the base itself (from model_path or a preset) and records the run's
    # base in its own files; the user has nothing to change.
    (r"The PEFT config's `base_model_name_or_path` was renamed", UserWarning, r"peft\.mapping_func"),
]
# (logger, message prefix) of log records dropped, each with why.
RECORDS: list[tuple[str, str]] = [
    ("lightning.pytorch.utilities.rank_zero", LITLOGGER_TIP),
    ("lightning.fabric.utilities.rank_zero", LITLOGGER_TIP),  # Lightning advertises its hosted logger at every fit
    # mgmlora's own RunSummary replaces Lightning's ModelSummary on purpose; Lightning says so at every fit
    *((name, "Trainer already configured with model summary callbacks")
      for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")),
    # DeepSpeed, imported for its strategy, tells a CPU-only machine that it found no GPU: what the user knows
    ("DeepSpeed", "Setting accelerator to CPU."),
]


class _DropRecord(logging.Filter):
    """Drops the log records that start with one message (one filter per notice, on its own logger)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        return not str(record.msg).startswith(self.prefix)


def silence_known_notices() -> None:
    """Installs the filters above (idempotent: a second call adds nothing).

    Also turns off the progress bars transformers and the Hub draw (e.g. "Writing model shards") when standard output
    is not a terminal: redrawn bars leave carriage returns in log files.
    """
    for message, category, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    # Lightning's rank_zero_info logs through the logger of whichever of its two rank_zero modules was imported last;
    # loggers are created here if their library is not imported yet (logging returns the same objects to it later)
    for name, prefix in RECORDS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropRecord) and f.prefix == prefix for f in log.filters):
            log.addFilter(_DropRecord(prefix))
    if not sys.stdout.isatty():
        import huggingface_hub
        from transformers.utils import logging as hf_logging

        huggingface_hub.utils.disable_progress_bars()
        hf_logging.disable_progress_bar()

"""Third-party notices that every run printed and that do not concern mgmlora's users, silenced one by one.

Each entry matches one notice by its text and origin, never a whole category or logger, so a new warning from the
same library still shows. `bin/*.py` and `bench/sweep.py` install them through `mgmlora.errors.run`; a test runs the
demo and checks that none of them is printed (which also fails if an upstream change makes a filter miss).

Gemma's `hidden_act="gelu"` notice is not filtered: it is not emitted any more (mgmlora.models.mgm builds the Gemma
config without the key that triggers it, then sets the exact GELU MGM-2B was trained with).
"""

from __future__ import annotations

import logging
import warnings

LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"

# (message regex, category, module regex) for warnings.filterwarnings, each with why it is noise for our users.
WARNINGS: list[tuple[str, type[Warning], str]] = [
    # PEFT's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5 deprecated; mgmlora
    # itself uses activation_checkpointing_enable. Nothing for the user to change.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
    # Lightning's combined loader builds torch's deprecated LeafSpec on every batch; a Lightning/torch matter.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    # mgmlora.cli.parse_config (bin/estimate.py, bin/show_samples.py) hands the tool's own arguments to LightningCLI's
    # parser on purpose; LightningCLI warns whenever a process with arguments does that.
    (r"LightningCLI's args parameter is intended to run from within Python", UserWarning, ""),
]


class _DropLitLoggerTip(logging.Filter):
    """Lightning advertises its hosted logger at every fit (an INFO record); mgmlora logs to TensorBoard."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        return not str(record.msg).startswith(LITLOGGER_TIP)


def silence_known_notices() -> None:
    """Installs the filters above (idempotent: a second call adds nothing)."""
    for message, category, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    # Lightning's rank_zero_info logs through the logger of whichever of these two modules was imported last (each
    # repoints lightning_utilities' module-level logger at its own); the filter sits on those two loggers only
    # (created here if Lightning is not imported yet: logging returns the same objects to Lightning).
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropLitLoggerTip) for f in log.filters):
            log.addFilter(_DropLitLoggerTip())

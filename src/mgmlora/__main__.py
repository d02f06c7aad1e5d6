"""The `mgmlora` command: `mgmlora fit|validate|test ...` (the LightningCLI) and the tools.

    mgmlora fit --config configs/demo.yaml
    mgmlora export|generate|score|compare|estimate|sample-chameleons|show-samples ...   (`--help` on each)
    python -m mgmlora ...    the same, without the installed script

Every command runs through `mgmlora.errors.run` (user errors as one line, `--debug` for the traceback) after
`mgmlora.offline.enforce()`, so no command can reach the network.
"""

from __future__ import annotations

import importlib
import sys

from mgmlora.commands import COMMANDS
from mgmlora.errors import USAGE, run
from mgmlora.offline import enforce

TRAINING = ("fit", "validate", "test")


def _usage() -> str:
    return ("usage: mgmlora {" + ",".join([*TRAINING, *COMMANDS]) + "} ...\n"
            "  fit / validate / test: the LightningCLI (mgmlora fit --help); the others: the tools (mgmlora export "
            "--help).")


def main(argv: list[str] | None = None) -> None:
    """Runs `mgmlora <command> ...` and exits with its outcome (mgmlora.errors.run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--debug":  # `mgmlora --debug <command> ...`: as after the command (errors.run)
        argv = [*argv[1:2], "--debug", *argv[2:]]
    if argv and argv[0].replace("_", "-") in COMMANDS:  # bin/ script names (show_samples) name the same command
        argv[0] = argv[0].replace("_", "-")
    enforce()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if argv else USAGE)
    name = argv[0]
    if name in TRAINING:
        from mgmlora.cli import main as training

        run(training, argv)  # the LightningCLI reads the subcommand itself
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n{_usage()}", file=sys.stderr)
        sys.exit(USAGE)
    command = importlib.import_module(f"mgmlora.commands.{COMMANDS[name]}")
    run(command.main, argv[1:])


if __name__ == "__main__":
    main()

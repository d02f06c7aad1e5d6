"""How the command-line tools end: a user's mistake is one line on stderr, a bug keeps its traceback.

Every command (`mgmlora ...`, `python -m mgmlora ...`, the `bin/*.py` wrappers) and `bench/sweep.py` runs its `main`
through `run()`. What it does with an exception that reaches it:

- a user error prints `error: <message>` (the exception's own message, joined into one line) on stderr and exits with
  `USAGE` (2) when the command line or config was rejected, or `RUNTIME` (1) when the run could not go on
  (missing file, bad data, bad checkpoint, our own checks). User errors are:
  - `MgmloraError` and its subclasses, wherever raised (`UsageError` exits 2);
  - the parsers' `argparse.ArgumentError` (jsonargparse's too): exit 2;
  - exception classes defined in mgmlora (the data format errors are ValueError subclasses), wherever raised;
  - `ValueError` or `OSError` raised by an explicit `raise` statement of mgmlora's own code (the innermost frame
    of the traceback is a `raise ...` line in `src/mgmlora`, `bin/` or `bench/`): that is one of our checks. A
    ValueError that Python or a library raises inside our code (a failed unpacking, a bad tensor shape) stays a
    bug;
  - `OSError` about a file (it has a `filename`: missing, not a directory, no permission, ...), wherever raised;
  - `torch.OutOfMemoryError`, with the hint to run `bin/estimate.py`;
  - Lightning's `MisconfigurationException` (a GPU accelerator or strategy on a machine without one, settings that
    exclude each other): Lightning raises it only for settings, so it exits 2 like a rejected config; so does the
    ValueError its fit loop raises for a `trainer.val_check_interval` longer than the epoch (known only once the
    training loader is built).
- anything else is a bug (ours or a library's): its full traceback is printed, as Python would, then one line
  saying so, exit 1. A bug is never hidden behind one line.
- `--debug` anywhere on the command line (removed before `main` sees it) or `MGMLORA_DEBUG=1` prints the full
  traceback of user errors too, with the same exit code.
- after a `main` that returned, a process group the run left open (Lightning's DDP on CPU, gloo) is destroyed before
  the exit: left to interpreter shutdown, gloo's worker threads can abort the finished process ("terminate called
  without an active exception", exit -6). After an exception it is left alone: ranks that fail at different points
  could wait on each other in the teardown.
- `SystemExit` passes through untouched (help, `--print_config`, exit codes other code chose on purpose, e.g. after
  a signal), and `KeyboardInterrupt` prints `interrupted` and exits 130 (128 + SIGINT).
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NoReturn

USAGE = 2  # the command line or config was rejected: nothing ran (argparse's own code for parse errors)
RUNTIME = 1  # the run started and could not go on
INTERRUPTED = 130  # 128 + SIGINT, the shell's convention

_PACKAGE = Path(__file__).resolve().parent
_OWN_CODE = (_PACKAGE, _PACKAGE.parents[1] / "bin", _PACKAGE.parents[1] / "bench")


class MgmloraError(Exception):
    """Base of mgmlora's own user-facing errors: the message says what is wrong, where, and the fix.

    Raise it (or a subclass) for a mistake the user can correct; `run()` prints it as one line. Existing checks
    that raise ValueError subclasses (data format errors) are treated the same way without deriving from it.
    """

    exit_code: int = RUNTIME


class UsageError(MgmloraError):
    """A command line or config that cannot work, found after parsing (e.g. two flags that exclude each other)."""

    exit_code = USAGE


class SettingsError(UsageError, ValueError):
    """A typed setting out of its range, found when its dataclass is built (`__post_init__`): the config is rejected.

    Also a ValueError, what a dataclass's own checks raise, for callers that build settings in code.
    """


class DiskFullError(MgmloraError):
    """The disk filled up while an output was written; the writer removed what it had written of it."""


# torch.save to a path (DeepSpeed's checkpoint writer) reports a short write, not the OS error: "[enforce fail at
# inline_container.cc] . unexpected pos N vs M" or "PytorchStreamWriter failed writing file ..." (seen on a full tmpfs)
TORCH_SHORT_WRITE = ("PytorchStreamWriter failed writing", "unexpected pos")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or an error it wraps) is the OS saying the disk is full (`ENOSPC`).

    Python's own writes raise `OSError(ENOSPC)`; libraries that write from native code (safetensors) wrap it in their
    own exception types but keep the OS's text, so that counts too; torch's writer to a path reports only a short
    write (`TORCH_SHORT_WRITE`), which counts as well.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(error):
            return True
        if isinstance(error, RuntimeError) and any(text in str(error) for text in TORCH_SHORT_WRITE):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full(path: str | Path, written: int, needed: int | None = None) -> DiskFullError:
    """The one-line DiskFullError for `path`, which every writer raises in place of an `ENOSPC` OSError.

    The writer has already deleted its partial output; the message says so, and how much room the output needs:
    `needed` when the writer knows it beforehand, else more than the `written` bytes the disk took.
    """
    path = Path(path)
    anchor = next((p for p in (path, *path.parents) if p.exists()), Path.cwd())
    free = shutil.disk_usage(anchor).free
    need = f"at least {needed}" if needed is not None and needed > written else f"more than {written}"
    return DiskFullError(f"{path}: disk full after {written} bytes written (it needs {need} bytes; {free} bytes free "
                         "on that disk). Nothing partial was left behind and any previous version of it is unchanged; "
                         "free space on that disk or write elsewhere.")


def _raised_by_own_check(error: BaseException) -> bool:
    tb = error.__traceback__
    if tb is None:
        return False
    *_, innermost = traceback.extract_tb(tb)
    path = Path(innermost.filename).resolve()
    line = (innermost.line or "").strip()
    explicit = line.startswith("raise ")  # `raise X(...)`: not a bare `raise` passing on someone else's error
    return explicit and any(path.is_relative_to(root) for root in _OWN_CODE)


def classify(error: BaseException) -> tuple[Literal["user", "bug"], int]:
    """Whether an exception is a user error (one line) or a bug (traceback), and the exit code it gets."""
    if isinstance(error, MgmloraError):
        return "user", error.exit_code
    if isinstance(error, argparse.ArgumentError):
        return "user", USAGE
    if isinstance(error, OSError) and getattr(error, "filename", None) is not None:
        return "user", RUNTIME
    if type(error).__module__.split(".")[0] == "mgmlora":
        return "user", RUNTIME
    if isinstance(error, (ValueError, OSError)) and _raised_by_own_check(error):
        return "user", RUNTIME
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return "user", RUNTIME
    if _lightning_misconfiguration(error) or _lightning_validation_interval(error):
        return "user", USAGE
    return "bug", RUNTIME


def _lightning_misconfiguration(error: BaseException) -> bool:
    return any(cls.__name__ == "MisconfigurationException" and cls.__module__.startswith("lightning")
               for cls in type(error).__mro__)


def _lightning_validation_interval(error: BaseException) -> bool:
    """Lightning's `val_check_interval (N) must be less than or equal to the number of the training batches`."""
    if not isinstance(error, ValueError) or "`val_check_interval`" not in str(error) or error.__traceback__ is None:
        return False
    *_, innermost = traceback.extract_tb(error.__traceback__)
    explicit = (innermost.line or "").strip().startswith("raise ")
    return explicit and "lightning" in Path(innermost.filename).parts


def one_line(error: BaseException) -> str:
    """The message `run()` prints for a user error (without the `error: ` prefix)."""
    text = str(error).strip()
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.strerror}: {error.filename!r}" if not text or text.startswith("[Errno") else text
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        first = text.splitlines()[0] if text else "out of memory"
        return f"{first} (bin/estimate.py --config <your configs> --gpu_memory_gib N shows what fits)"
    if not text:
        return type(error).__name__
    if _lightning_misconfiguration(error) and ("gpu backend" in text or "accelerator is not available" in text):
        text += " Set trainer.accelerator: cpu (or auto) on a machine without that device."
    if _lightning_validation_interval(error):
        text += (" In a config: trainer.check_val_every_n_epoch: null (as mgmlora's configs set) validates every "
                 "trainer.val_check_interval micro-batches across epochs.")
    # multi-line messages (jsonargparse's "Parser key ...:\n  Expected ...") joined, so it stays one line
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def debug_requested(argv: list[str]) -> bool:
    """`--debug` on the command line or MGMLORA_DEBUG set to anything but empty/0/false."""
    flag = os.environ.get("MGMLORA_DEBUG", "").strip().lower()
    return "--debug" in argv or flag not in ("", "0", "false", "no")


def run(main: Callable[[], object], argv: list[str] | None = None) -> NoReturn:
    """Runs a tool's `main()` on `argv` (default: the command line) and exits with its outcome.

    What is printed and which exit code: the module docstring.
    """
    from mgmlora.quiet import silence_known_notices

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    if debug:
        os.environ["MGMLORA_DEBUG"] = "1"  # processes the run starts (one per GPU) inherit it
    # main() reads sys.argv itself, as without this wrapper: LightningCLI warns when given args while sys.argv has
    # some, and Lightning relaunches sys.argv for each GPU process
    sys.argv[1:] = [a for a in argv if a != "--debug"]
    silence_known_notices()
    try:
        main()
    except KeyboardInterrupt:
        print("\nerror: interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED)
    except Exception as error:  # noqa: BLE001 - sorted into user errors and bugs right here
        kind, code = classify(error)
        sys.stdout.flush()
        if kind == "bug":
            traceback.print_exc()
            print(f"error: unexpected {type(error).__name__} (a bug, not a setting: the traceback above says where)",
                  file=sys.stderr, flush=True)
        else:
            if debug:
                traceback.print_exc()
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(code)
    _close_process_group()
    sys.exit(0)


def _close_process_group() -> None:
    """Destroys the default process group if the run left one (see the module docstring)."""
    dist = sys.modules.get("torch.distributed")  # only if the run imported it: the tools that never do stay light
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

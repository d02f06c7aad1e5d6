"""A tool's command line, built from its typed settings dataclass by jsonargparse.

Each field of the settings becomes one flag of the same name (`--checkpoint`, `--max_new_tokens`); a field named in
`positional` becomes a positional argument. The field's type decides the rest, so the settings class is the single
statement of what a tool accepts:

- `bool` (default False): a switch, `--merge`; `bool | None` takes a value (`--do_sample false`);
- a `Literal` (or `Literal | None`): a closed choice, refused with `invalid choice: 'bf16' (choose from ...)`;
- `list[X]`: one or more values, `--names a b`;
- `X | None` with default None: "not given" (often: the run's own value); a value given is checked as an `X`;
- jsonargparse's restricted types (`PositiveInt`, `NonNegativeInt`, `PositiveFloat`) for counts and sizes.

The parser refuses unknown and abbreviated flags (`allow_abbrev=False`; jsonargparse never prefix-matches its own
keys) and raises `argparse.ArgumentError` instead of printing usage (`exit_on_error=False`); `mgmlora.errors.run`
prints it as one `error:` line with exit 2. Attribute docstrings are the `--help` text.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, fields
from typing import Literal, TypeVar, get_args, get_origin, get_type_hints

from jsonargparse import ArgumentParser, set_parsing_settings

from mgmlora.errors import UsageError

S = TypeVar("S")


def _without_none(hint):
    """`X` for `X | None` (a flag's "not given" is its default, never a value typed on the command line)."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _field_docs(cls) -> dict[str, str]:
    """Each field's attribute docstring (the `--help` text), read by jsonargparse's docstring support."""
    from docstring_parser import parse_from_object  # installed with jsonargparse[signatures]

    parsed = parse_from_object(cls)
    return {p.arg_name: (p.description or "").replace("\n", " ") for p in parsed.params}


def tool_parser(description: str, prog: str | None = None) -> ArgumentParser:
    """An empty parser with the tools' behaviour (no abbreviations, errors raised, docstrings as help)."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return ArgumentParser(prog=prog, description=description, exit_on_error=False, allow_abbrev=False)


def add_settings(parser: ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    """Adds one argument per field of the dataclass `cls` (the rules: the module docstring)."""
    hints = get_type_hints(cls, include_extras=True)
    docs = _field_docs(cls)
    for f in fields(cls):
        switch = hints[f.name] is bool  # `X | None` keeps a value: `--do_sample false` overrides a file's true
        hint = _without_none(hints[f.name])
        default = None if f.default is MISSING and f.default_factory is MISSING else (
            f.default if f.default is not MISSING else f.default_factory())
        required = f.default is MISSING and f.default_factory is MISSING
        if f.name in positional:
            name, kwargs = f.name, {}
        else:
            name, kwargs = f"--{f.name}", {"default": default, "required": required}
        kwargs["help"] = docs.get(f.name) or None
        if switch:
            parser.add_argument(name, action="store_true", help=kwargs["help"])
            continue
        if get_origin(hint) is Literal:
            kwargs.update(type=str, choices=list(get_args(hint)))
        elif get_origin(hint) is list:
            kwargs.update(type=get_args(hint)[0], nargs="+")
        else:
            kwargs["type"] = hint
        parser.add_argument(name, **kwargs)


def parse_settings(cls: type[S], argv: list[str] | None, description: str, positional: tuple[str, ...] = (),
                   prog: str | None = None) -> S:
    """Parses `argv` into an instance of the settings dataclass `cls` (the command line when `argv` is None)."""
    parser = tool_parser(description, prog)
    add_settings(parser, cls, positional)
    return settings_from(cls, parser.parse_args(argv))


def settings_from(cls: type[S], namespace) -> S:
    """The settings dataclass `cls` from a parsed namespace (its fields only)."""
    values = namespace.as_dict() if hasattr(namespace, "as_dict") else vars(namespace)
    return cls(**{f.name: values[f.name] for f in fields(cls)})




def check_device(device: str | None) -> None:
    """Refuses, before anything loads, a `--device` that is not a torch device or that this machine lacks."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this machine has no CUDA GPU; use --device cpu.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s).")


__all__ = ["add_settings", "check_device", "parse_settings", "settings_from", "tool_parser"]

"""Command-line options declared once, as dataclass fields.

Every ``xcft`` subcommand's options are one dataclass (or several, combined by inheritance); each
field says its default and help text with :func:`option`, and :func:`add_options` turns the
dataclass into argparse arguments, :func:`options_from` turns parsed arguments back into it. The
field metadata is the one ``transformers.HfArgumentParser`` reads (``help``, ``choices``,
``aliases``), so ``xcft train``'s dataclasses share fields with the other subcommands.

Flags: ``--field-name`` (``--field_name`` is accepted too) unless ``flag`` names it; a ``bool`` field is a switch that flips
its default unless ``value=True`` makes it take true/false; a sequence field repeats. Standard
library only, so building the parser imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = ["FALSE_WORDS", "TRUE_WORDS", "add_options", "option", "options_from", "parse_bool"]

TRUE_WORDS = ("true", "yes", "t", "y", "1")
FALSE_WORDS = ("false", "no", "f", "n", "0")

T = TypeVar("T")


def parse_bool(text: Any) -> bool:
    """``true``/``false`` (and yes/no, 1/0 ...) as a bool; a ValueError naming the value otherwise."""
    if isinstance(text, bool):
        return text
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{text!r} is not true or false")


def _bool_arg(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
    positional: bool = False,
    value: bool = False,
) -> Any:
    """A dataclass field that is a command-line option (see the module docstring).

    ``flag`` replaces the flag derived from the name (e.g. ``--no-fix-vit`` for a switch that
    turns a true default off); ``aliases`` are other accepted spellings; ``positional`` makes it a
    positional argument; ``value`` makes a bool take true/false instead of being a switch.
    """
    metadata: dict[str, Any] = {"help": help}
    if aliases:
        metadata["aliases"] = list(aliases)
    if choices is not None:
        metadata["choices"] = list(choices)
    if metavar is not None:
        metadata["metavar"] = metavar
    cli = {k: v for k, v in (("flag", flag), ("positional", positional), ("value", value)) if v}
    if cli:
        metadata["xcft_cli"] = cli  # read by add_options only; HfArgumentParser classes never set it
    if isinstance(default, (list, tuple)):
        items = tuple(default)
        return dataclasses.field(default_factory=lambda: items, metadata=metadata)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(element type, is a sequence) of a field annotation such as ``int | None`` or ``Sequence[str]``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _base_type(args[0])
    if origin in (list, tuple, Sequence):
        return (args[0] if args else str), True
    return annotation, False


def add_options(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one argument per :func:`option` field of the dataclass ``cls`` (inherited fields first)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        cli = f.metadata.get("xcft_cli", {})
        kind, repeated = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"help": f.metadata["help"]}
        for key in ("choices", "metavar"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if cli.get("positional"):
            if default is not dataclasses.MISSING:  # a positional with a default may be left out
                kwargs.update(nargs="?", default=default)
            parser.add_argument(f.name, type=kind, **kwargs)
            continue
        flag = cli.get("flag") or "--" + f.name.replace("_", "-")
        names = [flag, *f.metadata.get("aliases", [])]
        if "_" in f.name and not cli.get("flag") and f"--{f.name}" not in names:
            names.append(f"--{f.name}")
        kwargs["dest"] = f.name
        if "choices" not in kwargs and not (kind is bool and not cli.get("value")):
            kwargs.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = [] if repeated else default
        if kind is bool and not cli.get("value"):
            parser.add_argument(*names, action="store_false" if default else "store_true", **kwargs)
        elif repeated:
            parser.add_argument(*names, action="append", type=kind, **kwargs)
        else:
            parser.add_argument(*names, type=_bool_arg if kind is bool else kind, **kwargs)
    return parser


def options_from(cls: type[T], namespace: argparse.Namespace) -> T:
    """The dataclass ``cls`` filled from parsed arguments (fields without an argument keep their default)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.init and hasattr(namespace, f.name):
            value = getattr(namespace, f.name)
            values[f.name] = tuple(value) if _base_type(hints[f.name])[1] and value is not None else value
    return cls(**values)

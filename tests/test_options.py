"""Command-line options declared as dataclasses (xcft.options, xcft.commands.options, the cli table)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect as pyinspect
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import import_module

import pytest

from xcft.cli import SUBCOMMANDS, build_parser, split_verbose
from xcft.data.sizes import SizeOptions
from xcft.options import add_options, option, options_from, parse_bool
from xcft.train.args import DataArguments


@dataclass(kw_only=True)
class Example:
    path: str = option(help="a positional", positional=True)
    count: int | None = option(None, "a number")
    fast: bool = option(False, "a switch")
    keep: bool = option(True, "turns a true default off", flag="--no-keep")
    strict: bool = option(True, "takes true/false", value=True)
    tags: Sequence[str] = option((), "repeatable", flag="--tag")
    name: str = option(help="required", aliases=["--old_name"])


def _parse(*argv: str) -> Example:
    return options_from(Example, add_options(argparse.ArgumentParser(), Example).parse_args(list(argv)))


def test_fields_become_flags_and_back():
    got = _parse("p", "--count", "3", "--fast", "--no-keep", "--strict", "false", "--tag", "a", "--tag", "b", "--old_name", "n")
    assert got == Example(path="p", count=3, fast=True, keep=False, strict=False, tags=("a", "b"), name="n")
    assert _parse("p", "--name", "n") == Example(path="p", name="n")


@pytest.mark.parametrize("argv", [["p"], ["p", "--name", "n", "--strict", "maybe"], ["p", "--name", "n", "--count", "x"]])
def test_bad_arguments_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit):
        _parse(*argv)
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("Yes", True), ("1", True), ("false", False), ("no", False), ("0", False)]
)
def test_parse_bool(text, value):
    assert parse_bool(text) is value


def test_parse_bool_names_a_bad_value():
    with pytest.raises(ValueError, match="'maybe' is not true or false"):
        parse_bool("maybe")


def _subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize(
    "command", [c for c in SUBCOMMANDS if c.options is not None], ids=lambda c: f"{c.group or ''} {c.name}".strip()
)
def test_every_option_has_help_and_reaches_its_function(command):
    """The parser is generated from the dataclass, and each field is a keyword of the function it calls."""
    parser = _subparser(build_parser(), *([command.group] if command.group else []), command.name)
    assert all(a.help for a in parser._actions)
    module, name = command.target.split(":")
    params = pyinspect.signature(getattr(import_module(module), name)).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    missing = [f.name for f in dataclasses.fields(command.options) if f.name not in params and not takes_any]
    assert not missing, f"{command.target} does not take {missing}"


def test_size_options_are_declared_once_for_every_command_and_train():
    parser = build_parser()
    helps = {}
    for name in ("check-data", "inspect", "eval"):
        for action in _subparser(parser, name)._actions:
            if action.dest in ("img_size", "max_length", "hd_num"):
                helps.setdefault(action.dest, set()).add(action.help)
    assert helps == {f.name: {f.metadata["help"]} for f in dataclasses.fields(SizeOptions)}
    assert issubclass(DataArguments, SizeOptions)  # xcft train's --img_size / --max_length / --hd_num


def test_bits_and_given_num_have_one_help_text_in_every_command_and_train():
    """--bits (eval, chat, bench, train) and --given_num (check-data, train) read their help from one place."""
    from xcft.data.mixture import GIVEN_NUM_HELP
    from xcft.model.bits import BITS_HELP, SUPPORTED_BITS
    from xcft.train.args import ModelArguments

    parser = build_parser()
    seen: dict[str, set[str]] = {"bits": set(), "given_num": set()}
    for command in SUBCOMMANDS:
        if command.options is None:
            continue
        for action in _subparser(parser, *([command.group] if command.group else []), command.name)._actions:
            if action.dest in seen:
                seen[action.dest].add(action.help)
                if action.dest == "bits":
                    assert list(action.choices) == list(SUPPORTED_BITS)
    assert seen == {"bits": {BITS_HELP}, "given_num": {GIVEN_NUM_HELP}}
    train_fields = {f.name: f for f in (*dataclasses.fields(ModelArguments), *dataclasses.fields(DataArguments))}
    assert train_fields["bits"].metadata["help"].startswith(BITS_HELP)  # plus the alias train accepts
    assert train_fields["given_num"].metadata["help"] == GIVEN_NUM_HELP


@pytest.mark.parametrize(
    ("argv", "verbose", "rest"),
    [
        (["-v", "check-data", "d"], True, ["check-data", "d"]),
        (["train", "a.yaml", "--verbose"], True, ["train", "a.yaml"]),
        (["eval", "d"], False, ["eval", "d"]),
    ],
)
def test_verbose_is_taken_anywhere(argv, verbose, rest):
    assert split_verbose(argv) == (verbose, rest)

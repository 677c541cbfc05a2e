"""The ``xcft`` command line.

Each subcommand is one row of :data:`SUBCOMMANDS`: an options dataclass
(:mod:`xcft.commands.options`, turned into flags by :mod:`xcft.options`) and the plain function
that takes those options as keywords and returns an exit code; the function's module is imported
only when it runs, so ``xcft --help`` stays fast.
User errors (:class:`xcft.errors.XcftError`) print one message and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from xcft.commands import options as opts
from xcft.errors import XcftError
from xcft.options import add_options, options_from

logger = logging.getLogger("xcft")
VERBOSE_FLAGS = ("-v", "--verbose")


# --------------------------------------------------------------------------- subcommands


@dataclass(frozen=True)
class Subcommand:
    """One ``xcft`` subcommand: its options dataclass and the function that runs it.

    ``target`` is ``module:function``, imported only when the subcommand runs (so ``xcft --help``
    stays fast); the function takes the options' fields as keywords and returns the exit status.
    ``options`` None: the command parses its own argument list (``train`` takes the official
    finetune.py flags and every TrainingArguments flag).
    """

    name: str
    help: str
    target: str
    options: type | None = None
    group: str | None = None  # "bench": a subcommand of ``xcft bench``


SUBCOMMANDS = (
    Subcommand("train", "finetune a model (official finetune.py flags work)", "xcft.commands.train:train_command"),
    Subcommand(
        "plan", "memory a training run needs per GPU, before it starts (xcft train's flags)", "xcft.commands.plan:plan_command"
    ),
    Subcommand(
        "check-data",
        "validate a data.txt or JSON file before training",
        "xcft.commands.check_data:check_data_command",
        opts.CheckDataOptions,
    ),
    Subcommand("inspect", "show how one sample is encoded", "xcft.commands.check_data:inspect_command", opts.InspectOptions),
    Subcommand("eval", "loss per sample and overall", "xcft.commands.eval:eval_command", opts.EvalOptions),
    Subcommand(
        "reward",
        "reward-model scores per conversation, or chosen vs rejected per pair",
        "xcft.commands.reward:reward_command",
        opts.RewardOptions,
    ),
    Subcommand(
        "init-model",
        "write a randomly initialised model folder",
        "xcft.commands.init_model:init_model_command",
        opts.InitModelOptions,
    ),
    Subcommand("merge", "merge a LoRA adapter into its base model", "xcft.commands.merge:merge_command", opts.MergeOptions),
    Subcommand(
        "convert",
        "rewrite an official checkpoint as a self-contained folder",
        "xcft.commands.convert:convert_command",
        opts.ConvertOptions,
    ),
    Subcommand("chat", "chat with a model about images", "xcft.commands.chat:chat_command", opts.ChatOptions),
    Subcommand(
        "predict",
        "answer every sample of a data set in batches (JSON Lines)",
        "xcft.commands.predict:predict_command",
        opts.PredictOptions,
    ),
    Subcommand(
        "score",
        "answer metrics of a prediction file, or compare two",
        "xcft.commands.score:score_command",
        opts.ScoreOptions,
    ),
    Subcommand("demo", "end-to-end demo on synthetic data (CPU, minutes)", "xcft.commands.demo.main:demo_main", opts.DemoOptions),
    Subcommand(
        "web", "browser UI: data, training, eval, chat, merge (needs xcft[web])", "xcft.commands.web:web_command", opts.WebOptions
    ),
    Subcommand(
        "train",
        "time real training steps (the xcft train code path)",
        "xcft.commands.bench:bench_train_command",
        opts.BenchTrainCliOptions,
        group="bench",
    ),
    Subcommand(
        "data",
        "time image decoding and preprocessing",
        "xcft.commands.bench:bench_data_command",
        opts.BenchDataOptions,
        group="bench",
    ),
    Subcommand(
        "predict",
        "time batched generation against one prompt at a time",
        "xcft.commands.bench:bench_predict_command",
        opts.BenchPredictOptions,
        group="bench",
    ),
)
#: Subcommand groups and their help (``xcft bench WHAT``).
GROUPS = {"bench": "benchmarks: training steps, data loading or batched generation"}
#: Subcommands that parse their own argument list, by name.
OWN_ARGV = {c.name: c for c in SUBCOMMANDS if c.options is None and c.group is None}


def _call(target: str, *args: Any, **kwargs: Any) -> int:
    module, name = target.split(":")
    return importlib.import_module(module).__dict__[name](*args, **kwargs)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xcft", description="Finetune InternLM-XComposer2 vision-language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups = {
        name: sub.add_parser(name, help=text).add_subparsers(dest="what", metavar="WHAT", required=True)
        for name, text in GROUPS.items()
    }
    for command in SUBCOMMANDS:
        where = groups[command.group] if command.group else sub
        p = where.add_parser(command.name, help=command.help, add_help=command.options is not None)
        if command.options is not None:
            add_options(p, command.options)
        p.set_defaults(subcommand=command)
    return parser


def _run(func: Callable[[], int]) -> int:
    try:
        return func()
    except XcftError as exc:
        # -v keeps the traceback (and the OS-level cause of a failed save) for bug reports
        logger.debug("traceback of the error below", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def split_verbose(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """(whether -v/--verbose was given anywhere, the arguments without it): it may follow a subcommand's own arguments."""
    return any(a in VERBOSE_FLAGS for a in argv), [a for a in argv if a not in VERBOSE_FLAGS]


def main(argv: Sequence[str] | None = None) -> int:
    verbose, argv = split_verbose(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # transformers 5.2x warns about its own internal use of a renamed property on every LoRA run: noise to users.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    if argv and argv[0] in OWN_ARGV:
        own = OWN_ARGV[argv[0]]
        return _run(lambda: _call(own.target, argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Subcommand | None = getattr(args, "subcommand", None)
    if command is None:
        parser.print_help()
        return 0
    assert command.options is not None, "subcommands with their own argv are dispatched above"
    fields = vars(options_from(command.options, args))
    return _run(lambda: _call(command.target, **fields))


if __name__ == "__main__":
    sys.exit(main())

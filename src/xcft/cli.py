"""The ``xcft`` command line.

Each subcommand is one plain function that takes the parsed arguments and returns an
exit code; the work itself lives in the library (``xcft.data``, ``xcft.model``,
``xcft.train``), imported inside the function so that ``xcft --help`` stays fast.
User errors (:class:`xcft.errors.XcftError`) print one message and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

from xcft.commands.bench.options import add_arguments as add_bench_train_arguments
from xcft.errors import XcftError

logger = logging.getLogger("xcft")


# --------------------------------------------------------------------------- subcommands


def check_data(args: argparse.Namespace) -> int:
    """Read every sample and image once; print a summary and every problem found."""
    from xcft.commands.check_data import check_data_command

    return check_data_command(
        args.data,
        model_dir=args.model,
        img_size=args.img_size,
        max_length=args.max_length,
        given_num=args.given_num,
        output_format=args.format,
        workers=args.workers,
        hd_num=args.hd_num,
    )


def inspect(args: argparse.Namespace) -> int:
    """Show one encoded sample: tokens, supervised spans and image slots."""
    from xcft.commands.check_data import inspect_command

    return inspect_command(
        args.data,
        model_dir=args.model,
        index=args.index,
        sample_id=args.id,
        img_size=args.img_size,
        max_length=args.max_length,
        output_format=args.format,
        hd_num=args.hd_num,
    )


def eval_(args: argparse.Namespace) -> int:
    """Per-sample and mean loss of a model on a data set."""
    from xcft.commands.eval import eval_command

    return eval_command(
        args.data,
        model_dir=args.model,
        max_length=args.max_length,
        batch_size=args.batch_size,
        output_format=args.format,
        dtype=args.dtype,
        device=args.device,
        hd_num=args.hd_num,
        bits=args.bits,
    )


def init_model(args: argparse.Namespace) -> int:
    """Write a randomly initialised model folder of a given preset shape."""
    from xcft.commands.init_model import init_model_command

    return init_model_command(args.output, preset=args.preset, img_size=args.img_size, tokenizer=args.tokenizer, seed=args.seed)


def train(argv: Sequence[str]) -> int:
    """Finetune (full or LoRA); accepts the official finetune.py flags and every TrainingArguments flag."""
    from xcft.commands.train import train_command

    return train_command(list(argv))


def plan(argv: Sequence[str]) -> int:
    """Peak memory per device of a training run (xcft train's options), and the changes that make it fit."""
    from xcft.commands.plan import plan_command

    return plan_command(list(argv))


def merge(args: argparse.Namespace) -> int:
    """Merge a LoRA adapter into its base and verify the merged logits."""
    from xcft.commands.merge import merge_command

    return merge_command(adapter=args.adapter, output=args.output, base=args.base)


def convert(args: argparse.Namespace) -> int:
    """Rewrite an official checkpoint folder as a self-contained xcft folder."""
    from xcft.commands.convert import convert_command

    return convert_command(args.source, args.output)


def chat(args: argparse.Namespace) -> int:
    """Answer one query, or chat interactively, with a base, full or LoRA output."""
    from xcft.commands.chat import chat_command

    return chat_command(
        model_dir=args.model,
        images=args.image,
        query=args.query,
        max_new_tokens=args.max_new_tokens,
        system=args.system,
        device=args.device,
        greedy=args.greedy,
        training_layout=args.training_layout,
        hd_num=args.hd_num,
        bits=args.bits,
    )


def demo(args: argparse.Namespace) -> int:
    """End-to-end demo: synthetic data, LoRA finetune, accuracy before/after, merge, chat."""
    from xcft.commands.demo.run import demo_command

    return demo_command(output=args.output, steps=args.steps, quick=args.quick, output_format=args.format, family=args.family)


def web(args: argparse.Namespace) -> int:
    """Browser UI: look at the data, run and watch a finetune, chat with the result, merge."""
    from xcft.commands.web import web_command

    return web_command(host=args.host, port=args.port, workdir=args.workdir, device=args.device)


def bench(args: argparse.Namespace) -> int:
    """Training-step and data-loading benchmarks."""
    from xcft.commands.bench import bench_command

    return bench_command(args)


# --------------------------------------------------------------------------- parser


def _add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format (default: text)")


def _add_bits(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bits",
        type=int,
        choices=[4, 8, 16],
        default=16,
        help="store the decoder linears in 4 bit (NF4, double quantization) or 8 bit (LLM.int8) with bitsandbytes, "
        "as QLoRA training does; a LoRA adapter then stays a separate branch. Needs xcft[qlora]. Default 16: not quantized",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xcft",
        description="Finetune InternLM-XComposer2 vision-language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="finetune a model (official finetune.py flags work)", add_help=False)
    p.set_defaults(func=None)

    p = sub.add_parser("plan", help="memory a training run needs per GPU, before it starts (xcft train's flags)", add_help=False)
    p.set_defaults(func=None)

    p = sub.add_parser("check-data", help="validate a data.txt or JSON file before training")
    p.add_argument("data", help="data.txt, or a single .json/.jsonl file")
    p.add_argument("--model", required=True, help="model folder (its tokenizer.model and config are used)")
    p.add_argument("--img-size", type=int, default=None, help="image side in pixels (default: the model's img_size)")
    p.add_argument("--max-length", type=int, default=None, help="token limit (default: the model's max_length)")
    p.add_argument(
        "--given-num",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        default=True,
        help="data.txt numbers are thousands of samples (true, default) or ratios (false)",
    )
    p.add_argument("--workers", type=int, default=None, help="image decoding threads (default: CPU count)")
    p.add_argument(
        "--hd-num",
        type=int,
        default=None,
        help="InternLM-XComposer-2.5: crop budget per image (default 18, the training default); not for 2.0 models",
    )
    _add_format(p)
    p.set_defaults(func=check_data)

    p = sub.add_parser("inspect", help="show how one sample is encoded")
    p.add_argument("data", help="data.txt, or a single .json/.jsonl file")
    p.add_argument("--model", required=True, help="model folder")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--index", type=int, help="sample index (over all files, in data.txt order)")
    g.add_argument("--id", help="sample id")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument(
        "--hd-num",
        type=int,
        default=None,
        help="InternLM-XComposer-2.5: crop budget per image (default 18, the training default); not for 2.0 models",
    )
    _add_format(p)
    p.set_defaults(func=inspect)

    p = sub.add_parser("eval", help="loss per sample and overall")
    p.add_argument("data", help="data.txt, or a single .json/.jsonl file")
    p.add_argument("--model", required=True, help="model folder, full finetune output or LoRA adapter folder")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--hd-num",
        type=int,
        default=None,
        help="InternLM-XComposer-2.5: crop budget per image (default 18, the training default); not for 2.0 models",
    )
    _add_bits(p)
    _add_format(p)
    p.set_defaults(func=eval_)

    p = sub.add_parser("init-model", help="write a randomly initialised model folder")
    p.add_argument("output", help="folder to write (new or empty; see README Safety)")
    p.add_argument(
        "--preset",
        choices=["tiny", "small", "7b", "tiny-2.5", "7b-2.5"],
        default="tiny",
        help="model shape; the -2.5 presets are InternLM-XComposer-2.5 (HD crops)",
    )
    p.add_argument(
        "--img-size",
        type=int,
        choices=[224, 490, 560],
        default=None,
        help="image (view) side: default 224 for tiny and tiny-2.5, 490 for small and 7b, 560 for 7b-2.5",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer.model to ship (default: a small one built on the spot)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=init_model)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    p.add_argument("--adapter", "--adapter_model_name", dest="adapter", required=True, help="LoRA output folder")
    p.add_argument("--output", "--output_name", dest="output", required=True, help="folder for the merged model (new or empty)")
    p.add_argument("--base", "--base_model_name", dest="base", default=None, help="base model (default: from the adapter)")
    p.set_defaults(func=merge)

    p = sub.add_parser("convert", help="rewrite an official checkpoint as a self-contained folder")
    p.add_argument("source", help="official checkpoint folder")
    p.add_argument("output", help="folder to write (new or empty; see README Safety)")
    p.set_defaults(func=convert)

    p = sub.add_parser("chat", help="chat with a model about images")
    p.add_argument("--model", required=True, help="base model, full finetune output or LoRA adapter folder")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--query", default=None, help="one question; without it an interactive session starts")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--system",
        "--meta-instruction",
        dest="system",
        default=None,
        help="system prompt ('' for none; default: the official one)",
    )
    p.add_argument("--greedy", action="store_true", help="greedy decoding (default: the official sampling settings)")
    p.add_argument(
        "--training-layout",
        action="store_true",
        help="one <s> at the start, as training encodes samples (for models trained from scratch with xcft)",
    )
    p.add_argument(
        "--hd-num",
        type=int,
        default=None,
        help="2.5 models: crops per image (default: the official chat's 24 for one image, 6 each for several)",
    )
    p.add_argument("--device", default=None)
    _add_bits(p)
    p.set_defaults(func=chat)

    p = sub.add_parser("demo", help="end-to-end demo on synthetic data (CPU, minutes)")
    p.add_argument(
        "--output",
        default="xcft-demo",
        help="folder for data, models and plots (new, empty or an earlier demo's; only the demo's own files are replaced)",
    )
    p.add_argument(
        "--family",
        choices=["2.0", "2.5"],
        default="2.0",
        help="model family of the tiny base: 2.0 (one view per image) or 2.5 (HD crops and separators)",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: preset)")
    p.add_argument("--quick", action="store_true", help="fewer samples and steps (for tests)")
    _add_format(p)
    p.set_defaults(func=demo)

    p = sub.add_parser("web", help="browser UI: data, training, chat, merge (needs xcft[web])")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--workdir", default="xcft-web", help="folder for the runs started from the page (default ./xcft-web)")
    p.add_argument("--device", default=None, help="device for the Chat tab (default: cuda when available)")
    p.set_defaults(func=web)

    p = sub.add_parser("bench", help="benchmarks: training steps or data loading")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    b = bsub.add_parser("train", help="time real training steps (the xcft train code path)")
    add_bench_train_arguments(b)
    _add_format(b)
    b = bsub.add_parser("data", help="time image decoding and preprocessing")
    b.add_argument("--data", required=True)
    b.add_argument("--source", action="append", default=[], help="keep only data.txt files whose path contains this (repeatable)")
    b.add_argument("--img-size", type=int, default=490)
    b.add_argument("--workers", type=int, default=0)
    b.add_argument("--fast-jpeg", action="store_true", help="decode large JPEGs at reduced scale (not bit-exact)")
    b.add_argument("--photo", default=None, metavar="WxH", help="also compare exact and fast JPEG decoding on a generated photo")
    _add_format(b)
    p.set_defaults(func=bench)
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if ("-v" in argv[:1] or "--verbose" in argv[:1]) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # transformers 5.2x warns about its own internal use of a renamed property on every LoRA run: noise to users.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    # `train` takes the official finetune.py flags and every TrainingArguments flag: it parses its own argv.
    rest = [a for a in argv if a not in ("-v", "--verbose")]
    if rest and rest[0] == "train":
        return _run(lambda: train(rest[1:]))
    if rest and rest[0] == "plan":
        return _run(lambda: plan(rest[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return _run(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""The options of every ``xcft`` subcommand, one dataclass each (see :mod:`xcft.options`).

A field is a flag; its name is the keyword the command function takes, so ``cli.py`` calls
``command(**fields)`` with nothing forwarded by hand. Groups shared by several subcommands (the data
sizes, the output format, the model folder) are dataclasses of their own, combined by inheritance,
so each flag and its help text are written once. Kept free of torch so building the parser is fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from xcft.commands.bench.options import TrainBenchOptions
from xcft.data.cache_options import CacheOptions
from xcft.data.mixture import GIVEN_NUM_HELP
from xcft.data.sizes import SizeOptions
from xcft.model.bits import BITS_HELP, SUPPORTED_BITS
from xcft.model.template_xcomposer2 import PROMPT_LAYOUTS
from xcft.options import option

__all__ = [
    "BenchDataOptions",
    "BenchPredictOptions",
    "BenchTrainCliOptions",
    "ChatOptions",
    "CheckDataOptions",
    "ConvertOptions",
    "DemoOptions",
    "EvalOptions",
    "InitModelOptions",
    "InspectOptions",
    "MergeOptions",
    "PredictOptions",
    "PromptOptions",
    "RewardOptions",
    "ScoreOptions",
    "WebOptions",
]

DATA_HELP = "data.txt, or a single .json/.jsonl file"


@dataclass(kw_only=True)
class FormatOption:
    output_format: str = option("text", "output format (default: text)", flag="--format", choices=["text", "json"])


@dataclass(kw_only=True)
class QuantOption:
    bits: int = option(16, BITS_HELP, choices=list(SUPPORTED_BITS))


@dataclass(kw_only=True)
class DataOptions:
    """A data set read against a model folder (combined with :class:`SizeOptions`)."""

    data: str = option(help=DATA_HELP, positional=True)
    model_dir: str = option(help="model folder (its tokenizer.model and config are used)", flag="--model")


@dataclass(kw_only=True)
class CheckDataOptions(FormatOption, CacheOptions, SizeOptions, DataOptions):
    given_num: bool = option(True, GIVEN_NUM_HELP, value=True, metavar="true|false")
    workers: int | None = option(None, "image decoding threads (default: CPU count)")


@dataclass(kw_only=True)
class InspectOptions(FormatOption, CacheOptions, SizeOptions, DataOptions):
    index: int | None = option(None, "sample index (over all files, in data.txt order); give this or --id")
    sample_id: str | None = option(None, "sample id; give this or --index", flag="--id")


@dataclass(kw_only=True)
class EvalOptions(FormatOption, QuantOption, CacheOptions, SizeOptions, DataOptions):
    batch_size: int = option(4, "samples per forward pass")
    dtype: str = option("float32", "weights dtype", choices=["float32", "bfloat16", "float16"])
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda when available)")


@dataclass(kw_only=True)
class RewardOptions(EvalOptions):
    """The options of ``xcft eval``; the model folder is an ``xcft train --stage rm`` output."""


@dataclass(kw_only=True)
class InitModelOptions:
    output: str = option(help="folder to write (new or empty; see README Safety)", positional=True)
    preset: str = option(
        "tiny",
        "model shape; the -2.5 presets are InternLM-XComposer-2.5 (HD crops)",
        choices=["tiny", "small", "7b", "tiny-2.5", "7b-2.5"],
    )
    img_size: int | None = option(
        None,
        "image (view) side: default 224 for tiny and tiny-2.5, 490 for small and 7b, 560 for 7b-2.5",
        choices=[224, 490, 560],
    )
    tokenizer: str | None = option(None, "tokenizer.model to ship (default: a small one built on the spot)")
    seed: int = option(0, "random seed of the weights")


@dataclass(kw_only=True)
class MergeOptions:
    adapter: str = option(help="LoRA output folder", aliases=["--adapter_model_name"])
    output: str = option(help="folder for the merged model (new or empty)", aliases=["--output_name"])
    base: str | None = option(None, "base model (default: from the adapter)", aliases=["--base_model_name"])


@dataclass(kw_only=True)
class ConvertOptions:
    source: str = option(help="official checkpoint folder", positional=True)
    output: str = option(help="folder to write (new or empty; see README Safety)", positional=True)


@dataclass(kw_only=True)
class PromptOptions(QuantOption):
    """How a question is put to the model and answered: shared by chat and predict."""

    max_new_tokens: int = option(256, "answer length limit in tokens")
    system: str | None = option(
        None,
        "system prompt ('' for none; default: the prompt layout's, the official one for 2.0, else none)",
        aliases=["--meta-instruction"],
    )
    layout: str | None = option(
        None,
        "prompt layout (default: the one the model folder records; official checkpoints and their finetunes: "
        "official; models xcft created from scratch: training, i.e. no system prompt and one <s> as training encodes)",
        choices=PROMPT_LAYOUTS,
    )
    training_layout: bool = option(False, "the same as --layout training")
    # not SizeOptions.hd_num: chat's default is the official chat's own budget, not the training one
    hd_num: int | None = option(
        None, "2.5 models: crops per image (default: the official chat's 24 for one image, 6 each for several)"
    )
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda when available)")


@dataclass(kw_only=True)
class ChatOptions(PromptOptions):
    model_dir: str = option(help="base model, full finetune output or LoRA adapter folder", flag="--model")
    images: Sequence[str] = option((), "image file (repeat for several)", flag="--image")
    query: str | None = option(None, "one question; without it an interactive session starts")
    greedy: bool = option(False, "greedy decoding (default: the official sampling settings)")


METRICS_HELP = (
    "comma-separated answer metrics: exact, contains, first_word, choice (multiple-choice letter), bleu, rouge_l "
    "(default: all; the first of exact/contains/first_word/choice decides which samples failed)"
)


@dataclass(kw_only=True)
class PredictOptions(CacheOptions, PromptOptions):
    data: str = option(help=DATA_HELP + " in the training format; the last user turn of each sample is asked", positional=True)
    model_dir: str = option(help="base model, full finetune output or LoRA adapter folder", flag="--model")
    output: str = option(
        help="prediction file (JSON Lines); an existing one is continued: samples it holds are skipped", metavar="PREDS.JSONL"
    )
    batch_size: int = option(8, "prompts generated together (left padding, KV cache)")
    sample: bool = option(False, "sample with the official settings (temperature 1, top_p 0.8; default: greedy)")
    seed: int = option(0, "random seed (with --sample)")
    limit: int | None = option(None, "predict only the first N samples")
    metrics: str | None = option(None, "score the predictions when done (as xcft score --metrics)")


@dataclass(kw_only=True)
class ScoreOptions(FormatOption):
    predictions: str = option(help="prediction file of xcft predict", positional=True)
    other: str | None = option(
        None, "a second prediction file of the same data: deltas per source and the samples fixed or broken", positional=True
    )
    metrics: str | None = option(None, METRICS_HELP)
    show: int = option(10, "failed (or changed) samples listed in the text output")


@dataclass(kw_only=True)
class DemoOptions(FormatOption):
    output: str = option(
        "xcft-demo",
        "folder for data, models and plots (new, empty or an earlier demo's; only the demo's own files are replaced)",
    )
    family: str = option(
        "2.0",
        "model family of the tiny base: 2.0 (one view per image) or 2.5 (HD crops and separators)",
        choices=["2.0", "2.5"],
    )
    steps: int | None = option(None, "training steps (default: preset)")
    quick: bool = option(False, "fewer samples and steps (for tests)")
    stage: str = option(
        "sft",
        "sft: LoRA finetune of a tiny base; dpo: a model that names a wrong colour, corrected by DPO on preference pairs",
        choices=["sft", "dpo"],
    )


@dataclass(kw_only=True)
class WebOptions:
    host: str = option("127.0.0.1", "address to listen on (default 127.0.0.1: this machine only)")
    port: int = option(7860, "port to listen on")
    workdir: str = option("xcft-web", "folder for the training and eval runs started from the page (default ./xcft-web)")
    device: str | None = option(None, "device for the Chat and Eval tabs (default: cuda when available)")


@dataclass(kw_only=True)
class BenchTrainCliOptions(FormatOption, TrainBenchOptions):
    """``xcft bench train``: the benchmark's options and the output format."""


@dataclass(kw_only=True)
class BenchPredictOptions(FormatOption):
    model_dir: str = option(help="model folder (e.g. xcft init-model M --preset small)", flag="--model")
    data: str = option(help=DATA_HELP + "; its samples are the prompts")
    sources: Sequence[str] = option((), "keep only data.txt files whose path contains this (repeatable)", flag="--source")
    samples: int = option(16, "prompts timed (the data's samples repeated)")
    batch_size: int = option(8, "batch size compared with batch 1")
    max_new_tokens: int = option(32, "tokens generated per answer (forced, so both runs generate the same)")
    device: str | None = option(None, "cpu, cuda ... (default: cuda when available; bfloat16 there)")


@dataclass(kw_only=True)
class BenchDataOptions(FormatOption):
    data: str = option(help=DATA_HELP)
    sources: Sequence[str] = option((), "keep only data.txt files whose path contains this (repeatable)", flag="--source")
    img_size: int = option(490, "image side in pixels")
    workers: int = option(0, "decoding worker processes (0: in the main process)")
    fast_jpeg: bool = option(False, "decode large JPEGs at reduced scale (not bit-exact)")
    photo: str | None = option(None, "also compare exact and fast JPEG decoding on a generated photo", metavar="WxH")

"""Configuration of ``xcft train``: documented dataclasses, YAML + flag parsing, resolved-config writing.

The flag names are those of the official InternLM-XComposer2 ``finetune.py`` plus every Hugging Face
``TrainingArguments`` flag, so an official ``finetune.sh`` keeps working when ``finetune.py`` is replaced
by ``xcft train``. A YAML file gives the same keys; command-line flags override it. Unknown keys are an
error that names the nearest valid key. To add an option, add a documented field to one of the
dataclasses below: parsing, YAML, the resolved config and ``--help`` pick it up with no other change.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import DataClassType, string_to_bool

from xcft.data.cache_options import CacheOptions
from xcft.data.mixture import GIVEN_NUM_HELP
from xcft.data.sizes import SizeOptions
from xcft.errors import XcftError
from xcft.model.bits import BITS_HELP, QUANT_TYPES, SUPPORTED_BITS
from xcft.run_files import RESOLVED_CONFIG_NAME

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = [
    "attention.wqkv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
]


@dataclass
class ModelArguments:
    """Which model to start from and which of its parts are trained."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model folder: an official InternLM-XComposer2 checkpoint or one xcft wrote (required)."},
    )
    use_lora: bool = field(
        default=False,
        metadata={"help": "Freeze the decoder and train peft LoRA adapters on the five linears (official flag)."},
    )
    fix_vit: bool = field(
        default=True,
        metadata={"help": "Freeze the vision tower. False trains it (its post_layernorm is unused either way)."},
    )
    fix_sampler: bool = field(
        default=False,
        metadata={"help": "Freeze the vision projector (vision_proj). Official name: the 'sampler'."},
    )
    model_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the weights are loaded in: float32 (master weights; the official behaviour), "
            "bfloat16 or float16. A half dtype halves the memory of frozen weights in LoRA runs; "
            "trainable LoRA weights stay float32.",
            "choices": ["float32", "bfloat16", "float16"],
        },
    )
    bits: int = field(
        default=16,
        metadata={"help": f"{BITS_HELP}. Alias: --quantization_bit.", "choices": list(SUPPORTED_BITS)},
    )
    quant_type: str = field(
        default="nf4",
        metadata={"help": "4-bit data type of --bits 4: nf4 (QLoRA's normal float) or fp4.", "choices": list(QUANT_TYPES)},
    )
    double_quant: bool = field(
        default=True,
        metadata={"help": "--bits 4: quantize the quantization constants too (about 0.4 bit per weight saved)."},
    )
    cpu_reuse_memory: bool = field(
        default=True,
        metadata={
            "help": "CPU runs: keep freed memory in the process (glibc malloc) so each step reuses the pages of "
            "the last one instead of page-faulting its large logits and gradients again (up to ~20%% faster "
            "steps measured on 2 cores); the process then keeps its peak RSS. No effect on a GPU or without glibc."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Accepted for compatibility with the official finetune.py; unused (nothing is downloaded)."},
    )


@dataclass
class DataArguments(CacheOptions, SizeOptions):
    """Training and evaluation data and how samples are encoded (--img_size, --max_length, --hd_num: :class:`SizeOptions`)."""

    data_path: str | None = field(
        default=None,
        metadata={"help": "data.txt (one '<json path> <number>' per line) or a single .json/.jsonl file (required)."},
    )
    given_num: bool = field(
        default=True,
        metadata={"help": GIVEN_NUM_HELP},
    )
    resolution: int | None = field(
        default=None,
        metadata={
            "help": "Official 2.5 flag, the same as --img_size: accepted when it is the checkpoint's view size (560); "
            "the official code never passes it to its dataset either."
        },
    )
    batch_size: int = field(
        default=1,
        metadata={
            "help": "Official flag: samples per dataset item. xcft multiplies it into the per-device batch "
            "(per_device_train_batch_size * batch_size samples per device and step); prefer "
            "per_device_train_batch_size."
        },
    )
    eval_data_path: str | None = field(
        default=None, metadata={"help": "Evaluation data (same formats as data_path); enables eval loss."}
    )
    eval_split: float = field(
        default=0.0,
        metadata={
            "help": "Fraction (0-1) of the training samples held out for evaluation (seeded, never trained on). "
            "Used when eval_data_path is not given."
        },
    )
    eval_metrics: str | None = field(
        default=None,
        metadata={
            "help": "Answer metrics at each evaluation (comma-separated, as xcft score --metrics: exact, contains, "
            "first_word, choice, bleu, rouge_l): the eval samples' last user turns are answered greedily as xcft "
            "predict answers them and scored; logged beside eval_loss as eval_<metric>."
        },
    )
    eval_generate_samples: int = field(
        default=64, metadata={"help": "With eval_metrics: the first N eval samples are answered (generation is slow)."}
    )
    eval_max_new_tokens: int = field(default=64, metadata={"help": "With eval_metrics: answer length limit in tokens."})
    # -- speed: packing and length grouping (see README "Speed and memory")
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several samples into each row of max_length positions (positions restart per sample, "
            "attention never crosses samples, loss unchanged); per_device_train_batch_size then counts rows."
        },
    )
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "Unpacked runs: batch samples of similar length (less padding); lengths are read without decoding images."
        },
    )
    # -- end speed


@dataclass
class LoraArguments:
    """peft LoRA settings (used with --use_lora true); names and defaults are the official ones."""

    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Module name suffixes that get LoRA (default: the five decoder linears)."},
    )
    lora_weight_path: str = field(
        default="", metadata={"help": "A peft adapter folder to start from (continue training a LoRA)."}
    )
    lora_bias: str = field(
        default="none",
        metadata={"help": "peft bias mode: none, all or lora_only.", "choices": ["none", "all", "lora_only"]},
    )


@dataclass
class PreferenceArguments:
    """What is trained (--stage) and, for preference stages, how (TRL's option names)."""

    stage: str = field(
        default="sft",
        metadata={
            "help": "sft: supervised finetuning on conversations; dpo: direct preference optimisation on "
            "preference pairs (conversations_a/conversations_b or chosen/rejected records); rm: a reward model "
            "(score head on the reward token) on the same pairs.",
            "choices": ["sft", "dpo", "rm"],
        },
    )
    beta: float = field(default=0.1, metadata={"help": "dpo: strength of the pull to the reference (TRL's beta)."})
    loss_type: str = field(
        default="sigmoid",
        metadata={"help": "dpo loss: sigmoid (the DPO paper), ipo or hinge.", "choices": ["sigmoid", "ipo", "hinge"]},
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "dpo sigmoid loss: assumed share of wrongly labelled pairs (0 to < 0.5)."}
    )
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "dpo: add rpo_alpha times the chosen answers' negative log-likelihood (RPO)."}
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "dpo: reference model folder of the same family (default: the starting model itself; with "
            "--use_lora the base with the adapter disabled, no second copy)."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "dpo: switch off every dropout (LoRA, Partial LoRA) in the policy, as TRL does by default, so "
            "policy and reference agree before the first step and the log-prob ratios carry no dropout noise."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "dpo: score every pair with the reference once before training, so no reference model stays "
            "in memory (useful for full finetunes)."
        },
    )


@dataclass
class OutputArguments:
    """What a run may do to its --output_dir, and how it reports progress (the rest of the output options are TrainingArguments')."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in an --output_dir that holds checkpoints or the result of an earlier xcft run: "
            "removes only what xcft wrote there (never your files). Without it such a folder is refused unless "
            "--resume_from_checkpoint is given."
        },
    )
    progress_interval: float = field(
        default=30.0,
        metadata={
            "help": "Seconds between progress lines when the output is not a terminal (a batch job, a pipe, the web "
            "log): one line with step, loss, speed and time left instead of a redrawn progress bar."
        },
    )


@dataclass
class MemoryArguments:
    """The memory plan: how much memory the run needs per device, checked before any weight is loaded."""

    gpu_memory: str | None = field(
        default=None,
        metadata={
            "help": "Memory of one GPU to plan for: a size (24GiB, 80GB, 40000MiB) or a GPU name (A100-40GB, "
            "A100-80GB, H100, H200, L40S, A10, V100, 3090, 4090 ...). Default: the free memory of the visible "
            "GPU, or the host RAM on a CPU."
        },
    )
    gpus: int | None = field(
        default=None,
        metadata={
            "help": "Number of GPUs the run uses (ZeRO shards over them). Default: the launcher's world size (torchrun), else 1."
        },
    )
    ignore_memory_plan: bool = field(
        default=False,
        metadata={"help": "Start even when the memory plan says the run does not fit in the GPU's free memory."},
    )


# Other names of options: flags of older transformers versions that official finetune.sh files pass,
# and names users know from other finetuning tools. Value: the new name, or None for "accepted and ignored".
LEGACY_ALIASES: dict[str, str | None] = {
    "quantization_bit": "bits",  # LLaMA-Factory / ms-swift
    "evaluation_strategy": "eval_strategy",
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
    "warmup_ratio": "warmup_steps",  # transformers 5: a float in [0, 1) is a ratio
    "no_cuda": "use_cpu",
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
    "save_safetensors": None,
    "logging_dir": None,  # handled: becomes the TensorBoard folder
}

#: How the log line describes an alias (default: an older transformers name).
ALIAS_ORIGINS: dict[str, str] = {"quantization_bit": "the LLaMA-Factory / ms-swift name"}


def _alias_origin(key: str) -> str:
    return ALIAS_ORIGINS.get(key, "the old name")


@dataclass
class TrainConfig:
    """The four parsed argument groups of one ``xcft train`` run, plus where each value came from."""

    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    training: Any  # transformers.TrainingArguments
    output: OutputArguments = field(default_factory=OutputArguments)
    memory: MemoryArguments = field(default_factory=MemoryArguments)
    preference: PreferenceArguments = field(default_factory=PreferenceArguments)
    explicit: set[str] = field(default_factory=set)  # keys the user set (YAML or flags)
    logging_dir: str | None = None
    config_file: str | None = None


def option_classes() -> tuple[type, ...]:
    """The dataclasses whose fields are the options of `xcft train` (the web form is built from them too)."""
    return (
        ModelArguments,
        DataArguments,
        LoraArguments,
        PreferenceArguments,
        OutputArguments,
        MemoryArguments,
        TrainingArguments,
    )


def _make_parser():
    classes = option_classes()
    # Older transformers have TrainingArguments.group_by_length too: let both groups read the one flag.
    extra = {"conflict_handler": "resolve"} if any(f.name == "group_by_length" for f in dataclasses.fields(classes[-1])) else {}
    parser = HfArgumentParser([DataClassType(c) for c in classes], prog="xcft train", allow_abbrev=False, **extra)
    parser.error = _one_line_error  # type: ignore[method-assign]
    return parser


def _one_line_error(message: str) -> NoReturn:
    """argparse's error (usage + message + exit 2) as one XcftError line, e.g. a flag of the wrong type."""
    raise XcftError(f"xcft train: {message}; run 'xcft train --help' for the options and their types")


def _yaml_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}.get(
        type(value), type(value).__name__
    )


def check_value(key: str, value: Any, action: Any, source: str) -> Any:
    """``value`` of option ``key`` from a YAML file, converted to the option's type; one error line otherwise.

    argparse converts only string defaults, so a YAML ``learning_rate: [1, 2]`` would reach the
    trainer unchecked; this applies the flag's own type to YAML values of any type.
    """
    conv = action.type
    choices = list(action.choices) if action.choices else None

    def fail(expected: str) -> XcftError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return XcftError(f"{source}: option '{key}' is {shown} ({_yaml_type(value)}); expected {expected}")

    def one(v: Any, expected_prefix: str = "") -> Any:
        if conv is float:
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise fail(expected_prefix + "a number")
            try:
                return float(v)
            except ValueError:
                raise fail(expected_prefix + "a number") from None
        if conv is int:
            if isinstance(v, bool) or not isinstance(v, (int, float, str)) or (isinstance(v, float) and not v.is_integer()):
                raise fail(expected_prefix + "an integer")
            try:
                return int(v)
            except ValueError:
                raise fail(expected_prefix + "an integer") from None
        if conv is string_to_bool:
            if isinstance(v, bool):
                return v
            if isinstance(v, (str, int)) and not isinstance(v, bool):
                try:
                    return string_to_bool(str(v))
                except Exception:
                    pass
            raise fail("true or false")
        if choices is not None:
            text = getattr(v, "value", v)
            if not isinstance(text, str) or text not in [getattr(c, "value", c) for c in choices]:
                raise fail("one of " + ", ".join(str(getattr(c, "value", c)) for c in choices))
            return conv(text) if conv is not None else text
        if conv is str and isinstance(v, (bool, int, float)):
            return str(v).lower() if isinstance(v, bool) else str(v)
        return v

    if value is None:
        return None
    if action.nargs in ("+", "*"):
        items = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
        if not isinstance(items, list) or any(isinstance(v, (list, dict)) for v in items):
            raise fail("a list of values")
        return [one(v, "a list of ") for v in items]
    if isinstance(value, (list, dict)) and (conv in (int, float, string_to_bool) or choices is not None):
        return one(object())  # always fails, naming the expected type
    return one(value)


def valid_keys() -> list[str]:
    """Every key accepted in a YAML file or as ``--key``."""
    names: list[str] = []
    for cls in option_classes():
        names += [f.name for f in dataclasses.fields(cls) if f.init]
    return names


# Names people type that string similarity maps to the wrong option.
_SYNONYMS = {
    "lora_rank": "lora_r",
    "rank": "lora_r",
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "model": "model_name_or_path",
    "model_path": "model_name_or_path",
    "data": "data_path",
    "steps": "max_steps",
    "grad_accum": "gradient_accumulation_steps",
    "gradient_accumulation": "gradient_accumulation_steps",
    "micro_batch_size": "per_device_train_batch_size",
    "eval_data": "eval_data_path",
}


def _suggest(key: str, valid: list[str]) -> str:
    if key in _SYNONYMS:
        return f"; did you mean '{_SYNONYMS[key]}'?"
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not match:
        # substring hits catch abbreviations ("lr" -> learning_rate does not, "target" -> lora_target_modules does)
        match = [v for v in valid if key in v][:1]
    return f"; did you mean '{match[0]}'?" if match else "; run 'xcft train --help' for the list of options"


def _normalise_key(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def _legacy_aliases() -> dict[str, str | None]:
    """The aliases that apply to the installed transformers version.

    A rename applies when the new name exists (transformers 5.17 has no activation_checkpointing, so
    gradient_checkpointing stays itself there); "ignored" applies only to names that are gone.
    """
    valid = set(valid_keys())
    return {
        old: new
        for old, new in LEGACY_ALIASES.items()
        if (new is None and old not in valid) or (new is not None and new in valid)
    }


def _apply_legacy(values: dict[str, Any], source: str, legacy_out: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    aliases = _legacy_aliases()
    for key, value in values.items():
        if key in aliases:
            new = aliases[key]
            legacy_out[key] = value
            if new is None:
                if key != "logging_dir":
                    logger.info("%s: '%s' is an option of older transformers versions; ignored", source, key)
                continue
            logger.info("%s: '%s' is %s of '%s'; using it as '%s'", source, key, _alias_origin(key), new, new)
            key = new
        out[key] = value
    return out


def _split_cli(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Rename legacy flags in ``argv``; collect values of ignored legacy flags."""
    legacy: dict[str, Any] = {}
    aliases = _legacy_aliases()
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            name, eq, val = tok[2:].partition("=")
            key = name.replace("-", "_")
            if key in aliases:
                new = aliases[key]
                has_value = bool(eq) or (i + 1 < len(argv) and not argv[i + 1].startswith("--"))
                value: Any = val if eq else (argv[i + 1] if has_value and not eq else True)
                legacy[key] = value
                if new is None:
                    if key != "logging_dir":
                        logger.info("'--%s' is an option of older transformers versions; ignored", key)
                    i += 1 + (1 if has_value and not eq else 0)
                    continue
                logger.info("'--%s' is %s of '--%s'; using it as '--%s'", key, _alias_origin(key), new, new)
                out.append(f"--{new}{eq}{val}" if eq else f"--{new}")
                i += 1
                continue
        out.append(tok)
        i += 1
    return out, legacy


def _explicit_cli_keys(argv: list[str], parser) -> set[str]:
    keys = set()
    for tok in argv:
        if tok.startswith("--"):
            action = parser._option_string_actions.get(tok.split("=", 1)[0])
            if action is not None:
                keys.add(action.dest)
    return keys


def load_yaml_config(path: str) -> dict[str, Any]:
    """Read a YAML config: a mapping of option names to values."""
    p = Path(path)
    if not p.is_file():
        raise XcftError(f"config file {path} does not exist; pass a YAML file or only --flags")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise XcftError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise XcftError(f"config file {path} must be a mapping of option names to values, got {type(data).__name__}")
    return {_normalise_key(str(k)): v for k, v in data.items()}


#: Where xcft's defaults differ from TrainingArguments' (a YAML file or a flag overrides them).
XCFT_DEFAULTS: dict[str, Any] = {
    "report_to": "tensorboard",  # TensorBoard logs by default (transformers 5 defaults to none)
    "logging_steps": 1,  # loss on the progress bar and in TensorBoard at every step, as the official scripts do
    "remove_unused_columns": False,  # our collator's keys are exactly the model's inputs
    "prediction_loss_only": True,  # evaluation never gathers [batch, length, vocab] logits
    # non-reentrant checkpointing works with frozen embeddings (LoRA) and DDP; older transformers
    # call the option gradient_checkpointing_kwargs (whichever exists is used)
    "activation_checkpointing_kwargs": {"use_reentrant": False},
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
}


def print_help() -> None:
    """``xcft train --help``: every option, grouped."""
    parser = _make_parser()
    parser.usage = "xcft train [CONFIG.yaml] [--option value ...]"
    parser.print_help()


def parse_train_args(argv: list[str], *, require_data: bool = True) -> TrainConfig:
    """Parse ``[CONFIG.yaml] [--flag value ...]`` into a :class:`TrainConfig`.

    Precedence: command-line flags > YAML file > xcft defaults (:data:`XCFT_DEFAULTS`, plus
    ``eval_strategy: epoch`` when evaluation data is given and ``ddp_find_unused_parameters: true``
    when the vision tower is trained) > TrainingArguments defaults. Raises :class:`XcftError` for
    unknown keys (naming the nearest valid one), a missing config file or missing required options.
    """
    valid = valid_keys()
    valid_set = set(valid)
    config_file = None
    if argv and not argv[0].startswith("-"):
        config_file, argv = argv[0], argv[1:]
    legacy: dict[str, Any] = {}
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = _apply_legacy(load_yaml_config(config_file), config_file, legacy)
        for key in file_values:
            if key not in valid_set:
                raise XcftError(f"{config_file}: unknown option '{key}'{_suggest(key, valid)}")
    argv, cli_legacy = _split_cli(list(argv))
    legacy.update(cli_legacy)

    def parse(extra_defaults: dict[str, Any]):
        parser = _make_parser()
        known = set(valid)
        defaults = {k: v for k, v in {**XCFT_DEFAULTS, **extra_defaults}.items() if k in known}
        parser.set_defaults(**copy.deepcopy(defaults))
        parser.set_defaults(
            **{
                k: check_value(k, v, parser._option_string_actions[f"--{k}"], config_file or "config")
                if f"--{k}" in parser._option_string_actions
                else v
                for k, v in file_values.items()
            }
        )
        explicit = set(file_values) | _explicit_cli_keys(argv, parser)
        try:
            parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True, look_for_args_file=False)
        except SystemExit as exc:  # argparse already printed the reason (bad value, --help)
            if exc.code == 0:
                raise
            raise XcftError("invalid command line for 'xcft train' (see the message above)") from None
        except (ValueError, TypeError) as exc:  # TrainingArguments.__post_init__ validation
            raise XcftError(f"invalid training options: {exc}") from None
        *groups, remaining = parsed
        for tok in remaining:
            if tok.startswith("-"):
                key = _normalise_key(tok.split("=", 1)[0])
                raise XcftError(f"unknown option '--{key}'{_suggest(key, valid)}")
            raise XcftError(
                f"unexpected argument '{tok}': only the first argument may be a YAML config file; "
                "every other value belongs to a --flag"
            )
        return groups, explicit

    (model_args, data_args, lora_args, pref_args, output_args, memory_args, training_args), explicit = parse({})
    conditional: dict[str, Any] = {}
    if (data_args.eval_data_path or data_args.eval_split > 0) and "eval_strategy" not in explicit:
        conditional["eval_strategy"] = "epoch"
    if not model_args.fix_vit and "ddp_find_unused_parameters" not in explicit:
        conditional["ddp_find_unused_parameters"] = True  # the vision tower is unused in text-only batches
    if conditional:
        (model_args, data_args, lora_args, pref_args, output_args, memory_args, training_args), explicit = parse(conditional)

    if not model_args.model_name_or_path:
        raise XcftError("--model_name_or_path is required (a model folder), on the command line or in the YAML file")
    if require_data and not data_args.data_path:
        raise XcftError("--data_path is required (data.txt or a .json/.jsonl file), on the command line or in the YAML file")
    if not 0.0 <= data_args.eval_split < 1.0:
        raise XcftError(f"--eval_split must be a fraction in [0, 1), got {data_args.eval_split}")
    if data_args.batch_size < 1:
        raise XcftError(f"--batch_size must be at least 1, got {data_args.batch_size}")
    if data_args.packing and data_args.group_by_length:
        raise XcftError("--packing and --group_by_length do not combine: packing already fills rows; drop --group_by_length")
    if data_args.group_by_length:  # the Trainer's own switch (named train_sampling_strategy in transformers 5)
        if hasattr(training_args, "train_sampling_strategy"):
            training_args.train_sampling_strategy = "group_by_length"
        else:
            training_args.group_by_length = True
    if data_args.batch_size > 1:
        # Official meaning: each dataset item holds batch_size samples, so a device step sees
        # per_device_train_batch_size * batch_size samples. Fold it in once (the resolved config keeps 1).
        training_args.per_device_train_batch_size *= data_args.batch_size
        logger.info(
            "--batch_size %d (official flag): per-device batch is now %d samples",
            data_args.batch_size,
            training_args.per_device_train_batch_size,
        )
        data_args.batch_size = 1
    if training_args.dataloader_persistent_workers and training_args.dataloader_num_workers > 0:
        raise XcftError(
            "--dataloader_persistent_workers true keeps each worker's copy of the data set, so the per-epoch "
            "data.txt draw would never change; leave it false"
        )
    if memory_args.gpus is not None and memory_args.gpus < 1:
        raise XcftError(f"--gpus must be at least 1, got {memory_args.gpus}")
    if data_args.hd_num is not None and data_args.hd_num < 1:
        raise XcftError(f"--hd_num must be at least 1 (crops per image), got {data_args.hd_num}")
    if data_args.resolution is not None:
        if data_args.img_size is not None and data_args.img_size != data_args.resolution:
            raise XcftError(
                f"--resolution {data_args.resolution} and --img_size {data_args.img_size} disagree; they name the same "
                "thing (the view size): pass one"
            )
        data_args.img_size = data_args.resolution
    check_preference(pref_args, data_args)
    check_quantization_options(model_args, training_args)
    logging_dir = legacy.get("logging_dir")
    return TrainConfig(
        model=model_args,
        data=data_args,
        lora=lora_args,
        training=training_args,
        output=output_args,
        memory=memory_args,
        preference=pref_args,
        explicit=explicit,
        logging_dir=str(logging_dir) if logging_dir not in (None, True) else None,
        config_file=config_file,
    )


def check_preference(pref: PreferenceArguments, data: DataArguments) -> None:
    """Reject preference options that cannot work together (one error line each)."""
    if pref.beta <= 0:
        raise XcftError(f"--beta must be positive, got {pref.beta}")
    if not 0.0 <= pref.label_smoothing < 0.5:
        raise XcftError(f"--label_smoothing must be in [0, 0.5), got {pref.label_smoothing}")
    if pref.label_smoothing and pref.loss_type != "sigmoid":
        raise XcftError(f"--label_smoothing applies to --loss_type sigmoid, not {pref.loss_type}")
    if pref.rpo_alpha is not None and pref.rpo_alpha < 0:
        raise XcftError(f"--rpo_alpha must be at least 0, got {pref.rpo_alpha}")
    if pref.stage != "dpo":
        used = [name for name in ("ref_model_name_or_path", "rpo_alpha") if getattr(pref, name)]
        if pref.precompute_ref_log_probs:
            used.append("precompute_ref_log_probs")
        if used:
            raise XcftError(f"--{used[0]} applies to --stage dpo; this run is --stage {pref.stage}")
    if pref.stage == "rm" and data.packing:
        raise XcftError("--packing is not available with --stage rm (the score is read per row); drop it")
    if pref.stage != "sft" and data.eval_metrics:
        raise XcftError(
            f"--eval_metrics scores generated answers of --stage sft; --stage {pref.stage} logs its own pair metrics: drop it"
        )


def check_quantization_options(model_args: ModelArguments, training_args: Any) -> None:
    """Refuse what ``--bits 4/8`` does not support, one line each, before anything is loaded.

    Supported: one process, DDP, DeepSpeed ZeRO-1/2 (they never partition frozen weights),
    checkpointing, resuming (docs/training.md, QLoRA). Quantized weights cannot be trained, ZeRO-3
    would partition the packed bitsandbytes storage and lose its quantization state, and xcft's FSDP
    setup would shard bitsandbytes weights like any other.
    """
    bits = int(model_args.bits)
    if bits == 16:
        return
    if not model_args.use_lora:
        raise XcftError(
            f"--bits {bits} stores the decoder weights in {bits} bit, which cannot be trained: add --use_lora true "
            "(QLoRA: LoRA adapters on the quantized model) or use --bits 16 for a full finetune"
        )
    ds = getattr(training_args, "hf_deepspeed_config", None)
    if ds is not None and ds.is_zero3():
        raise XcftError(
            f"--bits {bits} with DeepSpeed ZeRO-3 is not supported: ZeRO-3 partitions every weight, the packed "
            "bitsandbytes weights included, and loses their quantization state; use configs/ds_zero2.json or plain DDP"
        )
    if training_args.fsdp:
        raise XcftError(
            f"--bits {bits} with FSDP is not supported: xcft's FSDP setup shards every weight, bitsandbytes' packed "
            "weights included; use DeepSpeed ZeRO-2 (configs/ds_zero2.json) or plain DDP"
        )


def _plain(value: Any) -> Any:
    """A YAML-safe version of a config value."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def resolved_config(cfg: TrainConfig) -> dict[str, Any]:
    """Every option of the run with its final value, keyed as in a YAML config (re-loadable)."""
    out: dict[str, Any] = {}
    for group in (cfg.model, cfg.data, cfg.lora, cfg.preference, cfg.output, cfg.memory):
        out.update({f.name: _plain(getattr(group, f.name)) for f in dataclasses.fields(group) if f.init})
    training = cfg.training.to_dict()
    for f in dataclasses.fields(cfg.training):
        if f.init and f.name in training:
            out[f.name] = _plain(training[f.name])
    # Values that are derived, machine-specific or secret do not belong in a reusable config.
    for key in ("local_rank", "hub_token"):
        out.pop(key, None)
    return out


def write_resolved_config(cfg: TrainConfig, output_dir: str | os.PathLike) -> Path:
    """Write ``train_config.yaml`` (every resolved option) into ``output_dir``; returns its path."""
    path = Path(output_dir) / RESOLVED_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Resolved configuration of this xcft train run (every option, defaults included).\n"
        f"# Rerun it with: xcft train {path}\n"
    )
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(resolved_config(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)
    return path

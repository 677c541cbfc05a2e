"""The Train tab's form, generated from the ``xcft train`` configuration dataclasses.

Every init field of :class:`~xcft.train.args.ModelArguments`, ``DataArguments``, ``LoraArguments``
and ``transformers.TrainingArguments`` becomes one form field with the default ``xcft train``
applies (:data:`~xcft.train.args.XCFT_DEFAULTS` included), so the form cannot drift from the CLI.
A filled form turns into the exact equivalent command line (only the values that differ from the
defaults) and the same values as a YAML config.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import yaml

from xcft.errors import XcftError
from xcft.options import parse_bool
from xcft.train.args import XCFT_DEFAULTS, option_classes

#: Shown first, in this order; every other field is folded by group.
COMMON_FIELDS = (
    "model_name_or_path",
    "data_path",
    "use_lora",
    "lora_r",
    "img_size",
    "max_length",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "packing",
    "bf16",
    "output_dir",
    "deepspeed",
)
#: What the common fields are called in the form (the option name follows in brackets).
TITLES = {
    "model_name_or_path": "Model folder",
    "data_path": "Data (data.txt or .json)",
    "use_lora": "LoRA",
    "lora_r": "LoRA rank",
    "img_size": "Image size (px)",
    "max_length": "Max tokens per sample",
    "learning_rate": "Learning rate",
    "num_train_epochs": "Epochs",
    "max_steps": "Max steps (-1: by epochs)",
    "per_device_train_batch_size": "Batch size per device",
    "gradient_accumulation_steps": "Gradient accumulation",
    "packing": "Packing",
    "bf16": "bf16",
    "output_dir": "Output folder",
    "deepspeed": "DeepSpeed config",
}
#: Fields the form leaves out: set per process by launchers, secrets, or objects no flag can express.
HIDDEN_FIELDS = frozenset({"local_rank", "hub_token", "parallelism_config"})
#: The form group of each option dataclass of ``xcft train`` (TrainingArguments: "training").
GROUPS = {"ModelArguments": "model", "DataArguments": "data", "LoraArguments": "lora", "OutputArguments": "output"}
GROUP_TITLES = {
    "model": "Model",
    "data": "Data",
    "lora": "LoRA",
    "output": "Output folder",
    "training": "Training (TrainingArguments)",
}


@dataclass(frozen=True)
class FormField:
    """One option of ``xcft train`` as the form shows it.

    ``kind``: bool, optional_bool (unset / true / false), choice, int, float, optional_number (empty:
    unset), text, list (space separated) or json (a JSON object). ``default`` is the value ``xcft train`` uses when the option
    is not given.
    """

    name: str
    group: str
    kind: str
    default: Any
    choices: tuple[str, ...] = ()
    help: str = ""

    @property
    def common(self) -> bool:
        return self.name in COMMON_FIELDS

    @property
    def label(self) -> str:
        """What the form calls the field: its title and the option name, or the option name."""
        return f"{TITLES[self.name]} ({self.name})" if self.name in TITLES else self.name

    def form_default(self) -> Any:
        """The default as the form component holds it."""
        if self.kind == "bool":
            return bool(self.default)
        if self.kind in ("int", "float"):
            return self.default
        if self.kind == "optional_bool":
            return "" if self.default is None else str(bool(self.default)).lower()
        if self.kind == "list":
            return " ".join(str(v) for v in (self.default or []))
        if self.kind == "json":
            return "" if self.default is None else json.dumps(self.default)
        return "" if self.default is None else str(_plain_default(self.default))


def _plain_default(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _union_args(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _is(tp: Any, cls: type) -> bool:
    return tp is cls or typing.get_origin(tp) is cls


def _field_kind(tp: Any, default: Any, metadata: typing.Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    args = _union_args(tp)
    non_none = [a for a in args if a is not type(None)]
    optional = len(non_none) < len(args) or default is None
    if metadata.get("choices"):
        choices = tuple(str(c) for c in metadata["choices"])
        return "choice", ("", *choices) if optional else choices
    enums = [a for a in non_none if isinstance(a, type) and issubclass(a, Enum)]
    if enums:
        choices = tuple(str(e.value) for e in enums[0])
        return "choice", ("", *choices) if optional else choices
    if non_none == [bool]:
        return ("optional_bool", ("", "true", "false")) if default is None else ("bool", ())
    if non_none == [int] and default is not None:
        return "int", ()
    if non_none == [float] and default is not None:
        return "float", ()
    if non_none in ([int], [float]):  # optional number: empty means unset
        return "optional_number", ()
    if any(_is(a, dict) for a in non_none):
        return "json", ()
    if any(_is(a, list) for a in non_none) and not (isinstance(default, str) and default):
        return "list", ()
    return "text", ()


def form_fields() -> list[FormField]:
    """Every ``xcft train`` option as a :class:`FormField`, common ones first, then by group."""
    valid = set()
    out: list[FormField] = []
    for cls in option_classes():
        group = GROUPS.get(cls.__name__, "training")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name in HIDDEN_FIELDS or f.name in valid:
                continue
            valid.add(f.name)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            default = XCFT_DEFAULTS.get(f.name, default)
            kind, choices = _field_kind(hints.get(f.name, str), default, f.metadata)
            if kind == "choice" and str(_plain_default(default)) not in choices and default is not None:
                choices = (str(_plain_default(default)), *choices)
            out.append(FormField(f.name, group, kind, default, choices, str(f.metadata.get("help", "")).replace("%%", "%")))
    order = {name: k for k, name in enumerate(COMMON_FIELDS)}
    return sorted(out, key=lambda f: (0, order[f.name]) if f.common else (1, 0))


# --------------------------------------------------------------------------- form values -> config


def _value(field: FormField, raw: Any) -> tuple[bool, Any]:
    """(differs from the default, typed value) for one form value."""
    kind, default = field.kind, field.default
    value: Any
    if kind == "bool":
        value = bool(raw)
        return value != bool(default), value
    if kind in ("int", "float"):
        if raw is None or raw == "":
            return False, default
        try:
            value = int(raw) if kind == "int" else float(raw)
        except (TypeError, ValueError):
            raise XcftError(f"{field.name}: {raw!r} is not a number") from None
        if kind == "int" and float(raw) != int(raw):
            raise XcftError(f"{field.name}: {raw!r} is not a whole number")
        return float(value) != float(default), value
    text = "" if raw is None else str(raw).strip()
    if kind == "optional_bool":
        if text == "":
            return False, default
        value = parse_bool(text)
        return default is None or value != bool(default), value
    if kind == "optional_number":
        if text == "":
            return False, default
        value = _parse_scalar(text)
        if isinstance(value, str):
            raise XcftError(f"{field.name}: {text!r} is not a number")
        return value != default, value
    if kind == "list":
        value = text.replace(",", " ").split()
        return value != [str(v) for v in (default or [])], value
    if kind == "json":
        if text == "":
            return False, default
        try:
            value = json.loads(text)
        except ValueError:
            value = text  # a path (DeepSpeed / FSDP config file) or other plain string
        return value != default, value
    if text == "":
        return False, default
    if kind == "choice" or isinstance(_plain_default(default), str) or default is None:
        return text != ("" if default is None else str(_plain_default(default))), text
    # a text field whose default is a number (Optional[int] / Optional[float] with a value)
    return text != str(default), _parse_scalar(text)


def _parse_scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def changed_values(fields: Sequence[FormField], raw_values: Sequence[Any]) -> dict[str, Any]:
    """The options whose form value differs from the ``xcft train`` default, typed, common ones first."""
    out: dict[str, Any] = {}
    order = {name: k for k, name in enumerate(COMMON_FIELDS)}
    pairs = sorted(zip(fields, raw_values), key=lambda fr: order.get(fr[0].name, len(order)))
    for field, raw in pairs:
        differs, value = _value(field, raw)
        if differs:
            out[field.name] = value
    return out


def values_from_argv(fields: Sequence[FormField], argv: Sequence[str]) -> list[Any]:
    """The form values (one per field) of an ``xcft train`` command line that :func:`to_argv` wrote.

    Options not on the command line keep their defaults; options the form does not have are left out.
    """
    given: dict[str, list[str]] = {}
    name = None
    for word in argv:
        if word.startswith("--"):
            name, _, inline = word[2:].partition("=")
            given[name] = [inline] if inline else []
        elif name is not None:
            given[name].append(word)
    return [_form_value(f, given[f.name]) if f.name in given else f.form_default() for f in fields]


def _form_value(field: FormField, words: list[str]) -> Any:
    """One option's words as the form component holds them."""
    text = " ".join(words)
    if field.kind == "bool":
        return text == "" or parse_bool(text)  # a bare flag means true
    if field.kind == "optional_bool":
        return str(parse_bool(text)).lower()
    if field.kind in ("int", "float"):
        value = _parse_scalar(text)
        return value if not isinstance(value, str) else field.form_default()
    return text


def to_argv(values: dict[str, Any]) -> list[str]:
    """``xcft train`` arguments for a mapping of options (lists become several words)."""
    argv: list[str] = []
    for key, value in values.items():
        argv.append(f"--{key}")
        if isinstance(value, bool):
            argv.append("true" if value else "false")
        elif isinstance(value, list):
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


def command_preview(argv: Sequence[str]) -> str:
    """The shell command, one option per line."""
    lines = ["xcft train"]
    i = 0
    while i < len(argv):
        words = [argv[i]]
        i += 1
        while i < len(argv) and not argv[i].startswith("--"):
            words.append(argv[i])
            i += 1
        lines.append("    " + " ".join(shlex.quote(w) for w in words))
    return " \\\n".join(lines)


def yaml_preview(values: dict[str, Any]) -> str:
    """The same options as a YAML config (``xcft train config.yaml``)."""
    header = "# xcft train config.yaml (only the options that differ from the defaults)\n"
    return header + (yaml.safe_dump(values, sort_keys=False, allow_unicode=True) if values else "{}\n")

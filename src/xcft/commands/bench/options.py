"""Options of ``xcft bench train``: one dataclass, from which the command-line flags are generated.

Kept free of torch so that building the CLI parser stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def _opt(default: Any, help: str, flag: str | None = None, **argparse_kwargs: Any) -> Any:
    """A field with its command-line help; ``flag`` overrides the flag derived from the field name."""
    metadata = {"help": help, "flag": flag, "argparse": argparse_kwargs}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainBenchOptions:
    """One benchmark run (the ``xcft bench train`` flags)."""

    model: str | None = _opt(None, "model folder, as for xcft train")
    preset: str | None = _opt(
        None, "random weights of a preset, built on the device", choices=["tiny", "small", "7b", "tiny-2.5", "7b-2.5"]
    )
    data: str | None = _opt(None, "data.txt or JSON file, as for xcft train")
    sources: Sequence[str] = _opt((), "keep only data.txt files whose path contains this (repeatable)", "--source")
    synthetic: int | None = _opt(None, "synthetic samples of LENGTH tokens instead of --data", metavar="LENGTH")
    synthetic_images: int = _opt(1, "images per synthetic sample")
    hd_num: int | None = _opt(
        None,
        "2.5 models: crop budget (xcft train --hd_num; default 18); synthetic images get the largest crop grid it allows",
    )
    batch_size: int = _opt(1, "samples per step (rows per step with --packing)")
    packing: bool = _opt(False, "pack samples into rows of max_length")
    group_by_length: bool = _opt(False, "length-grouped batches (unpacked runs)")
    steps: int = _opt(5, "timed steps")
    warmup: int = _opt(1, "untimed steps first")
    max_length: int | None = _opt(None, "token limit (default: the model's)")
    workers: int = _opt(0, "DataLoader workers (dataloader_num_workers)")
    use_lora: bool = _opt(False, "LoRA (use_lora true) instead of a full finetune", "--lora")
    bits: int = _opt(16, "decoder linears in 4 or 8 bit (xcft train --bits; QLoRA with --lora)", choices=[4, 8, 16])
    fix_vit: bool = _opt(True, "train the vision tower too (xcft train --fix_vit false)", "--no-fix-vit")
    bf16: bool = _opt(False, "bf16 mixed precision (frozen weights in bf16 with --preset)")
    activation_checkpointing: bool = _opt(False, "activation (gradient) checkpointing")
    full_head: bool = _opt(False, "output head at every position (for comparison)")
    attn: str = _opt("auto", "attention: auto (flash_attention_2 on a GPU when installed), sdpa, eager ...")
    seed: int = _opt(0, "random seed")
    calibration_seconds: float = _opt(0.3, "seconds per calibration repeat (5 repeats before and after the run)")
    cpu_reuse_memory: bool = _opt(
        True,
        "CPU: let freed memory go back to the kernel (xcft train --cpu_reuse_memory false), for comparison",
        "--no-cpu-reuse-memory",
    )
    extra_args: Sequence[str] = field(default_factory=tuple)  # more xcft train flags (library use)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option field; booleans are switches that flip the default."""
    for f in dataclasses.fields(TrainBenchOptions):
        if "help" not in f.metadata:
            continue
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            assert f.default_factory is not dataclasses.MISSING, f"option {f.name} has no default"
            default = f.default_factory()
        kwargs = dict(f.metadata["argparse"], dest=f.name, help=f.metadata["help"])
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_false" if default else "store_true", **kwargs)
        elif isinstance(default, tuple):
            parser.add_argument(flag, action="append", default=[], **kwargs)
        else:
            kind = float if f.type in ("float",) else (int if "int" in str(f.type) else str)
            parser.add_argument(flag, type=kind, default=default, **kwargs)


def from_namespace(args: argparse.Namespace) -> TrainBenchOptions:
    """The options of parsed ``xcft bench train`` arguments."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainBenchOptions) if hasattr(args, f.name)}
    values["sources"] = tuple(values.get("sources") or ())
    return TrainBenchOptions(**values)


__all__ = ["TrainBenchOptions", "add_arguments", "from_namespace"]

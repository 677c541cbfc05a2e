"""Options of ``xcft bench train``: one dataclass, from which the command-line flags are generated (:mod:`xcft.options`).

Kept free of torch so that building the CLI parser stays fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from xcft.model.bits import BITS_HELP, SUPPORTED_BITS
from xcft.options import option


@dataclass
class TrainBenchOptions:
    """One benchmark run (the ``xcft bench train`` flags)."""

    model: str | None = option(None, "model folder, as for xcft train")
    preset: str | None = option(
        None, "random weights of a preset, built on the device", choices=["tiny", "small", "7b", "tiny-2.5", "7b-2.5"]
    )
    data: str | None = option(None, "data.txt or JSON file, as for xcft train")
    sources: Sequence[str] = option((), "keep only data.txt files whose path contains this (repeatable)", flag="--source")
    synthetic: int | None = option(None, "synthetic samples of LENGTH tokens instead of --data", metavar="LENGTH")
    synthetic_images: int = option(1, "images per synthetic sample")
    hd_num: int | None = option(
        None,
        "2.5 models: crop budget (xcft train --hd_num; default 18); synthetic images get the largest crop grid it allows",
    )
    batch_size: int = option(1, "samples per step (rows per step with --packing)")
    packing: bool = option(False, "pack samples into rows of max_length")
    group_by_length: bool = option(False, "length-grouped batches (unpacked runs)")
    steps: int = option(5, "timed steps")
    warmup: int = option(1, "untimed steps first")
    max_length: int | None = option(None, "token limit (default: the model's)")
    workers: int = option(0, "DataLoader workers (dataloader_num_workers)")
    use_lora: bool = option(False, "LoRA (use_lora true) instead of a full finetune", flag="--lora")
    bits: int = option(16, BITS_HELP, choices=list(SUPPORTED_BITS))
    fix_vit: bool = option(True, "train the vision tower too (xcft train --fix_vit false)", flag="--no-fix-vit")
    bf16: bool = option(False, "bf16 mixed precision (frozen weights in bf16 with --preset)")
    activation_checkpointing: bool = option(False, "activation (gradient) checkpointing")
    full_head: bool = option(False, "output head at every position (for comparison)")
    attn: str = option("auto", "attention: auto (flash_attention_2 on a GPU when installed), sdpa, eager ...")
    seed: int = option(0, "random seed")
    calibration_seconds: float = option(0.3, "seconds per calibration repeat (5 repeats before and after the run)")
    cpu_reuse_memory: bool = option(
        True,
        "CPU: let freed memory go back to the kernel (xcft train --cpu_reuse_memory false), for comparison",
        flag="--no-cpu-reuse-memory",
    )
    extra_args: Sequence[str] = field(default_factory=tuple)  # more xcft train flags (library use)


__all__ = ["TrainBenchOptions"]

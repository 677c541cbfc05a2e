"""Getting a model ready to train, shared by ``xcft train`` and the benchmarks.

The order matters: process settings before the model is loaded, then the official freezing
rules (or peft), then float32 master weights for whatever is trainable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from xcft.errors import XcftError
from xcft.model.loading import load_pretrained, name_model_code, unwrap_model
from xcft.model.quantization import require_bitsandbytes
from xcft.train.args import TrainConfig
from xcft.train.host_memory import keep_freed_memory
from xcft.train.qlora import load_dtype, quantize_for_training
from xcft.train.trainer import configure_trainable

logger = logging.getLogger(__name__)


def apply_host_settings(cfg: TrainConfig) -> bool:
    """Process-wide settings of a CPU run (before the model is loaded): see :mod:`xcft.train.host_memory`.

    Returns whether freed memory is now kept for reuse.
    """
    on_cpu = bool(getattr(cfg.training, "use_cpu", False)) or not torch.cuda.is_available()
    return bool(on_cpu and cfg.model.cpu_reuse_memory and keep_freed_memory())


def load_base_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """Load the model to train (float32 master weights unless --model_dtype says otherwise) and its tokenizer.

    With ``--bits 4/8`` the decoder linears are then quantized on the training device (:mod:`xcft.train.qlora`).
    """
    path = cfg.model.model_name_or_path
    assert path is not None, "parse_train_args requires --model_name_or_path"
    if not Path(path).is_dir():
        raise XcftError(
            f"--model_name_or_path {path}: no such folder. xcft loads local folders only (nothing is downloaded); "
            "download the checkpoint first, e.g. with huggingface-cli download"
        )
    if cfg.model.bits != 16:
        require_bitsandbytes()  # before the weights are read
    model, tokenizer = load_pretrained(path, dtype=load_dtype(cfg), device="cpu")
    model = quantize_for_training(cfg, model)
    if cfg.model.model_dtype != "float32" and not cfg.model.use_lora:
        logger.warning("--model_dtype %s in a full finetune: trainable weights are kept in float32", cfg.model.model_dtype)
    return model, tokenizer


def trainable_in_float32(model: torch.nn.Module) -> None:
    """Optimiser state needs float32 master weights; frozen weights may stay in a half dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def prepare_model_for_training(cfg: TrainConfig, model: Any | None = None, *, base_path: str | None = None) -> Any:
    """Freeze / wrap ``model`` per the config (peft in LoRA mode) with float32 trainable weights.

    ``base_path`` is recorded in a LoRA adapter's config (absolute), so the adapter loads from anywhere.
    """
    args = cfg.training
    assert model is not None, "prepare_model_for_training needs the loaded model (see load_base_model)"
    model = configure_trainable(
        model,
        use_lora=cfg.model.use_lora,
        fix_vit=cfg.model.fix_vit,
        fix_sampler=cfg.model.fix_sampler,
        lora=cfg.lora,
        base_path=base_path,
        gradient_checkpointing=bool(getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing),
    )
    trainable_in_float32(model)
    if not cfg.model.use_lora:
        name_model_code(unwrap_model(model).config)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    if trainable == 0:
        raise XcftError("no parameter is trainable: check --use_lora, --fix_vit and --fix_sampler")
    return model


__all__ = ["apply_host_settings", "count_parameters", "load_base_model", "prepare_model_for_training", "trainable_in_float32"]

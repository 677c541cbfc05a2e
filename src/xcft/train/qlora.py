"""QLoRA in ``xcft train``: the dtype weights load in and their quantization right after loading.

``--bits 4`` (or 8) stores the frozen decoder linears with bitsandbytes (see
:mod:`xcft.model.quantization`) and trains peft LoRA adapters on top, as ``--use_lora`` does. The
other weights are held in the compute dtype: bfloat16 with ``--bf16 true``, float16 with
``--fp16 true``, otherwise ``--model_dtype``; trainable ones (LoRA, an unfrozen projector or vision
tower) become float32 master weights as in every LoRA run.

Supported: one process, DDP and DeepSpeed ZeRO-2 (the quantized weights are frozen, so ZeRO-1/2 never
partition them), activation checkpointing, ``--lora_weight_path``, resuming. A full finetune,
ZeRO-3 and FSDP are refused when the options are parsed
(:func:`xcft.train.args.check_quantization_options`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from xcft.model.loading import resolve_dtype
from xcft.model.quantization import quantize_model, require_bitsandbytes

if TYPE_CHECKING:
    from xcft.train.args import TrainConfig

logger = logging.getLogger(__name__)


def load_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype weights are loaded in: ``--model_dtype``, or with ``--bits 4/8`` the compute dtype (see module doc)."""
    if cfg.model.bits == 16:
        return resolve_dtype(cfg.model.model_dtype)
    if cfg.training.bf16:
        return torch.bfloat16
    if cfg.training.fp16:
        return torch.float16
    return resolve_dtype(cfg.model.model_dtype)


def quantize_for_training(cfg: TrainConfig, model: Any) -> Any:
    """``model`` with its decoder linears quantized per ``--bits`` on the training device (unchanged for 16)."""
    if cfg.model.bits == 16:
        return model
    require_bitsandbytes()
    dtype = load_dtype(cfg)
    explicit_model_dtype = "model_dtype" in cfg.explicit and resolve_dtype(cfg.model.model_dtype) != dtype
    if explicit_model_dtype:
        logger.info(
            "--bits %d: the unquantized weights are held in %s, the compute dtype of --bf16/--fp16 (not --model_dtype %s)",
            cfg.model.bits,
            str(dtype).replace("torch.", ""),
            cfg.model.model_dtype,
        )
    return quantize_model(
        model,
        bits=cfg.model.bits,
        compute_dtype=dtype,
        quant_type=cfg.model.quant_type,
        double_quant=cfg.model.double_quant,
        device=cfg.training.device,
        trainable=True,
    )


__all__ = ["load_dtype", "quantize_for_training"]

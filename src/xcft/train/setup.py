"""Getting a model ready to train, shared by ``xcft train`` and the benchmarks.

The order matters: process settings before the model is loaded, then the official freezing
rules (or peft, :func:`configure_trainable`), then float32 master weights for whatever is trainable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from xcft.errors import XcftError
from xcft.model.loading import load_pretrained, name_model_code, unwrap_model
from xcft.model.quantization import require_bitsandbytes
from xcft.train.args import LoraArguments, TrainConfig
from xcft.train.host_memory import keep_freed_memory
from xcft.train.qlora import load_dtype, quantize_for_training

logger = logging.getLogger(__name__)


def _vision_post_layernorm_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of the CLIP post_layernorm: XComposer2 never uses its output, so they never get a gradient."""
    return [p for n, p in model.named_parameters() if "vit." in f".{n}" and "post_layernorm" in n]


#: The 2.5 separator parameters (top-level on the model; absent on 2.0 models).
SEPARATOR_NAMES = ("plora_glb_GN", "plora_sub_GN")


def configure_trainable(
    model: torch.nn.Module,
    *,
    use_lora: bool,
    fix_vit: bool,
    fix_sampler: bool,
    lora: LoraArguments | None = None,
    base_path: str | None = None,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """Apply the official freezing rules; in LoRA mode return the peft-wrapped model.

    Full mode trains the decoder (Partial-LoRA included) and the output head; ``fix_vit`` false also
    trains the vision tower, ``fix_sampler`` true freezes the projector. A 2.5 model's separator
    tokens (``plora_glb_GN``/``plora_sub_GN``) belong to the projector's input: trained with it, as
    the official code trains them, and frozen with it by ``fix_sampler``. LoRA mode freezes every
    original weight (Partial LoRA and the separators included) and adds peft LoRA on
    ``lora.lora_target_modules``; an unfrozen vision tower / projector is then trained in full and
    saved in the adapter (peft ``modules_to_save``; peft saves modules, not bare parameters such
    as the separators), so the adapter folder alone reproduces the trained model.
    """
    if not use_lora:
        model.requires_grad_(True)
        if fix_vit:
            model.vit.requires_grad_(False)
        if fix_sampler:
            model.vision_proj.requires_grad_(False)
            for name in SEPARATOR_NAMES:
                if hasattr(model, name):
                    getattr(model, name).requires_grad_(False)
        for p in _vision_post_layernorm_params(model):
            p.requires_grad_(False)
        return model

    if lora is None:
        raise ValueError("configure_trainable(use_lora=True) needs the LoRA settings (lora=LoraArguments(...))")
    model.requires_grad_(False)
    modules_to_save = []
    if not fix_vit:
        modules_to_save.append("vit")
    if not fix_sampler:
        # The projector's two linears (not the Sequential itself: the model indexes vision_proj[0]).
        modules_to_save += ["vision_proj.0", "vision_proj.2"]
    if lora.lora_weight_path:
        if not (Path(lora.lora_weight_path) / "adapter_config.json").is_file():
            raise XcftError(
                f"--lora_weight_path {lora.lora_weight_path} is not a peft adapter folder (no adapter_config.json); "
                "pass the output folder of an earlier LoRA run, or leave it empty"
            )
        peft_model = PeftModel.from_pretrained(model, lora.lora_weight_path, is_trainable=True)
        logger.info("LoRA: continuing from the adapter in %s", lora.lora_weight_path)
    else:
        config = LoraConfig(
            r=lora.lora_r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=list(lora.lora_target_modules),
            bias=cast(Literal["none", "all", "lora_only"], lora.lora_bias),  # a choices field of LoraArguments
            task_type="CAUSAL_LM",
            modules_to_save=modules_to_save or None,
        )
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:
            raise XcftError(
                f"cannot add LoRA on --lora_target_modules {' '.join(lora.lora_target_modules)}: {exc}. "
                "Use module name suffixes such as attention.wqkv attention.wo feed_forward.w1 feed_forward.w2 feed_forward.w3"
            ) from None
    if base_path is not None:
        # The adapter names its base by absolute path, so it loads from any working directory.
        for cfg in peft_model.peft_config.values():
            cfg.base_model_name_or_path = str(Path(base_path).resolve())
    for p in _vision_post_layernorm_params(peft_model):
        p.requires_grad_(False)
    if gradient_checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


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


def prepare_model_for_training(cfg: TrainConfig, model: Any, *, base_path: str | None = None) -> Any:
    """Freeze / wrap ``model`` per the config (peft in LoRA mode) with float32 trainable weights.

    ``base_path`` is recorded in a LoRA adapter's config (absolute), so the adapter loads from anywhere.
    """
    args = cfg.training
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


__all__ = [
    "SEPARATOR_NAMES",
    "apply_host_settings",
    "configure_trainable",
    "count_parameters",
    "load_base_model",
    "prepare_model_for_training",
    "trainable_in_float32",
]

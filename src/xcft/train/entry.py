"""``xcft train``: parse -> model -> freeze / peft -> data -> Trainer -> save.

Accepts every flag of the official ``finetune.py`` and every Hugging Face ``TrainingArguments`` flag,
optionally after a YAML config file (see :mod:`xcft.train.args`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from xcft.errors import XcftError
from xcft.train.args import TrainConfig, parse_train_args, print_help, write_resolved_config

logger = logging.getLogger(__name__)

EXIT_SIGTERM = 143  # 128 + SIGTERM: the conventional status of a process stopped by SIGTERM


def train_command(argv: list[str]) -> int:
    """Entry point of ``xcft train``; returns the process exit status."""
    if any(a in ("-h", "--help") for a in argv):
        print_help()
        return 0
    return run_training(parse_train_args(argv))


def run_training(cfg: TrainConfig) -> int:
    from transformers import set_seed
    from transformers.trainer_callback import ProgressCallback

    from xcft.train.data import VisionAlignedCollator, build_datasets, needs_vision_alignment
    from xcft.train.trainer import (
        EpochDrawCallback,
        JsonLogCallback,
        LossProgressCallback,
        SigtermCallback,
        XcftTrainer,
        clear_staging,
        configure_trainable,
        count_parameters,
        plot_loss,
        prepare_for_self_contained_save,
        resolve_resume,
    )

    args = cfg.training
    if cfg.logging_dir:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", cfg.logging_dir)
    set_seed(args.seed)
    apply_host_settings(cfg)

    # ---- model
    model, tokenizer = load_base_model(cfg)
    model = configure_trainable(
        model,
        use_lora=cfg.model.use_lora,
        fix_vit=cfg.model.fix_vit,
        fix_sampler=cfg.model.fix_sampler,
        lora=cfg.lora,
        base_path=cfg.model.model_name_or_path,
        gradient_checkpointing=bool(getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing),
    )
    _trainable_in_float32(model)
    prepare_for_self_contained_save(model)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    if trainable == 0:
        raise XcftError("no parameter is trainable: check --use_lora, --fix_vit and --fix_sampler")

    # ---- data
    base_config = _base_config(model)
    train_ds, eval_ds, collator = build_datasets(cfg, tokenizer, base_config)
    if needs_vision_alignment(args, model):
        collator = VisionAlignedCollator(collator, int(base_config.img_size), int(base_config.image_tokens), train_ds.pad_token_id)
        logger.info("batches without images get one blank image so all ranks run the vision tower in step (ZeRO/FSDP)")

    # ---- trainer
    sigterm = SigtermCallback()
    trainer = XcftTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[EpochDrawCallback(train_ds), sigterm, JsonLogCallback()],
    )
    if not args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossProgressCallback)
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if args.should_save:
        clear_staging(args.output_dir)
        path = write_resolved_config(cfg, args.output_dir)
        logger.info("resolved configuration written to %s", path)
    trainer.accelerator.wait_for_everyone()

    # Supervised-only LM head in training (issue 6): same loss, no [batch, length, vocab] logits.
    head_before = getattr(base_config, "supervised_logits_only", False)
    base_config.supervised_logits_only = True
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        base_config.supervised_logits_only = head_before

    # ---- save
    if args.should_save:
        plot = plot_loss(trainer.state.log_history, Path(args.output_dir) / "loss.png")
        if plot is not None:
            logger.info("loss curve written to %s", plot)
    if sigterm.received:
        logger.warning(
            "stopped by SIGTERM at step %s; the checkpoint is in %s. Continue with --resume_from_checkpoint true",
            sigterm.stopped_at,
            args.output_dir,
        )
        return EXIT_SIGTERM
    trainer.save_state()
    trainer.save_model(args.output_dir)
    if args.should_save:
        _finish_output(cfg)
    trainer.accelerator.wait_for_everyone()
    logger.info("finished: %s written to %s", "LoRA adapter" if cfg.model.use_lora else "model", args.output_dir)
    return 0


def apply_host_settings(cfg: TrainConfig) -> bool:
    """Process-wide settings of a CPU run (before the model is loaded): see :mod:`xcft.train.host_memory`.

    Returns whether freed memory is now kept for reuse.
    """
    from xcft.train.host_memory import keep_freed_memory

    on_cpu = bool(getattr(cfg.training, "use_cpu", False)) or not torch.cuda.is_available()
    return bool(on_cpu and cfg.model.cpu_reuse_memory and keep_freed_memory())


def load_base_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """Load the model to train (float32 master weights unless --model_dtype says otherwise) and its tokenizer."""
    from xcft.model.loading import load_pretrained

    path = cfg.model.model_name_or_path
    if not Path(path).is_dir():
        raise XcftError(
            f"--model_name_or_path {path}: no such folder. xcft loads local folders only (nothing is downloaded); "
            "download the checkpoint first, e.g. with huggingface-cli download"
        )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.model_dtype]
    model, tokenizer = load_pretrained(path, dtype=dtype, device="cpu")
    if cfg.model.model_dtype != "float32" and not cfg.model.use_lora:
        logger.warning("--model_dtype %s in a full finetune: trainable weights are kept in float32", cfg.model.model_dtype)
    return model, tokenizer


def _trainable_in_float32(model: torch.nn.Module) -> None:
    """Optimiser state needs float32 master weights; frozen weights may stay in a half dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def _base_config(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def _finish_output(cfg: TrainConfig) -> None:
    """Check the saved output is what the docs promise (adapter names its base by absolute path)."""
    out = Path(cfg.training.output_dir)
    if cfg.model.use_lora:
        import json

        conf_path = out / "adapter_config.json"
        if conf_path.is_file():
            conf = json.loads(conf_path.read_text())
            base = str(Path(cfg.model.model_name_or_path).resolve())
            if conf.get("base_model_name_or_path") != base:
                conf["base_model_name_or_path"] = base
                tmp = conf_path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(conf, indent=2, sort_keys=True))
                os.replace(tmp, conf_path)

"""``xcft train``: parse -> model -> freeze / peft -> data -> Trainer -> save.

Accepts every flag of the official ``finetune.py`` and every Hugging Face ``TrainingArguments`` flag,
optionally after a YAML config file (see :mod:`xcft.train.args`).
The steps themselves live in :mod:`xcft.train`; this module only puts them in order.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers import set_seed
from transformers.trainer_callback import ProgressCallback

from xcft.model.loading import unwrap_model
from xcft.train.args import TrainConfig, parse_train_args, print_help, write_resolved_config
from xcft.train.datasets import VisionAlignedCollator, build_datasets, needs_vision_alignment
from xcft.train.setup import apply_host_settings, load_base_model, prepare_model_for_training
from xcft.train.trainer import (
    EpochDrawCallback,
    LossProgressCallback,
    SigtermCallback,
    XcftTrainer,
    clear_staging,
    plot_loss,
    resolve_resume,
)

logger = logging.getLogger(__name__)

EXIT_SIGTERM = 143  # 128 + SIGTERM: the conventional status of a process stopped by SIGTERM


def train_command(argv: list[str]) -> int:
    """Entry point of ``xcft train``; returns the process exit status."""
    if any(a in ("-h", "--help") for a in argv):
        print_help()
        return 0
    return run_training(parse_train_args(argv))


def run_training(cfg: TrainConfig) -> int:
    """One training run as configured; returns the process exit status (143 after SIGTERM)."""
    args = cfg.training
    if cfg.logging_dir:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", cfg.logging_dir)
    set_seed(args.seed)
    apply_host_settings(cfg)

    # ---- model
    model, tokenizer = load_base_model(cfg)
    model = prepare_model_for_training(cfg, model, base_path=cfg.model.model_name_or_path)

    # ---- data
    base_config = unwrap_model(model).config
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
        callbacks=[EpochDrawCallback(train_ds), sigterm],
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
    trainer.train(resume_from_checkpoint=resume)

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


def _finish_output(cfg: TrainConfig) -> None:
    """Check the saved output is what the docs promise (adapter names its base by absolute path)."""
    out = Path(cfg.training.output_dir)
    if cfg.model.use_lora:
        conf_path = out / "adapter_config.json"
        if conf_path.is_file():
            conf = json.loads(conf_path.read_text())
            base = str(Path(cfg.model.model_name_or_path).resolve())
            if conf.get("base_model_name_or_path") != base:
                conf["base_model_name_or_path"] = base
                tmp = conf_path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(conf, indent=2, sort_keys=True))
                os.replace(tmp, conf_path)

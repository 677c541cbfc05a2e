"""``xcft train``: parse -> model -> freeze / peft -> data -> Trainer -> save.

Accepts every flag of the official ``finetune.py`` and every Hugging Face ``TrainingArguments`` flag,
optionally after a YAML config file (see :mod:`xcft.train.args`).
The steps themselves live in :mod:`xcft.train`; this module only puts them in order.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from transformers import set_seed
from transformers.trainer_callback import ProgressCallback

from xcft.data.mixture import resolve_data
from xcft.errors import OutputFolderError
from xcft.model.loading import unwrap_model
from xcft.output_dir import FolderLock, OutputFolder, check_no_overlap, check_output_folder, save_errors
from xcft.run_files import (
    EXIT_SIGTERM,
    LOSS_PLOT_NAME,
    RESOLVED_CONFIG_NAME,
    TRAINER_STATE_NAME,
    earlier_results,
    resume_requested,
)
from xcft.train.args import TrainConfig, parse_train_args, print_help, write_resolved_config
from xcft.train.callbacks import EpochDrawCallback, JsonLogCallback, RecordOutputsCallback, SigtermCallback, progress_callback
from xcft.train.checkpoints import clear_staging, resolve_resume
from xcft.train.inputs import needs_vision_alignment, vision_aligned
from xcft.train.memory_plan import ALLOCATOR_CONF, check_memory_plan, default_allocator_settings
from xcft.train.plots import write_loss_plot
from xcft.train.setup import apply_host_settings, load_base_model, prepare_model_for_training
from xcft.train.stages import stage_setup

logger = logging.getLogger(__name__)


def train_command(argv: list[str]) -> int:
    """Entry point of ``xcft train``; returns the process exit status."""
    if any(a in ("-h", "--help") for a in argv):
        print_help()
        return 0
    if default_allocator_settings():  # before anything initialises CUDA
        logger.debug("PYTORCH_CUDA_ALLOC_CONF=%s (xcft's default)", ALLOCATOR_CONF)
    return run_training(parse_train_args(argv))


def run_training(cfg: TrainConfig) -> int:
    """One training run as configured; returns the process exit status (143 after SIGTERM).

    The output folder is checked, claimed and locked first (see :mod:`xcft.output_dir`), before
    anything expensive happens; the lock is held until the run ends.
    """
    existed = Path(cfg.training.output_dir).exists()
    folder, lock = prepare_output_dir(cfg)
    finished = False
    try:
        status = _run(cfg, folder)
        finished = True
        return status
    finally:
        if folder is not None:
            folder.record()
        if lock is not None:
            lock.release()
            if not finished and not existed:
                assert folder is not None  # a lock is only taken on a claimed folder
                folder.remove_if_unused()  # a run that stopped before writing anything leaves no folder behind


def _input_folders(cfg: TrainConfig) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """(model folders, data folders) the run reads: the output folder must keep clear of them."""
    assert cfg.model.model_name_or_path is not None, "parse_train_args requires --model_name_or_path"
    models = [("the base model folder of --model_name_or_path", Path(cfg.model.model_name_or_path))]
    if cfg.lora.lora_weight_path:
        models.append(("the adapter folder of --lora_weight_path", Path(cfg.lora.lora_weight_path)))
    if cfg.preference.ref_model_name_or_path:
        models.append(("the reference model folder of --ref_model_name_or_path", Path(cfg.preference.ref_model_name_or_path)))
    data: list[tuple[str, Path]] = []
    for flag, value in (("--data_path", cfg.data.data_path), ("--eval_data_path", cfg.data.eval_data_path)):
        if not value:
            continue
        spec, _ = resolve_data(value)  # problems are reported when the data is read
        if spec is None:
            continue
        folders = {spec.root} | {src.path.parent for src in spec.sources}
        data += [(f"the folder of a data file of {flag}", f) for f in sorted(folders)]
    return models, data


def prepare_output_dir(cfg: TrainConfig) -> tuple[OutputFolder | None, FolderLock | None]:
    """Apply the output-folder rules; returns the claimed folder and its lock (None on ranks that do not save).

    Refused: a non-empty folder xcft did not create; a folder equal to, inside or around the model
    folder, or equal to or around a data folder; a folder another run holds; a folder with an
    earlier run's checkpoints or result unless --resume_from_checkpoint or --overwrite_output_dir.
    """
    args = cfg.training
    out = Path(args.output_dir)
    models, data = _input_folders(cfg)
    check_no_overlap(out, models)
    check_no_overlap(out, data, allow_inside=True)
    check_output_folder(out)
    if not args.should_save:
        return None, None
    folder = OutputFolder.claim(out, "train")
    lock = FolderLock(out).acquire() if args.process_index == 0 else None
    try:
        resume = resume_requested(args.resume_from_checkpoint)
        overwrite = cfg.output.overwrite_output_dir
        if resume and overwrite:
            raise OutputFolderError(
                "--resume_from_checkpoint and --overwrite_output_dir true contradict each other: "
                "resume continues the earlier run, overwrite removes it; give one of them"
            )
        earlier = earlier_results(out)
        if earlier and not resume and lock is not None:
            if not overwrite:
                raise OutputFolderError(
                    f"--output_dir {out} holds an earlier run ({', '.join(earlier[:3])}{' ...' if len(earlier) > 3 else ''}); "
                    "continue it with --resume_from_checkpoint true, or start over with --overwrite_output_dir true "
                    "(removes only what xcft wrote there)"
                )
            removed = folder.remove_own()
            logger.info("--overwrite_output_dir: removed what xcft wrote in %s (%s)", out, ", ".join(removed))
        folder.check_writable([RESOLVED_CONFIG_NAME, LOSS_PLOT_NAME, TRAINER_STATE_NAME])
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return folder, lock


def _run(cfg: TrainConfig, folder: OutputFolder | None) -> int:
    args = cfg.training
    if cfg.logging_dir:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", cfg.logging_dir)
    set_seed(args.seed)
    plan = check_memory_plan(cfg)  # before any weight is loaded: a run that cannot fit stops here
    apply_host_settings(cfg)  # after the data is read: what reading freed goes back to the system

    # ---- model
    model, tokenizer = load_base_model(cfg)
    model = prepare_model_for_training(cfg, model, base_path=cfg.model.model_name_or_path)

    # ---- data (and what else the stage changes: a reward head, a reference)
    base_config = unwrap_model(model).config
    parts = stage_setup(cfg, model, tokenizer, files=plan.files)
    train_ds, eval_ds, collator = parts.train_dataset, parts.eval_dataset, parts.collator
    if needs_vision_alignment(args, model):
        collator = vision_aligned(collator, base_config, train_ds.pad_token_id)
        logger.info("batches without images get one blank image so all ranks run the vision tower in step (ZeRO/FSDP)")

    # ---- trainer
    sigterm = SigtermCallback()
    callbacks = [EpochDrawCallback(train_ds), sigterm, JsonLogCallback()]
    trainer = parts.trainer_class(
        model=parts.model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks + ([RecordOutputsCallback(folder)] if folder is not None else []),
        **parts.trainer_kwargs,
    )
    if not args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(progress_callback(cfg.output.progress_interval))
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if args.should_save:
        _write_resolved_config(cfg, folder)
    trainer.accelerator.wait_for_everyone()
    trainer.train(resume_from_checkpoint=resume)

    # ---- save
    out = Path(args.output_dir)
    if args.should_save:
        with save_errors(LOSS_PLOT_NAME, out):
            plot = write_loss_plot(trainer.state.log_history, out / LOSS_PLOT_NAME)
        if plot is not None:
            logger.info("loss curve written to %s", plot)
    if sigterm.received:
        logger.warning(
            "stopped by SIGTERM at step %s; the checkpoint is in %s. Continue with --resume_from_checkpoint true",
            sigterm.stopped_at,
            args.output_dir,
        )
        return EXIT_SIGTERM
    trainer.save_final(folder, adapter_base=cfg.model.model_name_or_path if cfg.model.use_lora else None)
    logger.info("finished: %s written to %s", "LoRA adapter" if cfg.model.use_lora else "model", args.output_dir)
    return 0


def _write_resolved_config(cfg: TrainConfig, folder: OutputFolder | None) -> None:
    """Clear an interrupted save and record the run's resolved options (main process)."""
    out = cfg.training.output_dir
    clear_staging(out)
    with save_errors(RESOLVED_CONFIG_NAME, out):
        path = write_resolved_config(cfg, out)
    logger.info("resolved configuration written to %s", path)
    if folder is not None:
        folder.record()

"""``xcft train``: parse -> model -> freeze / peft -> data -> Trainer -> save.

Accepts every flag of the official ``finetune.py`` and every Hugging Face ``TrainingArguments`` flag,
optionally after a YAML config file (see :mod:`xcft.train.args`).
The steps themselves live in :mod:`xcft.train`; this module only puts them in order.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from transformers import TrainerCallback, set_seed
from transformers.trainer_callback import ProgressCallback

from xcft.data.mixture import resolve_data
from xcft.errors import OutputFolderError
from xcft.model.loading import unwrap_model
from xcft.output_dir import FolderLock, OutputFolder, check_no_overlap, check_output_folder, save_errors
from xcft.train.args import RESOLVED_CONFIG_NAME, TrainConfig, parse_train_args, print_help, write_resolved_config
from xcft.train.datasets import build_datasets, needs_vision_alignment, vision_aligned
from xcft.train.memory_plan import ALLOCATOR_CONF, check_memory_plan, default_allocator_settings
from xcft.train.setup import apply_host_settings, load_base_model, prepare_model_for_training
from xcft.train.trainer import (
    STAGING_DIR_NAME,
    TRAINER_STATE_NAME,
    EpochDrawCallback,
    JsonLogCallback,
    LossProgressCallback,
    SigtermCallback,
    XcftTrainer,
    clear_staging,
    plot_loss,
    remaining_checkpoint,
    resolve_resume,
)

logger = logging.getLogger(__name__)

LOSS_PLOT_NAME = "loss.png"
EXIT_SIGTERM = 143  # 128 + SIGTERM: the conventional status of a process stopped by SIGTERM


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
        resume = str(args.resume_from_checkpoint or "").strip().lower() not in ("", "false", "no", "0", "none")
        overwrite = cfg.output.overwrite_output_dir
        if resume and overwrite:
            raise OutputFolderError(
                "--resume_from_checkpoint and --overwrite_output_dir true contradict each other: "
                "resume continues the earlier run, overwrite removes it; give one of them"
            )
        earlier = folder.previous_results()
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


class _RecordOutputs(TrainerCallback):
    """Keeps the output folder's manifest current, so a killed run's files are still known as xcft's."""

    def __init__(self, folder: OutputFolder) -> None:
        self.folder = folder

    def on_train_begin(self, args, state, control, **kwargs):
        self.folder.record()

    def on_save(self, args, state, control, **kwargs):
        self.folder.record()


def _run(cfg: TrainConfig, folder: OutputFolder | None) -> int:
    args = cfg.training
    if cfg.logging_dir:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", cfg.logging_dir)
    set_seed(args.seed)
    apply_host_settings(cfg)
    plan = check_memory_plan(cfg)  # before any weight is loaded: a run that cannot fit stops here

    # ---- model
    model, tokenizer = load_base_model(cfg)
    model = prepare_model_for_training(cfg, model, base_path=cfg.model.model_name_or_path)

    # ---- data
    base_config = unwrap_model(model).config
    train_ds, eval_ds, collator = build_datasets(cfg, tokenizer, base_config, files=plan.files)
    if needs_vision_alignment(args, model):
        collator = vision_aligned(collator, base_config, train_ds.pad_token_id)
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
        callbacks=[EpochDrawCallback(train_ds), sigterm, JsonLogCallback()]
        + ([_RecordOutputs(folder)] if folder is not None else []),
    )
    if not args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossProgressCallback)
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    out = Path(args.output_dir)
    if args.should_save:
        clear_staging(args.output_dir)
        with save_errors(RESOLVED_CONFIG_NAME, out):
            path = write_resolved_config(cfg, args.output_dir)
        logger.info("resolved configuration written to %s", path)
        if folder is not None:
            folder.record()
    trainer.accelerator.wait_for_everyone()
    trainer.train(resume_from_checkpoint=resume)

    # ---- save
    if args.should_save:
        with save_errors(LOSS_PLOT_NAME, out):
            plot = plot_loss(trainer.state.log_history, out / LOSS_PLOT_NAME)
        if plot is not None:
            logger.info("loss curve written to %s", plot)
    if sigterm.received:
        logger.warning(
            "stopped by SIGTERM at step %s; the checkpoint is in %s. Continue with --resume_from_checkpoint true",
            sigterm.stopped_at,
            args.output_dir,
        )
        return EXIT_SIGTERM
    # The final output is written to a staging folder and moved in once complete: a full disk
    # leaves the folder as it was, and a name someone else put there is never overwritten.
    staged = out / STAGING_DIR_NAME / "final"
    if args.should_save:
        shutil.rmtree(staged, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    with save_errors(
        "the final " + ("adapter" if cfg.model.use_lora else "model"),
        out,
        remains=lambda: remaining_checkpoint(out),
        cleanup=lambda: clear_staging(out),
    ):
        trainer.save_model(str(staged))
        if trainer.is_world_process_zero():
            trainer.state.save_to_json(str(staged / TRAINER_STATE_NAME))
        if args.should_save:
            _finish_output(cfg, staged)
        trainer.accelerator.wait_for_everyone()
        if args.should_save:
            (folder or OutputFolder(out, "train")).publish(staged)
            clear_staging(out)
    trainer.accelerator.wait_for_everyone()
    logger.info("finished: %s written to %s", "LoRA adapter" if cfg.model.use_lora else "model", args.output_dir)
    return 0


def _finish_output(cfg: TrainConfig, out: Path) -> None:
    """Check the saved output in ``out`` is what the docs promise (adapter names its base by absolute path)."""
    if cfg.model.use_lora:
        conf_path = out / "adapter_config.json"
        if conf_path.is_file():
            conf = json.loads(conf_path.read_text())
            assert cfg.model.model_name_or_path is not None, "parse_train_args requires --model_name_or_path"
            base = str(Path(cfg.model.model_name_or_path).resolve())
            if conf.get("base_model_name_or_path") != base:
                conf["base_model_name_or_path"] = base
                tmp = conf_path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(conf, indent=2, sort_keys=True))
                os.replace(tmp, conf_path)

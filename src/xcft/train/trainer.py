"""The Hugging Face Trainer as ``xcft train`` runs it: atomic checkpoints and an atomic final save.

A checkpoint is written into a staging folder and renamed to ``checkpoint-N`` only once every rank
has finished, so a kill during a save never leaves a half-written ``checkpoint-N`` that
``--resume_from_checkpoint true`` would pick; the final model or adapter is written the same way
(:meth:`XcftTrainer.save_final`). Freezing rules live in :mod:`xcft.train.setup`, checkpoint
selection and rotation in :mod:`xcft.train.checkpoints`, callbacks in :mod:`xcft.train.callbacks`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from xcft.data.packing import LengthGroupedSampler
from xcft.errors import OutputFolderError
from xcft.model.loading import write_model_code
from xcft.output_dir import OutputFolder, is_own_checkpoint, save_errors, write_marker
from xcft.run_files import STAGING_DIR_NAME, TRAINER_STATE_NAME, checkpoint_name
from xcft.train.checkpoints import clear_staging, remaining_checkpoint, remove_staged, rotate_own_checkpoints
from xcft.train.predict import AnswerEval

logger = logging.getLogger(__name__)

__all__ = ["XcftTrainer"]


class XcftTrainer(Trainer):
    """Trainer whose checkpoints appear atomically (staging folder + rename).

    ``supervised_head`` (default on): in training the output head runs only at supervised
    positions; the loss is the same and no [batch, length, vocab] logits tensor is made. It is a
    forward argument, so nothing about training ends up in the model's config.
    """

    def __init__(self, *args: Any, supervised_head: bool = True, answer_eval: AnswerEval | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._xcft_staging = False
        self.supervised_head = supervised_head
        self.answer_eval = answer_eval

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """The eval loss, and with ``answer_eval`` the answer metrics beside it (one log entry)."""
        output = super().evaluation_loop(*args, **kwargs)
        if self.answer_eval is not None and output.metrics is not None:
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            scores = self.answer_eval.run(self.accelerator.unwrap_model(self.model))
            output.metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
        return output

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self.supervised_head and model.training:
            inputs = {**inputs, "supervised_logits_only": True}
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save as Trainer does; a full model folder also gets our model code (self-contained folder)."""
        super()._save(output_dir, state_dict=state_dict)
        target = output_dir or self.args.output_dir
        assert target is not None, "TrainingArguments always has an output_dir"
        folder = Path(target)
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, "peft_config") and (folder / "config.json").is_file():
            write_model_code(folder)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """Length grouping from the dataset's own lengths (the stock sampler would decode every image to measure)."""
        ds = train_dataset if train_dataset is not None else self.train_dataset
        grouped = getattr(self.args, "train_sampling_strategy", None) == "group_by_length" or getattr(
            self.args, "group_by_length", False
        )
        if grouped and hasattr(ds, "lengths"):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(ds, self.args.train_batch_size * self.args.gradient_accumulation_steps, seed=seed)
        return super()._get_train_sampler(train_dataset)

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR_NAME) if self._xcft_staging else run_dir

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        run_dir = self._get_output_dir(trial)
        name = checkpoint_name(self.state.global_step)
        staging = os.path.join(run_dir, STAGING_DIR_NAME)
        if self.args.should_save or self.args.local_process_index == 0:
            shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self._xcft_staging = True
        try:
            with save_errors(
                name,
                staging,
                remains=lambda: remaining_checkpoint(run_dir),
                cleanup=lambda: remove_staged(staging, name),
            ):
                super()._save_checkpoint(model, trial)
                if self.args.local_process_index == 0 and os.path.isdir(os.path.join(staging, name)):
                    write_marker(os.path.join(staging, name), "train")  # last: the checkpoint is complete and xcft's
        finally:
            self._xcft_staging = False
        # Every rank has written its part (model shards, optimizer, its RNG state) before the rename.
        self.accelerator.wait_for_everyone()
        final = os.path.join(run_dir, name)
        if self.args.local_process_index == 0 and os.path.isdir(os.path.join(staging, name)):
            if os.path.exists(final) and not is_own_checkpoint(final):
                shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
                raise OutputFolderError(
                    f"{final} exists and was not written by xcft; it is left alone, so this run cannot save its "
                    "checkpoint there. Move it out of the output folder, then resume with --resume_from_checkpoint true"
                )
            if os.path.exists(final):  # a checkpoint of the same step from an earlier, abandoned run of ours
                old = final + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.replace(os.path.join(staging, name), final)
                os.utime(final)  # rotation sorts by mtime
            except FileNotFoundError:  # another node on a shared file system renamed it first
                pass
            with contextlib.suppress(OSError):
                os.rmdir(staging)
        if self.state.best_model_checkpoint and STAGING_DIR_NAME in self.state.best_model_checkpoint:
            self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(os.sep + STAGING_DIR_NAME, "")
        self.accelerator.wait_for_everyone()
        if self.args.should_save and limit:
            rotate_own_checkpoints(run_dir, limit, self.state.best_model_checkpoint)

    def save_final(self, folder: OutputFolder | None, *, adapter_base: str | None = None) -> None:
        """Write the final model (or adapter) and trainer state, then move them into the output folder at once.

        Everything goes to a staging folder first: a full disk leaves the folder as it was, and a
        name someone else put there is never overwritten. ``adapter_base``: the base model folder a
        LoRA adapter names (made absolute, so the adapter loads from any working directory).
        """
        assert self.args.output_dir is not None, "TrainingArguments always has an output_dir"
        out = Path(self.args.output_dir)
        staged = out / STAGING_DIR_NAME / "final"
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        what = "adapter" if adapter_base is not None else "model"
        with save_errors(f"the final {what}", out, remains=lambda: remaining_checkpoint(out), cleanup=lambda: clear_staging(out)):
            self.save_model(str(staged))
            if self.is_world_process_zero():
                self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
            if self.args.should_save and adapter_base is not None:
                _name_adapter_base(staged, adapter_base)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                (folder or OutputFolder(out, "train")).publish(staged)
                clear_staging(out)
        self.accelerator.wait_for_everyone()


def _name_adapter_base(folder: Path, base: str) -> None:
    """Make the saved adapter config name its base by absolute path (peft may have written it as given)."""
    conf_path = folder / "adapter_config.json"
    if not conf_path.is_file():
        return
    conf = json.loads(conf_path.read_text())
    absolute = str(Path(base).resolve())
    if conf.get("base_model_name_or_path") != absolute:
        conf["base_model_name_or_path"] = absolute
        tmp = conf_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(conf, indent=2, sort_keys=True))
        os.replace(tmp, conf_path)

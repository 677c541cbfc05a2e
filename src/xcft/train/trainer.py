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

from xcft.data.dataset import LOSS_GROUPS
from xcft.data.packing import LengthGroupedSampler
from xcft.errors import OutputFolderError
from xcft.model.loading import write_model_code
from xcft.output_dir import OutputFolder, is_own_checkpoint, save_errors, write_marker
from xcft.run_files import SOURCE_LOSS_PREFIX, STAGING_DIR_NAME, TRAINER_STATE_NAME, checkpoint_name
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

    def __init__(
        self,
        *args: Any,
        supervised_head: bool = True,
        answer_eval: AnswerEval | None = None,
        source_names: dict[str, list[str]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._xcft_staging = False
        self.supervised_head = supervised_head
        self.answer_eval = answer_eval
        self.source_names = source_names or {}
        # per split: summed token cross-entropy and target count of each source since the last log
        self._source_sums: dict[str, torch.Tensor] = {}

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """The eval loss, ``<prefix>_loss/<file>`` per data file of a mixture, and with ``answer_eval`` the answer metrics (one log entry)."""
        self._source_sums.pop("eval", None)
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        metrics = output.metrics if output.metrics is not None else {}
        for name, value in self.source_losses("eval").items():
            metrics[f"{prefix}_{SOURCE_LOSS_PREFIX}{name}"] = value
        if self.answer_eval is not None and output.metrics is not None:
            scores = self.answer_eval.run(self.accelerator.unwrap_model(self.model))
            output.metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
        return output

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """The loss; with a mixture of two or more files, each file's token losses are added up for :meth:`log`."""
        split = "train" if model.training else "eval"
        if len(self.source_names.get(split, [])) < 2:  # one source: its loss is the loss
            inputs = {k: v for k, v in inputs.items() if k != LOSS_GROUPS}
        if self.supervised_head and model.training:
            inputs = {**inputs, "supervised_logits_only": True}
        if LOSS_GROUPS not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        table = outputs.get("group_losses") if hasattr(outputs, "get") else None
        if table is not None:
            self._add_source_losses(split, table)
        return (loss, outputs) if return_outputs else loss

    def _add_source_losses(self, split: str, table: torch.Tensor) -> None:
        n = len(self.source_names[split])
        sums = self._source_sums.get(split)
        if sums is None:
            sums = self._source_sums[split] = torch.zeros(n, 2, dtype=torch.float64, device=table.device)
        k = min(n, table.shape[0])
        sums[:k] += table[:k].detach().to(sums)

    def source_losses(self, split: str) -> dict[str, float]:
        """Mean token loss of each source since the last call (summed over ranks; every rank must call it)."""
        names = self.source_names.get(split, [])
        if len(names) < 2:
            return {}
        sums = self._source_sums.pop(split, None)
        if sums is None:
            sums = torch.zeros(len(names), 2, dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = sums.to(self.args.device)
            torch.distributed.all_reduce(sums)
        return {name: float(s / c) for name, (s, c) in zip(names, sums.tolist()) if c > 0}

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training logs get ``loss/<file>`` per data file of a mixture (mean token loss since the last log)."""
        if "loss" in logs:
            logs = {**logs, **{f"{SOURCE_LOSS_PREFIX}{name}": round(v, 4) for name, v in self.source_losses("train").items()}}
        super().log(logs, *args, **kwargs)

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

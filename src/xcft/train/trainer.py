"""The pieces ``xcft train`` adds to the Hugging Face Trainer.

* :func:`configure_trainable` — the official freezing rules (fix_vit, fix_sampler, use_lora).
* :class:`XcftTrainer` — atomic checkpoints: a checkpoint is written into a staging folder and
  renamed to ``checkpoint-N`` only once every rank has finished, so a kill during a save never
  leaves a half-written ``checkpoint-N`` that ``--resume_from_checkpoint true`` would pick.
* Callbacks: the per-epoch data.txt draw, SIGTERM -> save and stop, a progress bar with loss,
  a JSON Lines log of progress and logged values (``trainer_log.jsonl``) that other processes can follow.
* :func:`find_last_checkpoint`, :func:`plot_loss`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from xcft.data.packing import LengthGroupedSampler
from xcft.errors import OutputFolderError, XcftError
from xcft.model.loading import write_model_code
from xcft.output_dir import is_own_checkpoint, own_checkpoints, save_errors, write_marker

logger = logging.getLogger(__name__)

STAGING_DIR_NAME = ".xcft-staging"
TRAINER_LOG_NAME = "trainer_log.jsonl"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"


# --------------------------------------------------------------------------- trainable parameters


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
    lora=None,
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
            bias=lora.lora_bias,
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


# --------------------------------------------------------------------------- checkpoints


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint folder is complete when it has its final name and the trainer state in it."""
    p = Path(path)
    return p.is_dir() and _CHECKPOINT_RE.match(p.name) is not None and (p / TRAINER_STATE_NAME).is_file()


def find_last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete ``checkpoint-N`` xcft wrote with the largest N in ``output_dir`` (staging folders never count)."""
    found = [c for c in own_checkpoints(output_dir) if is_complete_checkpoint(c)]
    return str(found[-1]) if found else None


def remaining_checkpoint(output_dir: str | os.PathLike) -> str:
    """What a failed save leaves intact, for its error line."""
    last = find_last_checkpoint(output_dir)
    if last is None:
        return "no complete checkpoint was written before"
    return f"the last complete checkpoint, {last}, is intact (continue with --resume_from_checkpoint true)"


def rotate_own_checkpoints(output_dir: str | os.PathLike, limit: int, best: str | None = None) -> list[Path]:
    """Delete the oldest checkpoints xcft wrote beyond ``limit`` (the best one is kept); returns the deleted ones.

    Only folders that carry xcft's marker count: a ``checkpoint-N`` someone else put there is never deleted.
    """
    found = own_checkpoints(output_dir)
    if best is not None:
        best_path = Path(best).resolve()
        keep_best = [c for c in found if c.resolve() == best_path]
        if keep_best:
            if limit == 1 and found[-1] != keep_best[0]:
                limit = 2  # keep the best and the latest (so that training can resume)
            found = [c for c in found if c not in keep_best] + keep_best
    doomed = found[: max(0, len(found) - limit)]
    for path in doomed:
        logger.info("deleting older checkpoint %s (save_total_limit %d)", path, limit)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """Turn ``--resume_from_checkpoint`` (a path, ``true`` or ``false``) into a checkpoint path or None."""
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() in ("", "false", "no", "0", "none"):
        return None
    if text.lower() in ("true", "yes", "1", "latest"):
        last = find_last_checkpoint(output_dir)
        if last is None:
            logger.info("--resume_from_checkpoint true: no complete checkpoint in %s yet, starting from scratch", output_dir)
        else:
            logger.info("resuming from %s", last)
        return last
    if not Path(text).is_dir():
        raise XcftError(f"--resume_from_checkpoint {text}: no such folder; pass a checkpoint-N folder or 'true' for the latest")
    if not is_complete_checkpoint(text):
        raise XcftError(
            f"--resume_from_checkpoint {text} is not a complete checkpoint (a checkpoint-N folder with {TRAINER_STATE_NAME}); "
            "pass 'true' to pick the latest complete one"
        )
    return text


def clear_staging(output_dir: str | os.PathLike) -> None:
    """Remove half-written checkpoints left by a process killed during a save."""
    staging = Path(output_dir) / STAGING_DIR_NAME
    if staging.exists():
        if any(staging.iterdir()):
            logger.info("removing the unfinished save(s) in %s (a run was stopped while saving)", staging)
        shutil.rmtree(staging, ignore_errors=True)


def _remove_staging(staging: str | os.PathLike, name: str) -> None:
    """Remove a half-written checkpoint (freeing its space) and the staging folder when nothing else is in it."""
    shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(staging)


class XcftTrainer(Trainer):
    """Trainer whose checkpoints appear atomically (staging folder + rename).

    ``supervised_head`` (default on): in training the output head runs only at supervised
    positions; the loss is the same and no [batch, length, vocab] logits tensor is made. It is a
    forward argument, so nothing about training ends up in the model's config.
    """

    def __init__(self, *args: Any, supervised_head: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._xcft_staging = False
        self.supervised_head = supervised_head

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
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
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
                cleanup=lambda: _remove_staging(staging, name),
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


# --------------------------------------------------------------------------- callbacks


class EpochDrawCallback(TrainerCallback):
    """Redraws the data.txt mixture at each epoch start: ``dataset.set_epoch(epoch)``.

    The draw is a pure function of (seed, epoch), so every rank and a resumed run see the same samples.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = math.floor((state.epoch or 0.0) + 1e-6)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class SigtermCallback(TrainerCallback):
    """On SIGTERM: finish the current step, save a checkpoint on every rank, stop.

    The flag is all-reduced each step, so a signal that reached one rank stops them all at the same step.
    A second SIGTERM falls back to the previous handler (normally: exit at once).
    """

    def __init__(self) -> None:
        self.received = False
        self.stopped_at: int | None = None
        self._previous: Any = None

    def _handler(self, signum, frame):
        if self.received:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.received = True
        logger.warning("SIGTERM received: saving a checkpoint after this step, then stopping")

    def on_train_begin(self, args, state, control, **kwargs):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _any_rank_received(self, args) -> bool:
        flag = self.received
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=args.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received(args):
            self.received = True
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


class LossProgressCallback(ProgressCallback):
    """The standard progress bar (steps, rate, ETA) with the latest loss and learning rate on it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        post = {}
        if "loss" in logs:
            post["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            post["lr"] = f"{logs['learning_rate']:.2e}"
        if "eval_loss" in logs:
            post["eval_loss"] = f"{logs['eval_loss']:.4f}"
            self.training_bar.write(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")
        if post:
            self.training_bar.set_postfix(post, refresh=True)
        if "train_runtime" in logs:
            self.training_bar.write(
                f"done: {logs.get('train_runtime', 0):.1f} s, mean train loss {logs.get('train_loss', float('nan')):.4f}"
            )


class JsonLogCallback(TrainerCallback):
    """Appends one JSON object per line to ``output_dir/trainer_log.jsonl`` (main process only).

    Lines: ``{"event": "begin"|"step"|"log"|"end", "step", "max_steps", "epoch", "time"}``, log lines
    with every logged value (loss, eval_loss, learning_rate, ...). A monitor in another process (the
    web UI) follows training through it, also after a restart; a resumed run appends, so a reader keeps
    the last value per step. Each line is flushed at once.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._first_step: int = 0

    def _write(self, args, state, event: str, values: dict[str, Any] | None = None) -> None:
        if not state.is_world_process_zero:
            return
        now = time.time()
        record: dict[str, Any] = {
            "event": event,
            "step": int(state.global_step),
            "max_steps": int(state.max_steps or 0),
            "epoch": state.epoch,
            "time": round(now, 3),
        }
        if self._start is not None and state.global_step > self._first_step:
            elapsed = now - self._start
            per_step = elapsed / (state.global_step - self._first_step)
            record["eta_s"] = round(max(0, (state.max_steps or 0) - state.global_step) * per_step, 1)
        for key, value in (values or {}).items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                record[key] = value
        path = Path(args.output_dir) / TRAINER_LOG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.time()
        self._first_step = int(state.global_step)
        self._write(args, state, "begin")

    def on_step_end(self, args, state, control, **kwargs):
        self._write(args, state, "step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._write(args, state, "log", logs)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args, state, "end")


# --------------------------------------------------------------------------- loss curve


def plot_loss(log_history: list[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Write the training (and eval) loss curve as a PNG; None when nothing was logged."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return None
    import matplotlib  # lazy: plotting is optional and slow to import

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1.2)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out

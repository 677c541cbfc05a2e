"""The callbacks ``xcft train`` adds to the Hugging Face Trainer.

* :class:`EpochDrawCallback` — the per-epoch data.txt draw.
* :class:`SigtermCallback` — SIGTERM: save a checkpoint after the step, then stop (every rank).
* :class:`LossProgressCallback` — the progress bar with the latest loss (on a terminal);
  :class:`LineProgressCallback` — a progress line every N seconds (logs that are files).
* :class:`JsonLogCallback` — ``trainer_log.jsonl`` (:mod:`xcft.run_files`), for other processes.
* :class:`RecordOutputsCallback` — keeps the output folder's manifest current.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from xcft.output_dir import OutputFolder
from xcft.run_files import SOURCE_LOSS_PREFIX, TRAINER_LOG_NAME, trainer_log_record

logger = logging.getLogger(__name__)

__all__ = [
    "EpochDrawCallback",
    "JsonLogCallback",
    "LineProgressCallback",
    "LossProgressCallback",
    "RecordOutputsCallback",
    "SigtermCallback",
    "progress_callback",
]


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


def _source_losses(logs: dict[str, Any]) -> str:
    """A mixture's per-file losses of a log, as ``file loss`` pairs (empty for one file)."""
    return ", ".join(f"{k[len(SOURCE_LOSS_PREFIX) :]} {v:.4f}" for k, v in logs.items() if k.startswith(SOURCE_LOSS_PREFIX))


def _eval_source_losses(logs: dict[str, Any]) -> str:
    key = "eval_" + SOURCE_LOSS_PREFIX
    return ", ".join(f"{k[len(key) :]} {v:.4f}" for k, v in logs.items() if k.startswith(key))


def progress_callback(interval_s: float) -> TrainerCallback | type[TrainerCallback]:
    """A redrawn progress bar on a terminal; one progress line every ``interval_s`` seconds otherwise."""
    if sys.stderr.isatty():
        return LossProgressCallback
    return LineProgressCallback(interval_s)


class LineProgressCallback(TrainerCallback):
    """Progress as log lines for logs that are files: a line every ``interval_s`` seconds (and at every eval and the end).

    A line: ``step 120/1000 (12%) | loss 1.2345 | lr 1.00e-05 | 0.84 s/step | 12m20s left``, the
    per-file losses of a mixture after it. Carriage-return bars would write a line per redraw.
    """

    def __init__(self, interval_s: float = 30.0) -> None:
        self.interval_s = float(interval_s)
        self._start = 0.0
        self._first_step = 0
        self._last_line = 0.0
        self._latest: dict[str, Any] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = self._last_line = time.monotonic()
        self._first_step = int(state.global_step)

    def _line(self, state) -> str:
        step, total = int(state.global_step), int(state.max_steps or 0)
        parts = [f"step {step}/{total}" + (f" ({100 * step // total}%)" if total else "")]
        if "loss" in self._latest:
            parts.append(f"loss {self._latest['loss']:.4f}")
        if "learning_rate" in self._latest:
            parts.append(f"lr {self._latest['learning_rate']:.2e}")
        done = step - self._first_step
        if done > 0:
            per_step = (time.monotonic() - self._start) / done
            parts.append(f"{per_step:.2f} s/step")
            if total > step:
                left = int(per_step * (total - step))
                parts.append(f"{left // 60}m{left % 60:02d}s left")
        sources = _source_losses(self._latest)
        return " | ".join(parts) + (f" | per file: {sources}" if sources else "")

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and time.monotonic() - self._last_line >= self.interval_s:
            self._last_line = time.monotonic()
            logger.info("%s", self._line(state))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self._latest = dict(logs)
        if "eval_loss" in logs:
            sources = _eval_source_losses(logs)
            logger.info(
                "step %d: eval_loss %.4f%s", state.global_step, logs["eval_loss"], f" (per file: {sources})" if sources else ""
            )
        if "train_runtime" in logs:
            logger.info("%s", self._line(state))
            logger.info("done: %.1f s, mean train loss %.4f", logs.get("train_runtime", 0), logs.get("train_loss", float("nan")))


class LossProgressCallback(ProgressCallback):
    """The standard progress bar (steps, rate, ETA) with the latest loss and learning rate on it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        sources = _source_losses(logs)
        if sources:
            self.training_bar.write(f"step {state.global_step}: loss per file: {sources}")
        post = {}
        if "loss" in logs:
            post["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            post["lr"] = f"{logs['learning_rate']:.2e}"
        if "eval_loss" in logs:
            post["eval_loss"] = f"{logs['eval_loss']:.4f}"
            eval_sources = _eval_source_losses(logs)
            self.training_bar.write(
                f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}"
                + (f" (per file: {eval_sources})" if eval_sources else "")
            )
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
        extra: dict[str, Any] = dict(values or {})
        if self._start is not None and state.global_step > self._first_step:
            per_step = (now - self._start) / (state.global_step - self._first_step)
            extra["eta_s"] = round(max(0, (state.max_steps or 0) - state.global_step) * per_step, 1)
        line = trainer_log_record(event, state.global_step, state.max_steps or 0, state.epoch, now, extra)
        path = Path(args.output_dir) / TRAINER_LOG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)

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


class RecordOutputsCallback(TrainerCallback):
    """Keeps the output folder's manifest current, so a killed run's files are still known as xcft's."""

    def __init__(self, folder: OutputFolder) -> None:
        self.folder = folder

    def on_train_begin(self, args, state, control, **kwargs):
        self.folder.record()

    def on_save(self, args, state, control, **kwargs):
        self.folder.record()

"""The files xcft's commands leave for other processes to read: names, formats and readers.

A training run's output folder holds ``checkpoint-N`` folders (complete once they carry the trainer
state and xcft's marker), ``trainer_log.jsonl`` (progress and logged values, one JSON object per
line, appended while training runs), ``trainer_state.json`` and ``loss.png`` once it finished;
``xcft train`` exits with :data:`EXIT_SIGTERM` after a SIGTERM stop. A merged model folder holds
``merge_check.json``, the result of merge's verification. ``xcft train``, the trainer, the web page
and the demo all read and write these through this module, so they cannot disagree.

Standard library only (it sits below every other layer, beside :mod:`xcft.output_dir`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xcft.options import FALSE_WORDS, TRUE_WORDS
from xcft.output_dir import CHECKPOINT_PREFIX, CHECKPOINT_RE, OWN_PREFIX, own_checkpoints, own_entries

#: JSON Lines log of a run's progress (written by the trainer's JsonLogCallback, main process only).
TRAINER_LOG_NAME = "trainer_log.jsonl"
#: Hugging Face's trainer state: inside every checkpoint (it makes one complete) and in a finished output.
TRAINER_STATE_NAME = "trainer_state.json"
#: A data mixture's per-file losses in the training logs: ``loss/<file>`` and ``eval_loss/<file>``.
SOURCE_LOSS_PREFIX = "loss/"
#: The pair metrics of the preference stages drawn beside the loss (TRL's names; ``--stage rm`` logs ``accuracy``).
PAIR_CURVE_KEYS = ("rewards/accuracies", "rewards/margins", "accuracy")
#: The training loss curve of a finished (or stopped) run.
LOSS_PLOT_NAME = "loss.png"
#: The run's options after flags and YAML were merged (what ``xcft train <that file>`` repeats).
RESOLVED_CONFIG_NAME = "train_config.yaml"
#: Where checkpoints and the final output are written before they are renamed into place.
STAGING_DIR_NAME = f"{OWN_PREFIX}-staging"
#: 128 + SIGTERM: the exit status of ``xcft train`` stopped by SIGTERM after saving a checkpoint.
EXIT_SIGTERM = 143
#: The verification result of ``xcft merge``, in the merged model folder.
MERGE_CHECK_NAME = "merge_check.json"
#: ``--resume_from_checkpoint`` words that pick the latest complete checkpoint.
RESUME_LATEST_WORDS = (*TRUE_WORDS, "latest")

__all__ = [
    "CHECKPOINT_PREFIX",
    "CHECKPOINT_RE",
    "EXIT_SIGTERM",
    "LOSS_PLOT_NAME",
    "MERGE_CHECK_NAME",
    "PAIR_CURVE_KEYS",
    "RESOLVED_CONFIG_NAME",
    "SOURCE_LOSS_PREFIX",
    "STAGING_DIR_NAME",
    "TRAINER_LOG_NAME",
    "TRAINER_STATE_NAME",
    "MergeCheck",
    "TrainerProgress",
    "checkpoint_name",
    "complete_checkpoints",
    "earlier_results",
    "find_last_checkpoint",
    "follow_trainer_log",
    "is_complete_checkpoint",
    "is_pair_metric",
    "is_source_loss",
    "read_merge_check",
    "resume_requested",
    "trainer_log_record",
    "write_merge_check",
]


# --------------------------------------------------------------------------- checkpoints


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at optimizer step ``step``."""
    return f"{CHECKPOINT_PREFIX}-{int(step)}"


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint folder is complete when it has its final name and the trainer state in it."""
    p = Path(path)
    return p.is_dir() and CHECKPOINT_RE.match(p.name) is not None and (p / TRAINER_STATE_NAME).is_file()


def complete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The complete checkpoints xcft wrote in ``folder``, oldest (smallest step) first.

    This is what ``--resume_from_checkpoint true`` chooses from (the last one): a ``checkpoint-N``
    someone else put there, or one still being written, never counts.
    """
    return [c for c in own_checkpoints(folder) if is_complete_checkpoint(c)]


def find_last_checkpoint(folder: str | os.PathLike) -> str | None:
    """The complete checkpoint xcft wrote with the largest step (what resume continues from), or None."""
    found = complete_checkpoints(folder)
    return str(found[-1]) if found else None


def earlier_results(folder: str | os.PathLike) -> list[str]:
    """Names of an earlier run's results in ``folder``: xcft's checkpoints and a finished run's trainer state."""
    own = own_entries(folder)
    found = [c.name for c in own_checkpoints(folder)]
    return found + sorted(n for n in own if n == TRAINER_STATE_NAME)


def resume_requested(value: Any) -> bool:
    """Whether a ``--resume_from_checkpoint`` value asks to resume (a path or true/latest; not false/empty)."""
    text = "" if value is None else str(value).strip().lower()
    return text not in ("", "none", *FALSE_WORDS)


# --------------------------------------------------------------------------- trainer_log.jsonl


@dataclass
class TrainerProgress:
    """What ``trainer_log.jsonl`` says so far; :func:`follow_trainer_log` brings it up to date.

    ``loss`` / ``eval_loss`` map the step to the last value logged for it (a resumed run redoes
    the steps after its checkpoint, so values past a ``begin`` line's step are dropped).
    ``offset`` is how many bytes of the file were read (only whole lines).
    """

    step: int = 0
    max_steps: int = 0
    eta_s: float | None = None
    loss: dict[int, float] = field(default_factory=dict)
    eval_loss: dict[int, float] = field(default_factory=dict)
    # a mixture's per-file curves: "loss/<file>" and "eval_loss/<file>" -> {step: value}
    sources: dict[str, dict[int, float]] = field(default_factory=dict)
    # the preference stages' pair metrics (PAIR_CURVE_KEYS, and their eval_ values) -> {step: value}
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)
    offset: int = 0

    def add(self, record: dict[str, Any]) -> None:
        """Take one log line (as written by the trainer's JsonLogCallback)."""
        step = int(record.get("step", 0))
        begin = record.get("event") == "begin"
        if begin:
            self.loss = {s: v for s, v in self.loss.items() if s <= step}
            self.eval_loss = {s: v for s, v in self.eval_loss.items() if s <= step}
            self.sources = {k: {s: v for s, v in c.items() if s <= step} for k, c in self.sources.items()}
            self.metrics = {k: {s: v for s, v in c.items() if s <= step} for k, c in self.metrics.items()}
        self.step = step
        self.max_steps = int(record.get("max_steps") or self.max_steps)
        self.eta_s = record.get("eta_s", None if begin else self.eta_s)
        for key, values in (("loss", self.loss), ("eval_loss", self.eval_loss)):
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[step] = float(value)
        for key, value in record.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if is_source_loss(key):
                self.sources.setdefault(key, {})[step] = float(value)
            elif is_pair_metric(key):
                self.metrics.setdefault(key, {})[step] = float(value)

    def points(self, key: str = "loss") -> list[tuple[int, float]]:
        """``(step, value)`` pairs of ``loss``, ``eval_loss``, a per-file key (``loss/<file>``) or a pair metric, by step."""
        if key in ("loss", "eval_loss"):
            return sorted((self.loss if key == "loss" else self.eval_loss).items())
        return sorted((self.metrics if is_pair_metric(key) else self.sources).get(key, {}).items())


def is_pair_metric(key: str) -> bool:
    """A preference stage's pair metric that the curves show (``rewards/accuracies``, ``eval_rewards/margins``, ...)."""
    return key.removeprefix("eval_") in PAIR_CURVE_KEYS


def is_source_loss(key: str) -> bool:
    """A per-file loss key of the training logs (``loss/<file>``, ``eval_loss/<file>``)."""
    return key.startswith(SOURCE_LOSS_PREFIX) or key.startswith("eval_" + SOURCE_LOSS_PREFIX)


def follow_trainer_log(folder: str | os.PathLike, progress: TrainerProgress | None = None) -> TrainerProgress:
    """Read the whole lines added to ``folder/trainer_log.jsonl`` since ``progress`` (all of it when None).

    A half-written last line is left for the next call; a file that shrank (a new run) is read from
    the start. Lines that are not JSON objects are skipped.
    """
    progress = progress if progress is not None else TrainerProgress()
    path = Path(folder) / TRAINER_LOG_NAME
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    if size < progress.offset:
        progress = TrainerProgress()
    if size > progress.offset:
        with open(path, "rb") as f:
            f.seek(progress.offset)
            chunk = f.read(size - progress.offset)
        end = chunk.rfind(b"\n") + 1
        progress.offset += end
        for line in chunk[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                progress.add(record)
    return progress


def trainer_log_record(
    event: str, step: int, max_steps: int, epoch: float | None, now: float, values: dict[str, Any] | None = None
) -> str:
    """One line of ``trainer_log.jsonl``: the event and progress, then ``values`` (plain values only; others are left out).

    Events: ``begin``, ``step``, ``log`` (with every logged value: loss, eval_loss, learning_rate,
    eta_s ...) and ``end``.
    """
    record: dict[str, Any] = {
        "event": event,
        "step": int(step),
        "max_steps": int(max_steps),
        "epoch": epoch,
        "time": round(now, 3),
    }
    for key, value in (values or {}).items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            record[key] = value
    return json.dumps(record) + "\n"


# --------------------------------------------------------------------------- merge_check.json


@dataclass(frozen=True)
class MergeCheck:
    """merge's verification: the merged folder reloaded from disk against base + adapter on one probe batch."""

    max_abs_logit_diff: float
    tolerance: float
    probe_tokens: int
    probe_images: int
    positions: int
    adapter: str
    base: str

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance

    def line(self) -> str:
        """The one line ``xcft merge`` prints."""
        return (
            f"probe: {self.probe_tokens} tokens, {self.probe_images} image(s); max abs logit diff merged vs adapter: "
            f"{self.max_abs_logit_diff:.3e} (tolerance {self.tolerance:.1e})"
        )


def write_merge_check(folder: str | os.PathLike, check: MergeCheck) -> Path:
    """Write ``folder/merge_check.json`` (temp name, then rename)."""
    path = Path(folder) / MERGE_CHECK_NAME
    tmp = path.with_name(f"{OWN_PREFIX}-{MERGE_CHECK_NAME}.tmp")
    tmp.write_text(json.dumps({**asdict(check), "ok": check.ok}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_merge_check(folder: str | os.PathLike) -> MergeCheck | None:
    """The merge result recorded in a merged model folder, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((Path(folder) / MERGE_CHECK_NAME).read_text(encoding="utf-8"))
        names = MergeCheck.__dataclass_fields__
        return MergeCheck(**{k: data[k] for k in names})
    except (OSError, ValueError, KeyError, TypeError):
        return None

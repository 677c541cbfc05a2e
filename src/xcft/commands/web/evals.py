"""The Eval tab's runs: ``xcft predict`` of one or two models on a data set, as child processes, all through files.

A run lives in ``WORKDIR/evals/<id>/``: ``run.json`` (the data set, the models, the settings, the
number of samples to predict, and the ``xcft predict`` command of each model), the runner's log,
pid files and exit status (:class:`~xcft.commands.web.runs.ChildRuns`), and one prediction file
per model (``model-1.jsonl``, ``model-2.jsonl``). Progress is the prediction files' complete lines
against the number of samples; the scores are ``xcft score``'s, computed from the same files
(:func:`xcft.commands.score.score_files`). Stop ends the running ``xcft predict``; Continue starts
the commands again, and ``xcft predict`` skips the samples its file already holds.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcft.commands.chat import check_model_folder
from xcft.commands.options import PredictOptions
from xcft.commands.score import score_files
from xcft.commands.web.runner import xcft_command_line
from xcft.commands.web.runs import ChildRuns
from xcft.data.check import load_settings
from xcft.data.schema import Problem
from xcft.data.sizes import folder_sizes
from xcft.errors import DataError, XcftError
from xcft.model.loading import adapter_base_path, is_adapter_folder
from xcft.model.template_xcomposer2 import PROMPT_LAYOUTS
from xcft.train.answer_metrics import Comparison, Scores, parse_metrics
from xcft.train.predict import NOT_PREDICTED, PromptSample, prompt_samples_for

__all__ = [
    "EVALS_DIR",
    "MAX_MODELS",
    "EvalRuns",
    "EvalSettings",
    "EvalStatus",
    "predict_option",
    "prediction_name",
    "read_data",
]

EVALS_DIR = "evals"
MAX_MODELS = 2


def prediction_name(k: int) -> str:
    """The prediction file of the run's ``k``-th model (from 0)."""
    return f"model-{k + 1}.jsonl"


def predict_option(name: str) -> dataclasses.Field:
    """A field of ``xcft predict``'s options (its default and help text are the page's)."""
    return {f.name: f for f in dataclasses.fields(PredictOptions)}[name]


def _predict_default(name: str) -> Any:
    return predict_option(name).default


@dataclass(frozen=True)
class EvalSettings:
    """What a run predicts and how: the page's fields, as ``xcft predict`` takes them."""

    data: str
    models: tuple[str, ...]
    max_new_tokens: int = _predict_default("max_new_tokens")
    batch_size: int = _predict_default("batch_size")
    metrics: str = ""  # "" : xcft score's default set
    layout: str | None = None  # None: the one the model folder records
    limit: int | None = None

    def checked(self) -> EvalSettings:
        """The settings with paths made absolute; an XcftError naming the first wrong field."""
        data = (self.data or "").strip()
        if not data:
            raise XcftError("no data file: enter a data.txt or a .json/.jsonl file")
        models = tuple(m.strip() for m in self.models if (m or "").strip())
        if not models:
            raise XcftError("no model: enter a model folder (a second one to compare is optional)")
        if len(models) > MAX_MODELS:
            raise XcftError(f"at most {MAX_MODELS} models")
        for m in models:
            check_model_folder(m)
        if int(self.max_new_tokens) < 1:
            raise XcftError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if int(self.batch_size) < 1:
            raise XcftError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.limit is not None and int(self.limit) < 1:
            raise XcftError(f"--limit must be at least 1, got {self.limit} (leave it empty for every sample)")
        layout = self.layout or None
        if layout is not None and layout not in PROMPT_LAYOUTS:
            raise XcftError(f"unknown prompt layout {layout!r}; choose from {', '.join(PROMPT_LAYOUTS)}")
        metrics = ",".join(parse_metrics(self.metrics)) if (self.metrics or "").strip() else ""
        return EvalSettings(
            str(Path(data).expanduser().resolve()),
            tuple(str(Path(m).expanduser().resolve()) for m in models),
            int(self.max_new_tokens),
            int(self.batch_size),
            metrics,
            layout,
            None if self.limit is None else int(self.limit),
        )

    def predict_argv(self, model: str, output: Path, device: str | None) -> list[str]:
        """``xcft predict``'s arguments for one model."""
        argv = [self.data, "--model", model, "--output", str(output)]
        argv += ["--max-new-tokens", str(self.max_new_tokens), "--batch-size", str(self.batch_size)]
        if self.layout:
            argv += ["--layout", self.layout]
        if self.limit is not None:
            argv += ["--limit", str(self.limit)]
        if device:
            argv += ["--device", device]
        return argv


@dataclass
class EvalStatus:
    """What the page shows about an eval run."""

    run_id: str
    state: str  # starting, running, finished, stopped, failed, ended
    message: str
    settings: EvalSettings
    total: int  # samples each model answers
    done: list[int] = field(default_factory=list)  # predictions written, per model
    skipped: int = 0  # samples of the data left out (named when the run started, and in the log)

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running")

    @property
    def complete(self) -> bool:
        return all(d >= self.total for d in self.done)

    @property
    def can_continue(self) -> bool:
        """Ended before every model answered every sample; ``xcft predict`` goes on from its files."""
        return not self.active and not self.complete and self.state != "finished"


def read_data(data: str, model_dir: str) -> tuple[list[PromptSample], list[Problem]]:
    """The samples ``xcft predict --model model_dir`` asks, read with the model's tokenizer and sizes (an
    adapter: its base's) through the preprocessing cache, as predict reads them, without loading the model."""
    folder = adapter_base_path(model_dir) if is_adapter_folder(model_dir) else Path(model_dir)
    tokenizer = load_settings(folder, None, None).tokenizer
    return prompt_samples_for(data, folder_sizes(folder), tokenizer)


def _complete_lines(path: Path) -> int:
    """Lines of a prediction file that end with their newline (the one being written is not counted)."""
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


class EvalRuns(ChildRuns):
    """The eval runs under one work folder (one instance per server).

    ``command``: the program each model's run executes (default: ``xcft predict``); ``device`` is
    passed on as ``--device`` (the server's ``--device``).
    """

    def __init__(self, workdir: str | Path, device: str | None = None, command: list[str] | None = None) -> None:
        super().__init__(Path(workdir) / EVALS_DIR)
        self.device = device
        self.command = list(command) if command else xcft_command_line("predict", [])
        self._results: dict[str, tuple[Any, Scores | Comparison]] = {}  # per run: (files' sizes, scores)
        # per (data, model): the data file's mtime and its samples
        self._samples: dict[tuple[str, str], tuple[Any, dict[tuple[str, str], PromptSample]]] = {}

    def start(self, settings: EvalSettings) -> tuple[str, list[Problem]]:
        """Check the settings and the data, start the predictions; (run id, the data's problems)."""
        settings = settings.checked()
        samples, problems = read_data(settings.data, settings.models[0])
        if settings.limit is not None:
            samples = samples[: settings.limit]
        if not samples:
            raise DataError(f"{settings.data}: no sample to predict")
        names = [Path(settings.data).stem, *(Path(m).name for m in settings.models)]
        run_id = self._reserve(re.sub(r"-+", "-", "-".join(names)))
        run_dir = (self.root / run_id).resolve()
        record = dict(
            output_dir=str(run_dir),  # the command lines name it: a process alive with it is this run's
            settings=dataclasses.asdict(settings),
            total=len(samples),
            skipped=sum(1 for p in problems if p.level == "error"),
            steps=[
                [*self.command, *settings.predict_argv(m, run_dir / prediction_name(k), self.device)]
                for k, m in enumerate(settings.models)
            ],
            keep_going=True,  # a model whose predict names a bad sample does not stop the next model's
        )
        self._create(run_id, record)
        self._launch(run_id)
        return run_id, problems

    def settings(self, run_id: str) -> EvalSettings:
        raw = dict(self._record(run_id)["settings"])
        return EvalSettings(**{**raw, "models": tuple(raw["models"])})

    def prediction_files(self, run_id: str) -> list[Path]:
        return [self.root / run_id / prediction_name(k) for k in range(len(self.settings(run_id).models))]

    def status(self, run_id: str) -> EvalStatus:
        record = self._record(run_id)
        ps = self.process_state(run_id)
        total = int(record["total"])
        done = [_complete_lines(p) for p in self.prediction_files(run_id)]
        st = EvalStatus(run_id, ps.state, ps.message, self.settings(run_id), total, done, int(record.get("skipped", 0)))
        n = len(done)
        current = next((k for k, d in enumerate(done) if d < total), n - 1)
        if ps.state == "ending":
            st.state = "running"
        if st.state == "running":
            st.message = f"model {current + 1} of {n} answering: {done[current]} / {total}"
        elif ps.state == "starting":
            st.message = "starting xcft predict ..."
        elif ps.state == "finished":
            st.message = "finished: every model answered every sample"
        elif ps.state == "stopped":
            st.message = f"stopped at model {current + 1} of {n}, {done[current]} / {total}; Continue goes on from there"
        elif ps.state == "failed" and ps.exit_code == 1 and self.last_output_line(run_id).endswith(NOT_PREDICTED) and all(done):
            # xcft predict answered every sample it could, named the others and exited 1
            st.state = "finished"
            st.message = "finished; some samples could not be predicted (named in the log)"
        return st

    def continue_run(self, run_id: str) -> None:
        """Start the run's commands again: each ``xcft predict`` skips what its file already holds."""
        st = self.status(run_id)
        if st.active:
            raise XcftError(f"eval {run_id} is still running")
        if not st.can_continue:
            raise XcftError(f"eval {run_id} has finished; press Run for a new one")
        record = self._record(run_id)
        record["first_step"] = next(k for k, d in enumerate(st.done) if d < st.total)  # the models before are done
        self._write_record(run_id, record)
        self._launch(run_id)

    def stop(self, run_id: str) -> str:
        pid = self._signal(run_id)
        return f"SIGTERM sent to xcft predict (process {pid}); Continue goes on from the answers written"

    # ------------------------------------------------------------------ results

    def results(self, run_id: str) -> Scores | Comparison | None:
        """``xcft score`` of the run's prediction file (two: the second compared with the first); None before
        every model answered something, or while a file is being written."""
        st = self.status(run_id)
        files = self.prediction_files(run_id)
        if st.active or not all(st.done):
            return None
        key = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        cached = self._results.get(run_id)
        if cached is None or cached[0] != key:
            metrics = st.settings.metrics or None
            result = score_files(str(files[0]), str(files[1]) if len(files) > 1 else None, metrics)
            self._results[run_id] = cached = (key, result)
        return cached[1]

    def predictions(self, run_id: str) -> list[list[dict[str, Any]]]:
        """Each model's prediction lines (the run must not be writing them)."""
        from xcft.train.predict import read_predictions

        return [read_predictions(p) for p in self.prediction_files(run_id)]

    def prompt_samples(self, run_id: str) -> dict[tuple[str, str], PromptSample]:
        """The run's samples by (source, id): their images and turns, as ``xcft predict`` read them."""
        settings = self.settings(run_id)
        key = (settings.data, settings.models[0])
        path = Path(settings.data)
        stamp = path.stat().st_mtime_ns if path.exists() else None
        cached = self._samples.get(key)
        if cached is None or cached[0] != stamp:
            samples, _ = read_data(*key)
            self._samples[key] = cached = (stamp, {(s.source, s.id): s for s in samples})
        return cached[1]

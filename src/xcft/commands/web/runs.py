"""Runs started from the web UI as child processes — training runs: start, follow, stop, resume — all through files.

:class:`ChildRuns` is what every kind of run shares (its folder, record, runner, pid files, exit
status and log); :class:`RunManager` is the training runs, and the Eval tab's prediction runs are
another kind (:mod:`xcft.commands.web.evals`).

A run lives in ``WORKDIR/runs/<id>/``: ``run.json`` (arguments, output folder, start time), the
runner's ``train.log``, ``train.pid`` and, once it ended, ``exit_code``. Progress, losses and
checkpoints come from the output folder, read through :mod:`xcft.run_files` (the same reader and
the same "complete checkpoint" rule as ``xcft train``'s resume). Nothing is kept
only in the server's memory, so a reloaded page, or a restarted server, finds every run again and
shows it as running, finished, stopped or failed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcft.commands.web.runner import (
    EXIT_NAME,
    LOG_NAME,
    PID_NAME,
    RUN_RECORD,
    RUNNER_PID_NAME,
    train_command_line,
    write_atomic,
)
from xcft.errors import XcftError
from xcft.run_files import EXIT_SIGTERM, TrainerProgress, complete_checkpoints, earlier_results, follow_trainer_log

LOG_TAIL_BYTES = 64 * 1024
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class RunStatus:
    """What the page shows about a run."""

    run_id: str
    state: str  # starting, running, finished, stopped, failed, ended
    message: str
    output_dir: str
    step: int = 0
    max_steps: int = 0
    eta_s: float | None = None
    loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    sources: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # a mixture's per-file curves
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # preference stages' pair metrics
    checkpoints: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running")

    @property
    def can_resume(self) -> bool:
        """Stopped, failed or ended before finishing, with a complete checkpoint to continue from."""
        return self.state in ("stopped", "failed", "ended") and bool(self.checkpoints)


@dataclass(frozen=True)
class ProcessState:
    """How a run's child process stands, read from its files: state, a message, its pid and exit status."""

    state: str  # starting, running, ending, ended, finished, stopped, failed
    message: str
    pid: int | None
    exit_code: int | None


class ChildRuns:
    """Runs of child processes under one folder (``WORKDIR/runs``, ``WORKDIR/evals`` ...), all through files.

    A run is a folder holding ``run.json`` (its record: the command, an ``output_dir`` the running
    process names on its command line, the start time), the runner's log, pid files and exit status
    (see :mod:`xcft.commands.web.runner`). Subclasses say what a run is and what its state means.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._children: dict[str, subprocess.Popen] = {}  # runners this server started (reaped on poll)

    # ------------------------------------------------------------------ listing

    def run_ids(self) -> list[str]:
        """Every run recorded under the folder, newest first."""
        if not self.root.is_dir():
            return []
        runs = [p for p in self.root.iterdir() if (p / RUN_RECORD).is_file()]
        runs.sort(key=lambda p: (self._record(p.name).get("started", 0), p.name), reverse=True)
        return [p.name for p in runs]

    def _record(self, run_id: str) -> dict[str, Any]:
        path = self.root / run_id / RUN_RECORD
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise XcftError(f"run {run_id}: cannot read {path} ({exc})") from None

    def record(self, run_id: str) -> dict[str, Any]:
        """The run's record (``run.json``) as it was written."""
        return self._record(run_id)

    def output_dir(self, run_id: str) -> str:
        return str(self._record(run_id)["output_dir"])

    def _write_record(self, run_id: str, record: dict[str, Any]) -> None:
        write_atomic(self.root / run_id / RUN_RECORD, json.dumps(record, indent=1))

    # ------------------------------------------------------------------ start / stop

    def _reserve(self, name: str) -> str:
        """A new, empty run folder named after ``name`` (``name-2`` ... when taken); its id."""
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name or "run").strip("-.") or "run"
        self.root.mkdir(parents=True, exist_ok=True)
        n = 1
        while True:
            run_id = base if n == 1 else f"{base}-{n}"
            try:
                (self.root / run_id).mkdir()  # atomic: two starts never get the same folder
                return run_id
            except FileExistsError:
                n += 1

    def _create(self, run_id: str, record: dict[str, Any]) -> None:
        """Write the reserved run's record (with its id, working folder and start time); not launched."""
        self._write_record(run_id, {"id": run_id, "cwd": os.getcwd(), "started": time.time(), **record})

    def _launch(self, run_id: str) -> None:
        run_dir = self.root / run_id
        for name in (PID_NAME, EXIT_NAME, RUNNER_PID_NAME):
            (run_dir / name).unlink(missing_ok=True)
        # A session of its own: the work survives the server and signals aimed at the server's group.
        with open(run_dir / "runner.err", "ab") as err:
            self._children[run_id] = subprocess.Popen(
                [sys.executable, "-m", "xcft.commands.web.runner", str(run_dir)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                close_fds=True,
            )

    def _signal(self, run_id: str) -> int:
        """SIGTERM to the run's running process; its pid. Refused (XcftError) when there is none to stop."""
        ps = self.process_state(run_id)
        if ps.state not in ("starting", "running", "ending"):
            raise XcftError(f"run {run_id} is not running ({ps.state})")
        if ps.pid is None:
            raise XcftError(f"run {run_id} is still starting; press Stop again in a moment")
        try:
            os.kill(ps.pid, signal.SIGTERM)
        except ProcessLookupError:
            raise XcftError(f"run {run_id}: its process {ps.pid} has already ended") from None
        return ps.pid

    # ------------------------------------------------------------------ state

    def _child_pid(self, run_id: str) -> int | None:
        return _read_int(self.root / run_id / PID_NAME)

    def _child_alive(self, pid: int | None, output_dir: str) -> bool:
        """The run's process is alive and is this run's (its command line names the output folder)."""
        return _process_alive(pid, "xcft", output_dir) or _process_alive(pid, "xcft", Path(output_dir).name)

    def _runner_alive(self, run_id: str) -> bool:
        """The runner of the run's latest start is alive (this server's child, or one an earlier server started)."""
        child = self._children.get(run_id)
        if child is not None and child.poll() is None:
            return True
        run_dir = self.root / run_id
        return _process_alive(_read_int(run_dir / RUNNER_PID_NAME), "xcft.commands.web.runner", str(run_dir))

    def process_state(self, run_id: str) -> ProcessState:
        """Running, starting, ending (done, its exit status not recorded yet), ended (runner killed), or how it exited."""
        record = self._record(run_id)
        run_dir = self.root / run_id
        exit_code = _read_int(run_dir / EXIT_NAME)
        pid = self._child_pid(run_id)
        if exit_code is None:
            if self._child_alive(pid, record["output_dir"]):
                return ProcessState("running", f"running (process {pid})", pid, None)
            if self._runner_alive(run_id):  # before the process starts, or after it ended, until it is recorded
                if pid is None:
                    return ProcessState("starting", "starting ...", None, None)
                return ProcessState("ending", "ending: recording the exit status ...", pid, None)
            return ProcessState("ended", "ended without a recorded exit status (the runner was killed)", pid, None)
        if exit_code == 0:
            return ProcessState("finished", "finished", pid, 0)
        if exit_code == EXIT_SIGTERM:
            return ProcessState("stopped", "stopped", pid, exit_code)
        return ProcessState("failed", f"failed (exit {exit_code}): {_last_error(run_dir / LOG_NAME)}", pid, exit_code)

    def last_output_line(self, run_id: str) -> str:
        """The last line the run's commands wrote ("" when none)."""
        lines = _output_lines(self.root / run_id / LOG_NAME)
        return lines[-1] if lines else ""

    def log_tail(self, run_id: str, max_lines: int = 200) -> str:
        """The end of the run's log, progress-bar redraws collapsed to their last state."""
        data = _read_tail(self.root / run_id / LOG_NAME)
        if data is None:
            return ""
        data = _ANSI_RE.sub("", data)  # cursor moves of progress bars
        lines = [ln.rsplit("\r", 1)[-1] if "\r" in ln.rstrip("\r") else ln.rstrip("\r") for ln in data.split("\n")]
        return "\n".join(lines[-max_lines:])


class RunManager(ChildRuns):
    """The training runs under one work folder (one instance per server).

    ``command``: the program a run executes with its arguments (default: ``xcft train``); recorded
    in each run, so a resume runs what the start ran.
    """

    def __init__(self, workdir: str | os.PathLike[str], command: list[str] | None = None) -> None:
        super().__init__(Path(workdir) / "runs")
        self.command = list(command) if command else train_command_line([])
        self._progress: dict[str, TrainerProgress] = {}  # trainer_log.jsonl read so far, per run

    def argv(self, run_id: str) -> list[str]:
        """The arguments the run was started with (a resume's flag left out)."""
        return _without_option(list(self._record(run_id)["argv"]), "resume_from_checkpoint")

    # ------------------------------------------------------------------ start / stop / resume

    def start(self, argv: list[str], output_dir: str) -> str:
        """Start ``xcft train argv`` (argv names ``output_dir``); returns the run id."""
        out = Path(output_dir).expanduser()
        if any(self.status(r).active and Path(self._record(r)["output_dir"]) == out.resolve() for r in self.run_ids()):
            raise XcftError(f"a run is already writing to {out}; stop it first or choose another output_dir")
        if earlier_results(out):
            raise XcftError(f"output_dir {out} already holds a run; choose another folder, or select that run and press Resume")
        run_id = self._reserve(out.name or "run")
        self._create(run_id, {"command": self.command, "argv": list(argv), "output_dir": str(out.resolve()), "resumes": 0})
        self._launch(run_id)
        return run_id

    def _launch(self, run_id: str) -> None:
        self._progress.pop(run_id, None)
        super()._launch(run_id)

    def stop(self, run_id: str) -> str:
        """SIGTERM to the training process: it finishes the step, writes a checkpoint and exits."""
        pid = self._signal(run_id)
        return f"SIGTERM sent to process {pid}: it saves a checkpoint after the current step, then stops"

    def resume(self, run_id: str) -> None:
        """Start the run again from its latest checkpoint (``--resume_from_checkpoint true``)."""
        st = self.status(run_id)
        if st.active:
            raise XcftError(f"run {run_id} is still running")
        if st.state == "finished":
            raise XcftError(f"run {run_id} has finished; start a new run to train further")
        if not st.checkpoints:
            raise XcftError(f"run {run_id} has no checkpoint in {st.output_dir} to resume from; start a new run instead")
        record = self._record(run_id)
        argv = [*_without_option(record["argv"], "resume_from_checkpoint"), "--resume_from_checkpoint", "true"]
        record.update(argv=argv, resumes=int(record.get("resumes", 0)) + 1, resumed=time.time())
        self._write_record(run_id, record)
        self._launch(run_id)

    # ------------------------------------------------------------------ state

    def status(self, run_id: str) -> RunStatus:
        out = self._record(run_id)["output_dir"]
        ps = self.process_state(run_id)
        st = RunStatus(run_id, ps.state, ps.message, out)
        progress = self._progress[run_id] = follow_trainer_log(out, self._progress.get(run_id))
        st.step, st.max_steps, st.eta_s = progress.step, progress.max_steps, progress.eta_s
        st.loss, st.eval_loss = progress.points("loss"), progress.points("eval_loss")
        st.sources = {key: progress.points(key) for key in sorted(progress.sources)}
        st.metrics = {key: progress.points(key) for key in sorted(progress.metrics)}
        st.checkpoints = [str(c) for c in complete_checkpoints(out)]
        last_ckpt = st.checkpoints[-1] if st.checkpoints else None
        if ps.state == "starting":
            st.message = "starting xcft train ..."
        elif ps.state == "ending":
            st.state = "running"
        elif ps.state == "finished":
            st.message = f"finished: output in {out}"
        elif ps.state == "stopped":
            st.message = (
                f"stopped at step {st.step}; checkpoint written: {Path(last_ckpt).name}. Resume continues from it"
                if last_ckpt
                else f"stopped at step {st.step} (no checkpoint was written)"
            )
        return st


def _without_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for tok in argv:
        if skip and not tok.startswith("--"):
            continue
        skip = False
        if tok == f"--{name}" or tok.startswith(f"--{name}="):
            skip = not tok.startswith(f"--{name}=")
            continue
        out.append(tok)
    return out


def _process_alive(pid: int | None, *needles: str) -> bool:
    """Process ``pid`` exists and its command line holds every needle (a recycled pid is someone else's)."""
    if pid is None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # no /proc (not Linux): the pid alone
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return bool(cmdline) and all(n in cmdline for n in needles)


def _read_tail(path: Path) -> str | None:
    """The last :data:`LOG_TAIL_BYTES` of a log as text, or None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _output_lines(log: Path) -> list[str] | None:
    """The non-empty lines the commands wrote at the end of the log (the runner's own left out); None: no log."""
    text = _read_tail(log)
    if text is None:
        return None
    return [ln.strip() for ln in text.replace("\r", "\n").split("\n") if ln.strip() and not ln.startswith("[xcft web]")]


def _last_error(log: Path) -> str:
    """The CLI's one-line error ("error: ...") from the log, else its last non-empty line."""
    lines = _output_lines(log)
    if lines is None:
        return "no log"
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln[len("error:") :].strip()
    return lines[-1] if lines else "no output"

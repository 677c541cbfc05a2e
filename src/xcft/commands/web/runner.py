"""``python -m xcft.commands.web.runner RUN_DIR``: run one ``xcft train`` for the web UI and record how it ended.

The web server starts this small process in a session of its own, so the training outlives the
server (a Ctrl-C in the server's terminal or killing the server does not reach it). The runner
starts ``xcft train`` with the run's arguments, its output appended to ``RUN_DIR/train.log``,
writes the training process id to ``RUN_DIR/train.pid`` (Stop signals that process), waits, and
writes the exit status to ``RUN_DIR/exit_code``. Signals to the runner itself are ignored, so the
exit status is always recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RUN_RECORD = "run.json"
LOG_NAME = "train.log"
PID_NAME = "train.pid"
RUNNER_PID_NAME = "runner.pid"
EXIT_NAME = "exit_code"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def train_command_line(argv: list[str]) -> list[str]:
    """The process that trains: this interpreter running the ``xcft`` CLI."""
    return [sys.executable, "-m", "xcft.cli", "train", *argv]


def command_line(record: dict) -> list[str]:
    """The run's program (recorded by the server; older records: ``xcft train``) and its arguments."""
    argv = list(record["argv"])
    return [*record["command"], *argv] if record.get("command") else train_command_line(argv)


def main(run_dir: str) -> int:
    root = Path(run_dir)
    write_atomic(root / RUNNER_PID_NAME, str(os.getpid()))  # the server tells "still recording" from "killed"
    record = json.loads((root / RUN_RECORD).read_text(encoding="utf-8"))
    argv = list(record["argv"])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(root / LOG_NAME, "ab", buffering=0) as log:
        log.write(f"\n$ xcft train {' '.join(argv)}\n".encode())
        proc = subprocess.Popen(
            command_line(record),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=record.get("cwd") or None,
        )
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        write_atomic(root / PID_NAME, str(proc.pid))
        code = proc.wait()
        if code < 0:  # killed by a signal: report it as a shell would
            code = 128 - code
        log.write(f"[xcft web] training process exited with status {code} at {time.strftime('%H:%M:%S')}\n".encode())
    write_atomic(root / EXIT_NAME, str(code))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

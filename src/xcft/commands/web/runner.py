"""``python -m xcft.commands.web.runner RUN_DIR``: run a web page's child command(s) and record how they ended.

The web server starts this small process in a session of its own, so the work outlives the
server (a Ctrl-C in the server's terminal or killing the server does not reach it). The runner
starts the run's command (``xcft train`` with the run's arguments, or the record's ``steps``: whole
command lines run one after the other, stopping at the first that fails, or, with ``keep_going``,
at the first killed by a signal), its output appended to
``RUN_DIR/train.log``, writes the running process's id to ``RUN_DIR/train.pid`` (Stop signals that
process), waits, and writes the exit status to ``RUN_DIR/exit_code``. Signals to the runner itself
are ignored, so the exit status is always recorded.
"""

from __future__ import annotations

import json
import os
import shlex
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


def xcft_command_line(subcommand: str, argv: list[str]) -> list[str]:
    """An ``xcft`` subcommand run by this interpreter."""
    return [sys.executable, "-m", "xcft.cli", subcommand, *argv]


def train_command_line(argv: list[str]) -> list[str]:
    """The process that trains: this interpreter running the ``xcft`` CLI."""
    return xcft_command_line("train", argv)


def command_line(record: dict) -> list[str]:
    """The run's program (recorded by the server; older records: ``xcft train``) and its arguments."""
    argv = list(record["argv"])
    return [*record["command"], *argv] if record.get("command") else train_command_line(argv)


def command_lines(record: dict) -> list[list[str]]:
    """Every command the run executes, in order."""
    if record.get("steps"):  # from ``first_step`` on: a continued run skips the commands that are done
        return [list(step) for step in record["steps"][int(record.get("first_step", 0)) :]]
    return [command_line(record)]


def shown_command(cmd: list[str]) -> str:
    """A command as the user would type it (``xcft ...`` for this interpreter's CLI)."""
    if cmd[:3] == [sys.executable, "-m", "xcft.cli"]:
        cmd = ["xcft", *cmd[3:]]
    return shlex.join(cmd)


_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _default_signals() -> None:
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_DFL)


def main(run_dir: str) -> int:
    root = Path(run_dir)
    write_atomic(root / RUNNER_PID_NAME, str(os.getpid()))  # the server tells "still recording" from "killed"
    record = json.loads((root / RUN_RECORD).read_text(encoding="utf-8"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    final = 0  # the last failing command's status
    with open(root / LOG_NAME, "ab", buffering=0) as log:
        for cmd in command_lines(record):
            shown = shown_command(cmd) if record.get("steps") else f"xcft train {shlex.join(record['argv'])}"
            log.write(f"\n$ {shown}\n".encode())
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=record.get("cwd") or None,
                preexec_fn=_default_signals,  # the runner ignores them; its commands must not
            )
            write_atomic(root / PID_NAME, str(proc.pid))
            code = proc.wait()
            if code < 0:  # killed by a signal: report it as a shell would
                code = 128 - code
            name = "process" if record.get("steps") else "training process"
            log.write(f"[xcft web] {name} exited with status {code} at {time.strftime('%H:%M:%S')}\n".encode())
            final = code or final
            if code >= 128 or (code and not record.get("keep_going")):  # stopped, or a failure that ends the run
                break
    write_atomic(root / EXIT_NAME, str(final))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

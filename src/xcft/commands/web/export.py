"""The Export tab: ``xcft merge`` (the verified merge) in a child process, its output streamed.

A merge holds the base model twice (adapter applied, then the merged copy reloaded from disk to
verify it); running it as its own process gives that memory back when it ends and keeps the
server's memory at what the Chat tab needs. The page shows the command's output as it comes, and
as the result the verification merge records in the merged folder (``merge_check.json``, read
with :func:`xcft.run_files.read_merge_check`: largest logit difference merged vs base + adapter,
and the tolerance).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from xcft.errors import XcftError
from xcft.run_files import MergeCheck, read_merge_check


@dataclass
class MergeProgress:
    """The merge's output so far; once ``done``, its verification (``check``) or its error line."""

    log: str
    done: bool = False
    ok: bool = False
    check: MergeCheck | None = None
    error: str | None = None


def merge_argv(adapter: str, output: str, base: str = "") -> list[str]:
    adapter, output, base = (adapter or "").strip(), (output or "").strip(), (base or "").strip()
    if not adapter:
        raise XcftError("no adapter folder given; enter the output folder of a LoRA run")
    if not output:
        raise XcftError("no output folder given; enter a folder for the merged model")
    argv = ["merge", "--adapter", adapter, "--output", output]
    return argv + (["--base", base] if base else [])


def run_merge(argv: list[str], output: str) -> Iterator[MergeProgress]:
    """Run ``xcft <argv>`` (a merge into ``output``) and yield the output so far; the last item has ``done`` set."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "xcft.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
        bufsize=1,
    )
    lines: list[str] = ["$ xcft " + " ".join(argv)]
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        yield MergeProgress("\n".join(lines))
    code = proc.wait()
    check = read_merge_check(output) if code == 0 else None
    result = MergeProgress("\n".join(lines), done=True, ok=check is not None and check.ok, check=check)
    if code != 0:
        errors = [ln[len("error:") :].strip() for ln in lines if ln.startswith("error:")]
        result.error = errors[-1] if errors else f"xcft merge exited with status {code}"
    elif check is None:
        result.error = f"xcft merge ended without recording its verification in {output}"
    yield result

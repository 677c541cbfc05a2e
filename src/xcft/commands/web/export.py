"""The Export tab: ``xcft merge`` (the verified merge) in a child process, its output streamed.

A merge holds the base model twice (adapter applied, then the merged copy reloaded from disk to
verify it); running it as its own process gives that memory back when it ends and keeps the
server's memory at what the Chat tab needs. The page shows the command's own output, and its probe
line (largest logit difference merged vs base + adapter, and the tolerance) as the result.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from xcft.errors import XcftError

_PROBE_RE = re.compile(r"max abs logit diff merged vs adapter: (?P<diff>\S+) \(tolerance (?P<tol>[^)]+)\)")


@dataclass
class MergeProgress:
    log: str
    done: bool = False
    ok: bool = False
    diff: str | None = None
    tolerance: str | None = None
    error: str | None = None


def merge_argv(adapter: str, output: str, base: str = "") -> list[str]:
    adapter, output, base = (adapter or "").strip(), (output or "").strip(), (base or "").strip()
    if not adapter:
        raise XcftError("no adapter folder given; enter the output folder of a LoRA run")
    if not output:
        raise XcftError("no output folder given; enter a folder for the merged model")
    argv = ["merge", "--adapter", adapter, "--output", output]
    return argv + (["--base", base] if base else [])


def run_merge(argv: list[str]) -> Iterator[MergeProgress]:
    """Run ``xcft <argv>`` and yield the output so far; the last item has ``done`` set."""
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
    log = "\n".join(lines)
    m = _PROBE_RE.search(log)
    result = MergeProgress(log, done=True, ok=code == 0, diff=m and m.group("diff"), tolerance=m and m.group("tol"))
    if code != 0:
        errors = [ln[len("error:") :].strip() for ln in lines if ln.startswith("error:")]
        result.error = errors[-1] if errors else f"xcft merge exited with status {code}"
    yield result

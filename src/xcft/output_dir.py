"""Output folders: xcft changes or deletes only what it created there.

Every command that writes a folder (``train``, ``merge``, ``convert``, ``init-model``, ``demo``)
follows the same rules:

* **Marker.** The first file written into a new output folder is :data:`MARKER_NAME`, a small
  JSON file that says xcft owns the folder and lists the top-level entries xcft wrote there
  (its manifest). A folder that exists, is not empty and has no marker holds the user's files:
  it is refused, and nothing in it is touched.
* **What is xcft's.** In a marked folder, xcft's entries are those in the manifest, the
  ``checkpoint-N`` folders that carry their own marker, and names starting with ``.xcft``
  (marker, lock, staging). Anything else was put there by someone else and is never changed,
  overwritten or deleted (a collision with such a name is an error).
* **Inputs.** An output folder equal to, inside or containing a model folder it reads is
  refused; one equal to or containing the folder of a data file is refused (the data would be
  inside the output).
* **One run per folder.** :class:`FolderLock` holds an exclusive ``flock`` on :data:`LOCK_NAME`
  for the whole run; the OS releases it when the process ends, however it ends. A second run
  gets one line naming the folder and the PID that holds it.

Save failures (a full disk, a read-only file system) become one :class:`~xcft.errors.SaveError`
line through :func:`save_errors`, which names what was written, where, the OS reason and what
remains intact.

This module sits below every other xcft layer (standard library and :mod:`xcft.errors` only).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from xcft.errors import OutputFolderError, SaveError, XcftError

logger = logging.getLogger(__name__)

MARKER_NAME = ".xcft-output.json"
LOCK_NAME = ".xcft-lock"
#: Names starting with this belong to xcft in a marked folder (marker, lock, staging folders).
OWN_PREFIX = ".xcft"
MARKER_KIND = "xcft output folder"
#: Checkpoint folders are ``checkpoint-N`` (N the optimizer step), the Hugging Face Trainer's names.
CHECKPOINT_PREFIX = "checkpoint"
CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


# --------------------------------------------------------------------------- marker


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of ``folder`` (a dict), or None when it has none (or an unreadable one)."""
    path = Path(folder) / MARKER_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("kind") != MARKER_KIND:
        return None
    return data


def is_marked(folder: str | os.PathLike) -> bool:
    """True when ``folder`` carries an xcft marker (xcft created it)."""
    return read_marker(folder) is not None


def write_marker(folder: str | os.PathLike, command: str, entries: Iterable[str] = ()) -> Path:
    """Write (atomically) the marker of ``folder``: the command that owns it and its manifest."""
    folder = Path(folder)
    old = read_marker(folder) or {}
    data = {
        "kind": MARKER_KIND,
        "command": old.get("command", command),
        "created": old.get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
        "entries": sorted(set(entries)),
    }
    path = folder / MARKER_NAME
    tmp = folder / f"{MARKER_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def is_own_checkpoint(path: str | os.PathLike) -> bool:
    """A ``checkpoint-N`` folder that xcft wrote (it carries the marker)."""
    p = Path(path)
    return p.is_dir() and not p.is_symlink() and CHECKPOINT_RE.match(p.name) is not None and is_marked(p)


def own_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders xcft wrote in ``folder``, by increasing N."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), c) for c in root.iterdir() if (m := CHECKPOINT_RE.match(c.name)) and is_own_checkpoint(c)]
    return [c for _, c in sorted(found)]


def own_entries(folder: str | os.PathLike) -> set[str]:
    """Top-level names in ``folder`` that xcft wrote (manifest, own checkpoints, ``.xcft*``)."""
    root = Path(folder)
    marker = read_marker(root)
    if marker is None or not root.is_dir():
        return set()
    listed = set(marker.get("entries") or [])
    own = set()
    for child in root.iterdir():
        name = child.name
        if name.startswith(OWN_PREFIX) or name in listed or is_own_checkpoint(child):
            own.add(name)
    return own


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """Top-level names in ``folder`` that xcft did not write (all of them when the folder has no marker)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    own = own_entries(root)
    return sorted(c.name for c in root.iterdir() if c.name not in own)


def _shown(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------- refusals


def check_output_folder(folder: str | os.PathLike, *, flag: str = "--output_dir") -> None:
    """Refuse a path that is a file, or a non-empty folder without the xcft marker. Writes nothing."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{flag} {out} is a file, not a folder; choose a new or empty folder")
    if out.is_dir() and not is_marked(out):
        # ``.xcft*`` names are xcft's own (a marker being written by another rank of this run)
        names = sorted(c.name for c in out.iterdir() if not c.name.startswith(OWN_PREFIX))
        if names:
            raise OutputFolderError(
                f"{flag} {out} already holds files xcft did not write ({_shown(names)}); xcft never changes them. "
                "Choose an empty or new folder"
            )


def _contains(parent: Path, child: Path) -> bool:
    return parent == child or parent in child.parents


def check_no_overlap(
    folder: str | os.PathLike,
    inputs: Iterable[tuple[str, str | os.PathLike]],
    *,
    flag: str = "--output_dir",
    allow_inside: bool = False,
) -> None:
    """Refuse an output folder equal to, containing or (unless ``allow_inside``) inside an input folder.

    ``inputs`` are ``(what, folder)`` pairs, e.g. ``("the base model folder", path)``. Paths are
    compared after resolving symlinks, so a link to the model folder is caught too.
    """
    out = Path(folder).expanduser().resolve()
    for what, path in inputs:
        src = Path(path).expanduser().resolve()
        if out == src:
            raise OutputFolderError(f"{flag} {out} is {what}; xcft never writes into its inputs. Choose a new folder")
        if _contains(out, src):
            raise OutputFolderError(
                f"{flag} {out} contains {what} ({src}); xcft never writes around its inputs. Choose a folder outside it"
            )
        if not allow_inside and _contains(src, out):
            raise OutputFolderError(
                f"{flag} {out} is inside {what} ({src}); xcft never writes into its inputs. Choose a folder outside it"
            )


# --------------------------------------------------------------------------- the folder of one run


class OutputFolder:
    """An output folder claimed by this process: marked, with the names that were not xcft's at the start.

    The manifest (:meth:`record`) lists every top-level entry present except those foreign
    ones, so what a run adds becomes xcft's and what the user had stays the user's.
    """

    def __init__(self, path: str | os.PathLike, command: str) -> None:
        self.path = Path(path)
        self.command = command
        self.foreign: set[str] = set()

    @classmethod
    def claim(cls, path: str | os.PathLike, command: str, *, flag: str = "--output_dir") -> OutputFolder:
        """Check ``path`` (see :func:`check_output_folder`), create it and write the marker first."""
        check_output_folder(path, flag=flag)
        folder = cls(path, command)
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.foreign = set(foreign_entries(folder.path))
        if not is_marked(folder.path):
            write_marker(folder.path, command)
        return folder

    def record(self) -> None:
        """Make the manifest list what is in the folder now, minus the foreign names."""
        if not self.path.is_dir():
            return
        names = {c.name for c in self.path.iterdir() if not c.name.startswith(OWN_PREFIX)} - self.foreign
        marker = read_marker(self.path)
        if marker is None or set(marker.get("entries") or []) != names:
            write_marker(self.path, self.command, names)

    def declare(self, names: Iterable[str]) -> None:
        """Record ``names`` as xcft's before writing them (refused when one is a foreign entry)."""
        names = set(names)
        self.check_writable(names)
        listed = set((read_marker(self.path) or {}).get("entries") or [])
        write_marker(self.path, self.command, listed | names)

    def check_writable(self, names: Iterable[str]) -> None:
        """Refuse to write ``names`` when one of them is a foreign entry."""
        clash = sorted(set(names) & self.foreign)
        if clash:
            raise OutputFolderError(
                f"{self.path} holds {_shown(clash)}, which xcft did not write and would overwrite; "
                "move it out of the folder or choose another folder"
            )

    def remove_own(self, keep: Iterable[str] = ()) -> list[str]:
        """Delete everything xcft wrote here except the marker, the lock and ``keep``; returns the names."""
        keep_set = set(keep) | {MARKER_NAME, LOCK_NAME}
        removed = []
        for name in sorted(own_entries(self.path) - keep_set):
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
            removed.append(name)
        write_marker(self.path, self.command, [])
        return removed

    def remove_if_unused(self) -> bool:
        """Delete the folder when it holds nothing but xcft's marker and lock (a run that failed at once)."""
        if self.path.is_dir() and all(c.name.startswith(OWN_PREFIX) and c.is_file() for c in self.path.iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)
            return True
        return False

    def publish(self, staged: str | os.PathLike) -> list[str]:
        """Move every entry of the folder ``staged`` into this folder (replacing xcft's own entries).

        Refuses before moving anything when a staged name is a foreign entry; ``staged`` is
        removed afterwards.
        """
        staged = Path(staged)
        names = sorted(c.name for c in staged.iterdir())
        self.check_writable(names)
        for name in names:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                old = self.path / f"{OWN_PREFIX}-old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(staged / name, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staged / name, target)
        shutil.rmtree(staged, ignore_errors=True)
        self.record()
        return names


# --------------------------------------------------------------------------- one run per folder


class FolderLock:
    """An exclusive ``flock`` on ``folder/.xcft-lock``, held until :meth:`release` or process exit.

    The lock file holds the PID of the holder, so a refused second run can say who holds it.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"PID {holder}" if holder else "another process"
                raise OutputFolderError(
                    f"{self.folder} is in use by another xcft run ({who} holds {self.path}); "
                    "wait for it to finish or choose another output folder"
                ) from None
            raise OutputFolderError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------- save failures


_RUST_OS_ERROR = re.compile(r"os error (\d+)")
_STREAM_WRITER = ("inline_container", "PytorchStreamWriter", "file write failed", "iostream error")


def _free_bytes(path: Path) -> int | None:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def io_failure_reason(exc: BaseException, where: str | os.PathLike) -> str | None:
    """The OS reason of a failed write (``"No space left on device"`` ...), or None when ``exc`` is no I/O failure.

    Looks through the exception chain: an ``OSError`` gives its errno; safetensors' Rust errors
    carry ``os error N``; torch's zip writer reports only "unexpected pos", so a full file
    system is then recognised by its free space.
    """
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno)
    for e in chain:
        m = _RUST_OS_ERROR.search(str(e))
        if m:
            return os.strerror(int(m.group(1)))
    for e in chain:
        if isinstance(e, RuntimeError) and any(s in str(e) for s in _STREAM_WRITER):
            free = _free_bytes(Path(where))
            if free is not None and free < 1 << 20:
                return os.strerror(errno.ENOSPC)
            return f"write failed ({str(e).splitlines()[0][:200]})"
    return None


@contextlib.contextmanager
def save_errors(
    what: str,
    where: str | os.PathLike,
    *,
    remains: Callable[[], str] | None = None,
    cleanup: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Turn an I/O failure inside the block into one :class:`SaveError` line.

    ``what`` is what was being written ("checkpoint-40"), ``where`` the folder; ``cleanup`` runs
    first (e.g. removes the half-written staging folder, which also frees the space);
    ``remains()`` says what is still intact ("the last complete checkpoint is ..."). Other
    exceptions pass through unchanged.
    """
    try:
        yield
    except XcftError:
        raise
    except Exception as exc:
        reason = io_failure_reason(exc, where)
        if reason is None:
            raise
        if cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup()
        tail = f"; {remains()}" if remains is not None else ""
        raise SaveError(f"cannot write {what} to {where}: {reason}{tail}. Free space or choose another folder") from exc


def staging_dir(parent: str | os.PathLike, name: str) -> Path:
    """A fresh private folder next to an output (for write-then-rename saves)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))


__all__ = [
    "CHECKPOINT_PREFIX",
    "CHECKPOINT_RE",
    "LOCK_NAME",
    "MARKER_NAME",
    "OWN_PREFIX",
    "FolderLock",
    "OutputFolder",
    "check_no_overlap",
    "check_output_folder",
    "foreign_entries",
    "io_failure_reason",
    "is_marked",
    "is_own_checkpoint",
    "own_checkpoints",
    "own_entries",
    "read_marker",
    "save_errors",
    "write_marker",
]

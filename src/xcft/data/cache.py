"""The preprocessing cache: each data file's :class:`~xcft.data.table.SampleTable` stored once, mapped by every later reader.

An entry is a folder under the cache folder (``--data_cache_dir``, else ``$XCFT_DATA_CACHE``, else
``~/.cache/xcft/data``) named by a key over everything that changes the table: the data file (path,
size, modification time, a BLAKE2b hash of its bytes), how it was named and where its images are
looked up, the tokenizer (its serialized model), the image spec (family, img_size, hd_num),
max_length and :data:`CACHE_VERSION`. It holds one ``.npy`` file per column (opened with
``mmap_mode="r"``: pages are shared by every process that maps them, DataLoader workers and the
ranks of a node included) and ``meta.json`` (written last: counts, problems, a hash of each column
file, the images' sizes and modification times).

Safety: an entry is written in a temporary folder and renamed into place, so a killed build leaves
nothing that is read; builders of the same key take a file lock (the others wait, then map what was
built; a builder that dies releases it); an entry that fails its checks (a column's hash, the
images' sizes and times) is rebuilt with a warning. Entries with error-level problems are not kept:
fixing the data must not meet a stale report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from xcft.data.cache_options import CACHE_ENV, CacheOptions, cache_dir
from xcft.data.images import decode_with_size
from xcft.data.schema import Problem
from xcft.data.table import SampleTable, TableContext, build_table
from xcft.errors import XcftError

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_ENV",
    "CACHE_VERSION",
    "CacheOptions",
    "cache_dir",
    "entry_key",
    "load_table",
    "tokenizer_identity",
]

#: raise when the encoding, the read pass or the entry layout changes: older entries stop matching
CACHE_VERSION = 2
LOCK_TIMEOUT_ENV = "XCFT_DATA_CACHE_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 3600.0
META = "meta.json"
_HASH_CHUNK = 1 << 22


def file_hash(path: Path) -> str:
    """BLAKE2b of the file's bytes."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


def tokenizer_identity(tokenizer: Any) -> str | None:
    """A hash naming the tokenizer (its SentencePiece model, or its pickled state); None when it cannot be named."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
    sp = getattr(tokenizer, "sp_model", None)
    try:
        if sp is not None and hasattr(sp, "serialized_model_proto"):
            h.update(sp.serialized_model_proto())
            h.update(repr(sorted(getattr(tokenizer, "added_tokens_encoder", {}).items())).encode())
        else:
            import pickle

            h.update(pickle.dumps(tokenizer))
    except Exception:  # an unpicklable tokenizer: read without the cache
        return None
    return h.hexdigest()


def entry_key(ctx: TableContext, tokenizer_id: str, content_hash: str, size: int, mtime_ns: int) -> str:
    """The entry name: a hash over everything that changes the table (see the module docstring)."""
    facts = {
        "version": CACHE_VERSION,
        "path": str(ctx.path.resolve()),
        "size": size,
        "mtime_ns": mtime_ns,
        "content": content_hash,
        "display": ctx.display,
        "search_dirs": [str(d.resolve()) for d in ctx.search_dirs],
        "tokenizer": tokenizer_id,
        "image_spec": dataclasses.asdict(ctx.spec),
        "max_length": ctx.max_length,
    }
    return hashlib.blake2b(json.dumps(facts, sort_keys=True).encode(), digest_size=20).hexdigest()


# --------------------------------------------------------------------------- locking


@contextlib.contextmanager
def _locked(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path``; wait for another holder (a clear error after the timeout)."""
    timeout = float(os.environ.get(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT_S))
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t0, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    logger.info("data cache: another process is preparing %s; waiting for it (lock %s)", what, lock_path)
                    told = True
                if time.monotonic() - t0 > timeout:
                    raise XcftError(
                        f"data cache: waited {timeout:.0f} s for another process preparing {what} (lock {lock_path}). "
                        f"Fix: if no other xcft process is reading this data, that process hung: stop it; or raise "
                        f"${LOCK_TIMEOUT_ENV}, or pass --no_data_cache"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------- storing and loading


def _column_hash(path: Path) -> str:
    return file_hash(path)


def _image_stats(table: SampleTable) -> tuple[np.ndarray, np.ndarray]:
    """(size, mtime_ns) of each distinct image of the table (-1 where it is gone)."""
    n = table.num_paths
    sizes, mtimes = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    for i in range(n):
        try:
            st = os.stat(table.path_at(i))
        except OSError:
            continue
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def _write_entry(root: Path, key: str, table: SampleTable, images_decoded: bool) -> None:
    """Write the entry in a temporary folder, then rename it into place (an existing entry is replaced)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
    try:
        sizes, mtimes = _image_stats(table)
        columns = {**table.columns, "image_size": sizes, "image_mtime_ns": mtimes}
        hashes = {}
        for name, arr in columns.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
            hashes[name] = _column_hash(tmp / f"{name}.npy")
        meta = {
            "version": CACHE_VERSION,
            "key": key,
            "file": str(table.path),
            "display": table.display,
            "search_dirs": [str(d) for d in table.search_dirs],
            "file_size": table.file_size,
            "file_mtime_ns": table.file_mtime_ns,
            "samples": len(table),
            "columns": hashes,
            "images_decoded": images_decoded,
            "problems": [dataclasses.asdict(p) for p in table.problems],
        }
        _write_json(tmp / META, meta)
        final = root / key
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _Stale(Exception):
    """An entry that cannot be used (the message says why)."""


def _open_entry(entry: Path) -> tuple[SampleTable, dict[str, Any]]:
    """Map an entry's columns after checking them; :class:`_Stale` when it is damaged or its images changed."""
    try:
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
        if meta.get("version") != CACHE_VERSION or meta.get("key") != entry.name:
            raise _Stale("it was written by another version")
        columns: dict[str, np.ndarray] = {}
        for name, digest in meta["columns"].items():
            path = entry / f"{name}.npy"
            if _column_hash(path) != digest:
                raise _Stale(f"{path.name} does not match its hash")
            columns[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        if len(columns["start"]) != meta["samples"]:
            raise _Stale("its sample count does not match")
    except _Stale:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _Stale(f"it cannot be read ({type(exc).__name__}: {exc})") from exc
    sizes, mtimes = columns.pop("image_size"), columns.pop("image_mtime_ns")
    problems = [Problem(**p) for p in meta["problems"]]
    table = SampleTable(
        Path(meta["file"]),
        meta["display"],
        [Path(d) for d in meta["search_dirs"]],
        columns,
        problems,
        file_size=int(meta["file_size"]),
        file_mtime_ns=int(meta["file_mtime_ns"]),
    )
    now_sizes, now_mtimes = _image_stats(table)
    if not (np.array_equal(now_sizes, sizes) and np.array_equal(now_mtimes, mtimes)):
        raise _Stale("an image it names changed")
    return table, meta


def _verify_images(table: SampleTable, workers: int | None) -> bool:
    """Decode every distinct image of the table once (threads); True when all decode."""
    paths = [table.path_at(i) for i in range(table.num_paths)]
    with ThreadPoolExecutor(max_workers=max(1, workers or os.cpu_count() or 1)) as pool:
        return all(why is None for why, _ in pool.map(decode_with_size, paths))


def load_table(
    ctx: TableContext,
    options: CacheOptions | None = None,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SampleTable:
    """The table of ``ctx``'s file: mapped from the cache, or built (and stored when the cache is on)."""
    root = cache_dir(options)
    build_workers = options.preprocessing_num_workers if options is not None else None
    tok_id = tokenizer_identity(ctx.tokenizer) if root is not None else None
    if root is None or tok_id is None:
        return _build(ctx, build_workers, progress)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise XcftError(f"data cache: cannot create {root} ({exc}). Fix: pass --data_cache_dir DIR, or --no_data_cache") from exc
    st = ctx.path.stat()
    key = entry_key(ctx, tok_id, file_hash(ctx.path), st.st_size, st.st_mtime_ns)
    entry = root / key
    table = _try_open(entry, ctx, workers) if entry.exists() else None
    if table is not None:
        return table
    with _locked(root / f"{key}.lock", f"{ctx.display}"):
        if entry.exists():  # another process built it while this one waited
            table = _try_open(entry, ctx, workers)
            if table is not None:
                return table
        t0 = time.monotonic()
        table = _build(ctx, build_workers, progress)
        if any(p.level == "error" for p in table.problems):
            return table
        try:
            _write_entry(root, key, table, ctx.decode_images)
        except OSError as exc:  # e.g. a full disk: the data was read, only the cache is missing
            logger.warning("data cache: could not store %s in %s (%s); it will be read again next time", ctx.display, root, exc)
            return table
        logger.info("data cache: %s read in %.1f s, stored as %s", ctx.display, time.monotonic() - t0, entry)
        try:
            return _open_entry(entry)[0]
        except _Stale as exc:  # cannot happen unless the disk is failing: use what was just built
            logger.warning("data cache: the new entry %s does not read back (%s)", entry, exc)
            return table


class BuildProgress:
    """Progress of a build: a tqdm bar on a terminal, else a log line every :attr:`interval_s` seconds."""

    interval_s = 10.0

    def __init__(self, what: str) -> None:
        self.what = what
        self.bar: Any = None
        self._tty = sys.stderr.isatty()
        self._last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if self._tty:
            if self.bar is None:
                self.bar = tqdm(total=total, desc=f"reading {self.what}", unit="sample", file=sys.stderr, leave=False)
            self.bar.update(done - self.bar.n)
        elif time.monotonic() - self._last >= self.interval_s or done == total:
            self._last = time.monotonic()
            logger.info("data cache: %s: %d/%d samples read (%d%%)", self.what, done, total, 100 * done // max(total, 1))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _build(ctx: TableContext, workers: int | None, progress: Callable[[int, int], None] | None) -> SampleTable:
    """:func:`build_table` with a progress display unless the caller shows its own."""
    if progress is not None:
        return build_table(ctx, workers, progress)
    shown = BuildProgress(ctx.display)
    try:
        return build_table(ctx, workers, shown)
    finally:
        shown.close()


def _try_open(entry: Path, ctx: TableContext, workers: int | None) -> SampleTable | None:
    """The entry's table, or None (with a warning) when it must be built again."""
    try:
        table, meta = _open_entry(entry)
    except _Stale as exc:
        logger.warning("data cache: the entry for %s is rebuilt: %s (%s)", ctx.display, exc, entry)
        return None
    if ctx.decode_images and not meta.get("images_decoded"):
        if not _verify_images(table, workers):  # a broken image: the full read names each sample that uses it
            return None
        meta["images_decoded"] = True
        with contextlib.suppress(OSError):
            _write_json(entry / META, meta)
    return table

"""Host memory allocator setting for CPU training.

A CPU training step allocates and frees several large tensors every step (the ``[targets, vocab]``
logits of the head and their gradient, the ``[vocab, hidden]`` embedding and head gradients, the
pixel batch). glibc serves each allocation above 32 MiB with a fresh ``mmap`` and unmaps it on
free, so the next step page-faults and zero-fills the same gigabytes again: about a fifth of a
``small``-preset step on the 2-core benchmark machine. Serving every allocation from the heap and
never trimming it lets the next step reuse the pages. The cost is that the process keeps its peak
resident memory until it exits (and some fragmentation: peak RSS ~10 % higher on the benchmark).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# glibc <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc malloc reuse freed memory instead of returning it to the kernel; True when applied.

    Affects allocations made after the call, in this process and in processes it forks (DataLoader
    workers). A no-op (False) where the C library is not glibc, e.g. macOS or musl.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return False
    gnu_get_libc_version.restype = ctypes.c_char_p
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    if ok:
        logger.info(
            "CPU run: freed memory stays in the process for reuse (glibc %s mallopt; --cpu_reuse_memory false turns it off)",
            gnu_get_libc_version().decode(),
        )
    return ok


__all__ = ["keep_freed_memory"]

"""The preprocessing cache's options and folder (standard library only: every subcommand's parser imports it)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from xcft.options import option

__all__ = ["CACHE_ENV", "CacheOptions", "cache_dir"]

#: environment variable naming the cache folder (when --data_cache_dir is not given)
CACHE_ENV = "XCFT_DATA_CACHE"


@dataclass
class CacheOptions:
    """Where and how data files' preprocessing is cached (shared by train, check-data, inspect, eval and predict)."""

    data_cache_dir: str | None = option(
        None,
        "Folder of the preprocessing cache (default: $XCFT_DATA_CACHE, else ~/.cache/xcft/data); each data file is "
        "read, checked and tokenized once per tokenizer and settings, later runs map the result.",
    )
    no_data_cache: bool = option(False, "Read the data without the preprocessing cache (nothing is read from or written to it).")
    preprocessing_num_workers: int | None = option(
        None, "Processes that read and tokenize a data file when it is not cached yet (default: every CPU core)."
    )


def cache_dir(options: CacheOptions | None) -> Path | None:
    """The cache folder for ``options`` (None: the cache is off)."""
    if options is not None and options.no_data_cache:
        return None
    chosen = (options.data_cache_dir if options is not None else None) or os.environ.get(CACHE_ENV)
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "xcft" / "data"

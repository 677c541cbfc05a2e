"""The data pipeline: reading files, data.txt mixtures, encoding, dataset and collator.

Public entry points (see README "Training data"):

* :func:`build_dataset` / :class:`XComposerDataset` / :class:`DataCollator` for training;
* :func:`encode_conversation` / :class:`EncodedSample` for one sample;
* :func:`read_file` / :class:`Conversation` / :class:`Problem` for validation.

Names are imported lazily so that ``xcft.data.schema`` or ``xcft.data.encode`` can be used
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataCollator": "dataset",
    "FileData": "dataset",
    "XComposerDataset": "dataset",
    "build_dataset": "dataset",
    "read_data": "dataset",
    "IGNORE_INDEX": "encode",
    "EncodedSample": "encode",
    "encode_conversation": "encode",
    "slots_per_image": "encode",
    "DataSpec": "mixture",
    "Source": "mixture",
    "draw_count": "mixture",
    "epoch_draw": "mixture",
    "resolve_data": "mixture",
    "IMAGE_PLACEHOLDER": "schema",
    "Conversation": "schema",
    "Message": "schema",
    "Problem": "schema",
    "normalize_sample": "schema",
    "read_file": "schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"xcft.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'xcft.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

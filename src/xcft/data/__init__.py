"""The data pipeline: reading files, data.txt mixtures, encoding, dataset and collator.

Public entry points (see docs/data.md):

* :func:`build_dataset` / :class:`XComposerDataset` / :class:`DataCollator` for training;
* :func:`encode_conversation` / :class:`EncodedSample` for one sample;
* :func:`read_file` / :class:`Conversation` / :class:`Problem` for validation.
"""

from __future__ import annotations

from xcft.data.dataset import DataCollator, FileData, XComposerDataset, build_dataset, read_data
from xcft.data.encode import IGNORE_INDEX, EncodedSample, encode_conversation, slots_per_image
from xcft.data.mixture import DataSpec, Source, draw_count, epoch_draw, resolve_data
from xcft.data.schema import IMAGE_PLACEHOLDER, Conversation, Message, Problem, normalize_sample, read_file

__all__ = [
    "Conversation",
    "DataCollator",
    "DataSpec",
    "EncodedSample",
    "FileData",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "Message",
    "Problem",
    "Source",
    "XComposerDataset",
    "build_dataset",
    "draw_count",
    "encode_conversation",
    "epoch_draw",
    "normalize_sample",
    "read_data",
    "read_file",
    "resolve_data",
    "slots_per_image",
]

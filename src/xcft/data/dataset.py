"""Training dataset over the epoch's draw, and the batch collator.

Item and batch layout follow the batch contract in docs/ARCHITECTURE.md. Images are decoded in
``__getitem__`` so DataLoader workers decode them in parallel; the samples themselves are read,
validated and encoded once at build time (only their lengths are kept; ``__getitem__`` re-encodes,
which costs about a millisecond).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from xcft.data.encode import IGNORE_INDEX, IMAGE_SLOT, EncodedSample, TokenizerLike, encode_conversation
from xcft.data.mixture import DataSpec, draw_count, epoch_draw, load_spec
from xcft.data.schema import Conversation, raise_first, read_file
from xcft.errors import DataError
from xcft.model.image_processing_xcomposer2 import load_image

logger = logging.getLogger(__name__)


@dataclass
class FileData:
    """The usable samples of one data file, and how many an epoch draws from it."""

    display: str
    path: Path
    conversations: list[Conversation]  # trainable samples only, in file order
    lengths: list[int]  # encoded length (after truncation) of each of them
    draw_count: int
    skipped: int  # samples left with no supervised token after truncation


def read_data(data: str | Path, tokenizer: TokenizerLike, img_size: int, max_length: int, given_num: bool = True) -> list[FileData]:
    """Read, validate and encode every sample of a data.txt or a JSON file (raises DataError on bad data)."""
    spec: DataSpec = load_spec(data)
    files: list[FileData] = []
    for src in spec.sources:
        convs, problems = read_file(src.path, search_dirs=spec.search_dirs(src), display=src.display)
        raise_first(problems)
        keep: list[Conversation] = []
        lengths: list[int] = []
        skipped = 0
        for conv in convs:
            assert conv is not None
            enc = encode_conversation(conv, tokenizer, img_size, max_length)
            if enc.num_supervised == 0:
                skipped += 1
                logger.warning("%s: no supervised token left after truncation to %d tokens; skipped", conv.where, max_length)
                continue
            keep.append(conv)
            lengths.append(len(enc))
        if skipped:
            logger.warning("%s: %d sample(s) skipped (no supervised token within max_length=%d)", src.display, skipped, max_length)
        if convs and not keep:
            raise DataError(
                f"{src.display}: no sample keeps a supervised token within max_length={max_length} "
                f"(all {skipped} skipped). Fix: raise max_length (images take their slots in full) or shorten the samples"
            )
        count = draw_count(len(keep), src.number, given_num)
        files.append(FileData(src.display, src.path, keep, lengths, count, skipped))
    return files


class XComposerDataset(Dataset):
    """The samples drawn for the current epoch; ``set_epoch(e)`` redraws (same draw on every rank).

    ``__getitem__(i)`` returns ``input_ids``, ``labels``, ``image_mask`` ([L]) and ``pixel_values``
    ([n, 3, S, S], n may be 0) for the i-th drawn sample.
    """

    def __init__(
        self,
        files: Sequence[FileData],
        tokenizer: TokenizerLike,
        img_size: int,
        max_length: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        fast_jpeg: bool = False,
    ) -> None:
        self.files = list(files)
        self.tokenizer = tokenizer
        self.img_size = int(img_size)
        self.max_length = int(max_length)
        self.seed = int(seed)
        self.fast_jpeg = fast_jpeg
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(tokenizer.eos_token_id if pad is None else pad)
        if sum(f.draw_count for f in self.files) == 0:
            raise DataError("the data draws no sample per epoch (every count is 0 or every sample was skipped); check data.txt numbers")
        self.epoch = -1
        self.draw = np.zeros((0, 2), dtype=np.int64)
        self.set_epoch(epoch)

    # ------------------------------------------------------------------ epochs

    def set_epoch(self, epoch: int) -> None:
        """Redraw for ``epoch``: a pure function of (seed, epoch)."""
        epoch = int(epoch)
        if epoch == self.epoch:
            return
        self.epoch = epoch
        self.draw = epoch_draw(
            [f.draw_count for f in self.files], [len(f.conversations) for f in self.files], self.seed, epoch
        )

    def __len__(self) -> int:
        return len(self.draw)

    @property
    def lengths(self) -> list[int]:
        """Encoded length of each drawn item (for length grouping and packing)."""
        return [self.files[f].lengths[j] for f, j in self.draw.tolist()]

    @property
    def num_skipped(self) -> int:
        return sum(f.skipped for f in self.files)

    # ------------------------------------------------------------------ items

    def conversation(self, i: int) -> Conversation:
        f, j = self.draw[i]
        return self.files[int(f)].conversations[int(j)]

    def encode(self, i: int) -> tuple[Conversation, EncodedSample]:
        conv = self.conversation(i)
        return conv, encode_conversation(conv, self.tokenizer, self.img_size, self.max_length)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} drawn samples")
        conv, enc = self.encode(i)
        return make_item(conv, enc, self.pad_token_id, self.img_size, fast_jpeg=self.fast_jpeg)


def make_item(
    conv: Conversation, enc: EncodedSample, pad_token_id: int, img_size: int, *, fast_jpeg: bool = False
) -> dict[str, torch.Tensor]:
    """One encoded conversation as a batch-contract item (docs/ARCHITECTURE.md), its images decoded.

    Shared by the training dataset and ``xcft eval`` so both feed the model exactly the same tensors.
    """
    ids = torch.tensor(enc.input_ids, dtype=torch.long)
    mask = ids == IMAGE_SLOT
    ids[mask] = pad_token_id
    images = []
    for path in conv.images[: enc.num_images]:
        try:
            images.append(load_image(path, img_size, fast_jpeg=fast_jpeg))
        except Exception as exc:  # PIL raises many types for broken files
            raise DataError(f"{conv.where}: cannot decode image {path}: {exc}. Fix: replace or re-save the file") from exc
    if images:
        pixel_values = torch.from_numpy(np.stack(images))
    else:
        pixel_values = torch.zeros(0, 3, img_size, img_size)
    return {
        "input_ids": ids,
        "labels": torch.tensor(enc.labels, dtype=torch.long),
        "image_mask": mask,
        "pixel_values": pixel_values,
    }


def build_dataset(
    data_path: str | Path,
    tokenizer: TokenizerLike,
    img_size: int,
    max_length: int,
    given_num: bool = True,
    seed: int = 0,
    *,
    epoch: int = 0,
    fast_jpeg: bool = False,
) -> XComposerDataset:
    """Read a data.txt (or one JSON/JSONL file) and return the dataset for ``epoch``.

    Raises :class:`~xcft.errors.DataError` on the first bad sample (``xcft check-data`` lists them all).
    """
    files = read_data(data_path, tokenizer, img_size, max_length, given_num)
    ds = XComposerDataset(files, tokenizer, img_size, max_length, seed=seed, epoch=epoch, fast_jpeg=fast_jpeg)
    logger.info(
        "data: %d file(s), %d usable samples, %d drawn per epoch, %d skipped",
        len(files), sum(len(f.conversations) for f in files), len(ds), ds.num_skipped,
    )
    return ds


def pad_batch(features: Sequence[dict[str, Any]], pad_token_id: int, *, packed: bool = False) -> dict[str, Any]:
    """Right-pad items into one batch (the batch contract in docs/ARCHITECTURE.md).

    Unpacked: an ``attention_mask`` marks the real tokens. ``packed``: no mask; ``position_ids``
    restart at 0 for every sample of a row (an item without them is one sample) and the row's
    padding counts as a segment of its own, which selects block-diagonal attention in the model.
    """
    if not features:
        raise ValueError("cannot collate an empty batch")
    lengths = [int(f["input_ids"].shape[0]) for f in features]
    bsz, width = len(features), max(lengths)
    input_ids = torch.full((bsz, width), pad_token_id, dtype=torch.long)
    labels = torch.full((bsz, width), IGNORE_INDEX, dtype=torch.long)
    image_mask = torch.zeros((bsz, width), dtype=torch.bool)
    layout = torch.zeros((bsz, width), dtype=torch.long)  # attention_mask, or position_ids when packed
    pixels: list[torch.Tensor] = []
    counts: list[int] = []
    for b, (f, n) in enumerate(zip(features, lengths)):
        input_ids[b, :n] = f["input_ids"]
        labels[b, :n] = f["labels"]
        image_mask[b, :n] = f["image_mask"]
        if packed:
            pos = f.get("position_ids")
            layout[b, :n] = pos if pos is not None else torch.arange(n)
            layout[b, n:] = torch.arange(width - n)
        else:
            layout[b, :n] = 1
        pv = f.get("pixel_values")
        k = 0 if pv is None else int(pv.shape[0])
        if k:
            pixels.append(pv)
        counts.append(k)
    return {
        "input_ids": input_ids,
        "position_ids" if packed else "attention_mask": layout,
        "labels": labels,
        "image_mask": image_mask,
        "pixel_values": torch.cat(pixels, dim=0) if pixels else None,
        "image_counts": torch.tensor(counts, dtype=torch.long),
    }


@dataclass
class DataCollator:
    """Right-pads a list of items into a batch with an ``attention_mask`` (see :func:`pad_batch`)."""

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return pad_batch(features, self.pad_token_id)


__all__ = ["DataCollator", "pad_batch", "FileData", "XComposerDataset", "build_dataset", "read_data"]

"""Training dataset over the epoch's draw, and the batch collator.

Item and batch layout follow the batch contract in docs/ARCHITECTURE.md. Images are decoded in
``__getitem__`` so DataLoader workers decode them in parallel; the samples themselves are read,
validated and encoded once at build time (only their lengths are kept; ``__getitem__`` re-encodes,
which costs about a millisecond). For a 2.5 model (``hd_num`` set) each image's crop grid is read
from its file header at build time (no decoding) and kept, so the lengths are exact without
decoding; ``__getitem__`` then decodes the views and checks the grid.

Memory does not grow with the data: what is kept per sample is a few numpy columns mapped from
the preprocessing cache (:mod:`xcft.data.cache`), shared by DataLoader workers; ``__getitem__``
reads the sample's JSON record from its file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from xcft.data.cache_options import CacheOptions
from xcft.data.encode import IGNORE_INDEX, IMAGE_SLOT, EncodedSample, Grid, ImageSpec, TokenizerLike, encode_conversation
from xcft.data.mixture import epoch_draw
from xcft.data.read_pass import FileSamples, read_pass
from xcft.data.schema import Conversation, raise_first
from xcft.data.table import SampleView
from xcft.errors import DataError
from xcft.model.image_processing_xcomposer2 import load_hd_views, load_image

logger = logging.getLogger(__name__)

#: item and batch key of the per-position source file index (a model forward argument; -1: none)
LOSS_GROUPS = "loss_groups"


@dataclass
class FileData:
    """The usable samples of one data file, and how many an epoch draws from it.

    ``conversations`` and ``grids`` are sequences read on access (:class:`~xcft.data.table.SampleView`
    over the file's table, or plain lists); ``lengths`` an array.
    """

    display: str
    path: Path
    conversations: Sequence[Conversation]  # trainable samples only, in file order
    lengths: np.ndarray  # encoded length (after truncation) of each of them
    draw_count: int
    skipped: int  # samples left with no supervised token after truncation
    grids: Sequence[list[Grid]] = field(default_factory=list)  # 2.5: each sample's image crop grids (empty for 2.0)
    # preference data: the rejected conversation of each pair (``conversations`` holds the chosen ones)
    rejected: Sequence[Conversation] = field(default_factory=list)

    def subset(self, positions: Sequence[int], **changes: Any) -> FileData:
        """The samples at ``positions`` (their lengths and crop grids with them)."""
        idx = np.asarray(positions, dtype=np.int64)
        return replace(
            self,
            conversations=_take(self.conversations, idx),
            lengths=np.asarray(self.lengths)[idx],
            grids=_take(self.grids, idx) if len(self.grids) else [],
            rejected=_take(self.rejected, idx) if len(self.rejected) else [],
            **changes,
        )

    def image_grids(self) -> tuple[np.ndarray, np.ndarray]:
        """Each sample's image count, and every image's crop grid in sample order ([M, 2]; (0, 0) for 2.0).

        Read from the table's columns when the samples are a view of one (no record is read), so
        a planner can look at every sample of a large set at startup.
        """
        view = self.conversations
        if isinstance(view, SampleView):
            off = np.asarray(view.table.img_off)
            counts = off[view.rows + 1] - off[view.rows]
            firsts = np.repeat(off[view.rows] - np.cumsum(counts) + counts, counts)
            images = firsts + np.arange(int(counts.sum()))
            return counts, np.asarray(view.table.grid)[images].astype(np.int64).reshape(-1, 2)
        counts = np.asarray([len(c.images) for c in view], dtype=np.int64)
        if len(self.grids):
            grids = [g for sample in self.grids for g in sample]
        else:
            grids = [(0, 0)] * int(counts.sum())
        return counts, np.asarray(grids, dtype=np.int64).reshape(-1, 2)


def _take(seq: Sequence[Any], idx: np.ndarray) -> Sequence[Any]:
    return seq.take(idx) if isinstance(seq, SampleView) else [seq[i] for i in idx.tolist()]


def read_data(
    data: str | Path,
    tokenizer: TokenizerLike,
    img_size: int,
    max_length: int,
    given_num: bool = True,
    *,
    hd_num: int | None = None,
    cache: CacheOptions | None = None,
) -> list[FileData]:
    """The training samples of a data.txt or a JSON file (:func:`~xcft.data.read_pass.read_pass`); DataError on bad data.

    ``hd_num`` set: a 2.5 model's data (crop grids read from the image headers at that budget).
    Stops at the first error (``xcft check-data`` lists them all); warnings (a sample left with no
    supervised token, which is skipped) are logged. ``cache``: the preprocessing cache's options.
    """
    found = read_pass(data, tokenizer, ImageSpec(int(img_size), hd_num), max_length, given_num, cache=cache)
    if found.is_preference:
        raise DataError(
            f"{data} holds preference pairs (conversations_a/conversations_b or chosen/rejected), not conversations. "
            "Fix: train on them with --stage dpo or --stage rm"
        )
    raise_first(found.problems)
    for problem in found.problems:
        if problem.level == "warning":  # skipped samples, a number that draws nothing
            logger.warning("%s", problem)
    files: list[FileData] = []
    for fs in found.files:
        if fs.skipped:
            logger.warning(
                "%s: %d sample(s) skipped (no supervised token within max_length=%d)", fs.source.display, fs.skipped, max_length
            )
        files.append(file_data(fs, hd_num))
    return files


def file_data(fs: FileSamples, hd_num: int | None, *, pairs: bool = False) -> FileData:
    """The usable samples of one file of the read pass, read from their records on access (``pairs``: with the rejected sides)."""
    usable = fs.usable_index
    return FileData(
        fs.source.display,
        fs.source.path,
        SampleView(fs.table, usable),
        np.asarray(fs.table.length[usable]),
        fs.draw_count,
        fs.skipped,
        SampleView(fs.table, usable, grids=True) if hd_num is not None else [],
        SampleView(fs.table, usable, kind="rejected") if pairs else [],
    )


class XComposerDataset(Dataset):
    """The samples drawn for the current epoch; ``set_epoch(e)`` redraws (same draw on every rank).

    ``every_sample``: no draw; every sample once, in file order (evaluation).

    ``__getitem__(i)`` returns ``input_ids``, ``labels``, ``image_mask``, ``loss_groups`` (the
    sample's file index at every position, for per-source losses) ([L]) and ``pixel_values``
    ([n, 3, S, S], n may be 0) for the i-th drawn sample; with ``hd_num`` (2.5) ``pixel_values``
    holds every view of the sample's images ([V, 3, S, S]) and ``image_grids`` ([n, 2]) their crop grids.
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
        hd_num: int | None = None,
        every_sample: bool = False,
    ) -> None:
        self.files = list(files)
        self.every_sample = every_sample
        self.tokenizer = tokenizer
        self.img_size = int(img_size)
        self.hd_num = hd_num
        self.image_spec = ImageSpec(self.img_size, hd_num)
        if hd_num is not None and any(len(f.grids) != len(f.conversations) for f in self.files):
            raise ValueError("2.5 data needs the crop grids of every sample: read it with read_data(..., hd_num=...)")
        self.max_length = int(max_length)
        self.seed = int(seed)
        self.fast_jpeg = fast_jpeg
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(tokenizer.eos_token_id if pad is None else pad)
        if sum(len(f.conversations) if every_sample else f.draw_count for f in self.files) == 0:
            raise DataError(
                "the data draws no sample per epoch (every count is 0 or every sample was skipped); check data.txt numbers"
            )
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
        if self.every_sample:
            parts = [
                np.stack([np.full(len(fd.lengths), f), np.arange(len(fd.lengths))], axis=1) for f, fd in enumerate(self.files)
            ]
            self.draw = np.concatenate(parts).astype(np.int64).reshape(-1, 2) if parts else np.zeros((0, 2), np.int64)
            return
        self.draw = epoch_draw([f.draw_count for f in self.files], [len(f.conversations) for f in self.files], self.seed, epoch)

    def __len__(self) -> int:
        return len(self.draw)

    @property
    def lengths(self) -> list[int]:
        """Encoded length of each drawn item (for length grouping and packing)."""
        return self.draw_lengths.tolist()

    @property
    def draw_lengths(self) -> np.ndarray:
        """:attr:`lengths` as an array."""
        out = np.zeros(len(self.draw), dtype=np.int64)
        for f, fd in enumerate(self.files):
            rows = self.draw[:, 0] == f
            out[rows] = np.asarray(fd.lengths)[self.draw[rows, 1]]
        return out

    def source(self, i: int) -> int:
        """The file (its index in the data.txt order) the i-th drawn sample comes from."""
        return int(self.draw[i, 0])

    @property
    def source_names(self) -> list[str]:
        return [f.display for f in self.files]

    @property
    def num_skipped(self) -> int:
        return sum(f.skipped for f in self.files)

    # ------------------------------------------------------------------ items

    def conversation(self, i: int) -> Conversation:
        f, j = self.draw[i]
        return self.files[int(f)].conversations[int(j)]

    def encode(self, i: int) -> tuple[Conversation, EncodedSample]:
        f, j = (int(x) for x in self.draw[i])
        conv = self.files[f].conversations[j]
        grids = self.files[f].grids[j] if self.image_spec.hd else None
        return conv, encode_conversation(conv, self.tokenizer, self.image_spec, self.max_length, grids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} drawn samples")
        conv, enc = self.encode(i)
        item = make_item(conv, enc, self.pad_token_id, self.img_size, fast_jpeg=self.fast_jpeg, hd_num=self.hd_num)
        item[LOSS_GROUPS] = torch.full_like(item["input_ids"], self.source(i))
        return item


def make_item(
    conv: Conversation,
    enc: EncodedSample,
    pad_token_id: int,
    img_size: int,
    *,
    fast_jpeg: bool = False,
    hd_num: int | None = None,
) -> dict[str, torch.Tensor]:
    """One encoded conversation as a batch-contract item (docs/ARCHITECTURE.md), its images decoded.

    Shared by the training dataset and ``xcft eval`` so both feed the model exactly the same tensors.
    ``hd_num`` (2.5): the images' HD views and crop grids (``fast_jpeg`` does not apply: a reduced
    decode would change the grid).
    """
    ids = torch.tensor(enc.input_ids, dtype=torch.long)
    mask = ids == IMAGE_SLOT
    ids[mask] = pad_token_id
    item = {"input_ids": ids, "labels": torch.tensor(enc.labels, dtype=torch.long), "image_mask": mask}
    if hd_num is not None:
        return {**item, **_hd_pixels(conv, enc, img_size, hd_num)}
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
    return {**item, "pixel_values": pixel_values}


def _hd_pixels(conv: Conversation, enc: EncodedSample, img_size: int, hd_num: int) -> dict[str, torch.Tensor]:
    """2.5: ``pixel_values`` [V, 3, S, S] (per kept image its global view then its crops) and ``image_grids`` [n, 2]."""
    views: list[torch.Tensor] = []
    for path, grid in zip(conv.images[: enc.num_images], enc.image_grids):
        try:
            image_views, got = load_hd_views(path, hd_num, view_size=img_size)
        except Exception as exc:  # PIL raises many types for broken files
            raise DataError(f"{conv.where}: cannot decode image {path}: {exc}. Fix: replace or re-save the file") from exc
        if tuple(got) != tuple(grid):
            raise DataError(
                f"{conv.where}: image {path} decodes to a {got[0]}x{got[1]} crop grid but its header gave {grid[0]}x{grid[1]} "
                "(the file changed while training?). Fix: restart so the data is read again"
            )
        views.append(image_views)
    pixel_values = torch.cat(views, dim=0) if views else torch.zeros(0, 3, img_size, img_size)
    grids = torch.tensor(enc.image_grids, dtype=torch.long).reshape(-1, 2)
    return {"pixel_values": pixel_values, "image_grids": grids}


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
    hd_num: int | None = None,
    cache: CacheOptions | None = None,
) -> XComposerDataset:
    """Read a data.txt (or one JSON/JSONL file) and return the dataset for ``epoch``.

    ``hd_num``: the crop budget of a 2.5 model (None for 2.0). Raises
    :class:`~xcft.errors.DataError` on the first bad sample (``xcft check-data`` lists them all).
    """
    files = read_data(data_path, tokenizer, img_size, max_length, given_num, hd_num=hd_num, cache=cache)
    ds = XComposerDataset(files, tokenizer, img_size, max_length, seed=seed, epoch=epoch, fast_jpeg=fast_jpeg, hd_num=hd_num)
    logger.info(
        "data: %d file(s), %d usable samples, %d drawn per epoch, %d skipped",
        len(files),
        sum(len(f.conversations) for f in files),
        len(ds),
        ds.num_skipped,
    )
    return ds


def pad_batch(features: Sequence[dict[str, Any]], pad_token_id: int, *, packed: bool = False) -> dict[str, Any]:
    """Right-pad items into one batch (the batch contract in docs/ARCHITECTURE.md).

    2.5 items (with ``image_grids``): ``pixel_values`` concatenates every view in row order,
    ``image_grids`` [N, 2] every image's crop grid in the same order, ``image_counts`` counts images.

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
    grids: list[torch.Tensor] = []
    counts: list[int] = []
    hd = any("image_grids" in f for f in features)
    groups = torch.full((bsz, width), -1, dtype=torch.long) if all(LOSS_GROUPS in f for f in features) else None
    for b, (f, n) in enumerate(zip(features, lengths)):
        input_ids[b, :n] = f["input_ids"]
        labels[b, :n] = f["labels"]
        image_mask[b, :n] = f["image_mask"]
        if groups is not None:  # an item's source at each of its positions (also at tokens appended to it later)
            g = f[LOSS_GROUPS]
            groups[b, :n] = g if g.shape[0] == n else g[:1].expand(n)
        if packed:
            pos = f.get("position_ids")
            layout[b, :n] = pos if pos is not None else torch.arange(n)
            layout[b, n:] = torch.arange(width - n)
        else:
            layout[b, :n] = 1
        pv = f.get("pixel_values")
        if hd:  # 2.5: pixel_values are views; the images are the rows of image_grids
            g = f.get("image_grids")
            k = 0 if g is None else int(g.shape[0])
            if g is not None and k:
                assert pv is not None, "a 2.5 item with images carries the pixel_values of their views"
                grids.append(g)
                pixels.append(pv)
        else:
            k = 0 if pv is None else int(pv.shape[0])
            if pv is not None and k:
                pixels.append(pv)
        counts.append(k)
    batch = {
        "input_ids": input_ids,
        "position_ids" if packed else "attention_mask": layout,
        "labels": labels,
        "image_mask": image_mask,
        "pixel_values": torch.cat(pixels, dim=0) if pixels else None,
        "image_counts": torch.tensor(counts, dtype=torch.long),
    }
    if hd:
        batch["image_grids"] = torch.cat(grids, dim=0) if grids else None
    if groups is not None:
        batch[LOSS_GROUPS] = groups
    return batch


@dataclass
class DataCollator:
    """Right-pads a list of items into a batch with an ``attention_mask`` (see :func:`pad_batch`)."""

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return pad_batch(features, self.pad_token_id)


__all__ = [
    "LOSS_GROUPS",
    "DataCollator",
    "FileData",
    "XComposerDataset",
    "build_dataset",
    "file_data",
    "make_item",
    "pad_batch",
    "read_data",
]

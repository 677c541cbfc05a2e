"""Sequence packing and length-grouped batching.

Packing (``--packing``): :class:`PackedDataset` groups the samples drawn for an epoch into rows of
at most ``max_length`` positions (every sample trained once per epoch, as unpacked), and
``per_device_train_batch_size`` then counts rows. Each sample keeps its own positions
(``position_ids`` restart at 0) and :class:`PackingCollator` sends no ``attention_mask``: the model
(transformers' mask builder on CPU / SDPA, variable-length flash attention on a GPU) reads the
restarts in ``position_ids`` as sample boundaries and attends block-diagonally, causal inside each
sample, never across samples. Row padding is one more such segment, so it attends only to itself
and carries no label. The first label of every sample is -100 (unpacked, the model's shift by one
never uses it either), so the last token of a sample never learns to predict the next sample.
The loss is therefore the unpacked loss over the same samples; ``image_mask`` (the Partial-LoRA
mask) and ``pixel_values`` follow every sample.

Length grouping (``--group_by_length``, unpacked runs): :class:`LengthGroupedSampler` puts samples
of similar length in the same batch, reading the lengths from the dataset each epoch (the data.txt
draw changes every epoch), without decoding any image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from xcft.data.dataset import LOSS_GROUPS, DataCollator, pad_batch
from xcft.data.encode import IGNORE_INDEX

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- packing plan


def pack_indices(lengths: Sequence[int], max_length: int, window: int = 64) -> list[list[int]]:
    """Group sample indices (in their order) into packs of at most ``max_length`` positions.

    Online best fit over a window of open packs: each sample goes to the open pack it fills best;
    when none has room a pack is opened, and beyond ``window`` open packs the fullest is closed.
    This keeps the (already shuffled) draw order roughly intact, packs tightly, and costs
    O(samples × window). A sample of ``max_length`` or more is a pack of its own. Packs are
    returned ordered by their first sample.
    """
    max_length = int(max_length)
    closed: list[list[int]] = []
    open_packs: list[list[int]] = []
    loads: list[int] = []
    for i, n in enumerate(int(x) for x in lengths):
        if n >= max_length:
            closed.append([i])
            continue
        best, room = -1, max_length + 1
        for j, load in enumerate(loads):
            left = max_length - load - n
            if 0 <= left < room:
                best, room = j, left
        if best < 0:
            open_packs.append([i])
            loads.append(n)
            if len(open_packs) > window:
                j = max(range(len(loads)), key=lambda r: loads[r])
                closed.append(open_packs.pop(j))
                loads.pop(j)
        else:
            open_packs[best].append(i)
            loads[best] += n
            if loads[best] == max_length:
                closed.append(open_packs.pop(best))
                loads.pop(best)
    closed.extend(open_packs)
    closed.sort(key=lambda pack: pack[0])
    return closed


def concat_items(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Several dataset items as one packed item: concatenated, ``position_ids`` restarting per sample.

    The first label of every sample is set to -100 (it is never a target unpacked either), so no
    position learns to predict the next sample's first token. 2.5 items' ``image_grids`` are
    concatenated in the order of their views.
    """
    if not items:
        raise ValueError("cannot pack zero samples")
    labels = []
    for it in items:
        lab = it["labels"].clone()
        lab[0] = IGNORE_INDEX
        labels.append(lab)
    pixels = [pv for pv in (_pixels(it) for it in items) if pv is not None]
    ref = items[0].get("pixel_values")
    if pixels:
        pixel_values = torch.cat(pixels, dim=0)
    elif ref is not None:
        pixel_values = ref[:0]
    else:
        pixel_values = None
    out = {
        "input_ids": torch.cat([it["input_ids"] for it in items]),
        "labels": torch.cat(labels),
        "image_mask": torch.cat([it["image_mask"] for it in items]),
        "position_ids": torch.cat([_positions(it) for it in items]),
    }
    if all(LOSS_GROUPS in it for it in items):
        out[LOSS_GROUPS] = torch.cat([it[LOSS_GROUPS] for it in items])
    if pixel_values is not None:
        out["pixel_values"] = pixel_values
    if any("image_grids" in it for it in items):  # 2.5: every image's crop grid, in the order of the views
        out["image_grids"] = torch.cat([it["image_grids"].reshape(-1, 2) for it in items if "image_grids" in it])
    return out


def _positions(item: dict[str, Any]) -> torch.Tensor:
    pos = item.get("position_ids")
    return pos if pos is not None else torch.arange(int(item["input_ids"].shape[0]))


def _pixels(feature: dict[str, Any]) -> torch.Tensor | None:
    pv = feature.get("pixel_values")
    return pv if pv is not None and int(pv.shape[0]) > 0 else None


class PackedDataset(Dataset):
    """Packs of the samples an :class:`~xcft.data.dataset.XComposerDataset` draws this epoch.

    Item ``p`` is :func:`concat_items` of the samples of pack ``p`` (planned by :func:`pack_indices`
    over the epoch's draw, so every drawn sample is trained exactly once per epoch). ``set_epoch``
    redraws the base data set and re-plans; ``lengths`` are the pack lengths.
    """

    def __init__(self, base: Any, max_length: int, *, window: int = 64) -> None:
        self.base = base
        self.max_length = int(max_length)
        self.window = int(window)
        self.packs: list[list[int]] = []
        self._planned_epoch: Any = object()
        self._plan()

    def _plan(self) -> None:
        self.packs = pack_indices(self.base.lengths, self.max_length, self.window)
        self._planned_epoch = getattr(self.base, "epoch", None)
        n = sum(len(p) for p in self.packs)
        logger.info("packing: %d samples in %d rows of at most %d positions", n, len(self.packs), self.max_length)

    @property
    def epoch(self) -> Any:
        return getattr(self.base, "epoch", None)

    @property
    def pad_token_id(self) -> Any:
        return getattr(self.base, "pad_token_id", None)

    @property
    def num_skipped(self) -> int:
        return int(getattr(self.base, "num_skipped", 0))

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)
        if getattr(self.base, "epoch", None) != self._planned_epoch:
            self._plan()

    def __len__(self) -> int:
        return len(self.packs)

    @property
    def lengths(self) -> list[int]:
        base = self.base.lengths
        return [sum(base[i] for i in pack) for pack in self.packs]

    @property
    def num_samples(self) -> int:
        return sum(len(p) for p in self.packs)

    def __getitem__(self, p: int) -> dict[str, torch.Tensor]:
        if getattr(self.base, "epoch", None) != self._planned_epoch:
            self._plan()
        return concat_items([self.base[i] for i in self.packs[p]])


# --------------------------------------------------------------------------- collators


@dataclass
class PackingCollator:
    """Right-pads packed items into a batch: one row per item, no ``attention_mask``.

    Returns ``input_ids``, ``labels``, ``image_mask``, ``position_ids`` ([rows, width]),
    ``pixel_values`` (every image in row-major order, None without images) and ``image_counts``
    ([rows]). The missing ``attention_mask`` is on purpose: the restarts in ``position_ids`` then
    select block-diagonal attention. Row padding gets positions 0, 1, ... (a segment of its own),
    label -100 and the pad id. Items without ``position_ids`` (e.g. an unpacked eval set) are
    one sample each, so this collator also batches them correctly.
    """

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return pad_batch(features, self.pad_token_id, packed=True)


def make_collator(pad_token_id: int, *, packing: bool = False) -> Any:
    """The training collator: :class:`PackingCollator` with ``packing``, else the padding ``DataCollator``."""
    if packing:
        return PackingCollator(pad_token_id=int(pad_token_id))
    return DataCollator(pad_token_id=int(pad_token_id))


def count_samples(item: dict[str, Any]) -> int:
    """Samples in a (possibly packed) dataset item: the restarts of its positions."""
    pos = item.get("position_ids")
    return 1 if pos is None else int((pos == 0).sum())


# --------------------------------------------------------------------------- length grouping


class LengthGroupedSampler(Sampler[int]):
    """Random order in which each batch holds samples of similar length (less padding without packing).

    As in the usual recipe: shuffle, cut into mega-batches of ``mega_batch_mult`` batches, sort each
    mega-batch by length (longest first) and move the batch holding the longest sample to the front,
    so an out-of-memory shows at the first step. Lengths are read from ``dataset.lengths`` at every
    epoch (no image is decoded); the order is a pure function of ``(seed, epoch)``.
    """

    def __init__(self, dataset: Any, batch_size: int, *, seed: int = 0, mega_batch_mult: int = 50) -> None:
        if not hasattr(dataset, "lengths"):
            raise TypeError("LengthGroupedSampler needs a dataset with a 'lengths' attribute")
        self.dataset = dataset
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self.mega_batch_mult = max(1, int(mega_batch_mult))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        lengths = list(self.dataset.lengths)
        epoch = max(self.epoch, int(getattr(self.dataset, "epoch", 0) or 0))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(lengths), generator=gen).tolist()
        mega = self.batch_size * self.mega_batch_mult
        groups = [sorted(order[i : i + mega], key=lambda j: -lengths[j]) for i in range(0, len(order), mega)]
        batches = [g[i : i + self.batch_size] for g in groups for i in range(0, len(g), self.batch_size)]
        if batches:
            longest = max(range(len(batches)), key=lambda b: max(lengths[j] for j in batches[b]))
            batches[0], batches[longest] = batches[longest], batches[0]
        for b in batches:
            yield from b


__all__ = [
    "LengthGroupedSampler",
    "PackedDataset",
    "PackingCollator",
    "concat_items",
    "count_samples",
    "make_collator",
    "pack_indices",
]

"""Training / evaluation inputs of an ``xcft train`` run: datasets and collator (on top of :mod:`xcft.data`)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from xcft.data.dataset import LOSS_GROUPS, DataCollator, XComposerDataset, read_data
from xcft.data.mixture import draw_count, load_spec
from xcft.data.packing import PackedDataset, PackingCollator
from xcft.data.sizes import Sizes, model_sizes, resolve_sizes
from xcft.errors import XcftError
from xcft.model.loading import unwrap_model

if TYPE_CHECKING:
    from xcft.model.modeling_xcomposer2 import XComposer2ForCausalLM

logger = logging.getLogger(__name__)


def resolve_run_sizes(cfg: Any, model_config: Any) -> Sizes:
    """The run's sizes: ``--img_size``/``--resolution``, ``--max_length``, ``--hd_num`` settled against the model."""
    data = cfg.data
    img_flag = "--resolution" if getattr(data, "resolution", None) is not None else "--img_size"
    return resolve_sizes(model_sizes(model_config), data.img_size, data.max_length, data.hd_num, style="_", img_flag=img_flag)


def split_holdout(files: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``fraction`` of each file's samples (seeded, at least one when the file has two or more).

    Returns (train_files, eval_files) as :class:`xcft.data.dataset.FileData` lists; eval files draw
    each of their samples once; train files keep their draw count.
    """
    rng = np.random.default_rng(seed)
    train, held = [], []
    for fd in files:
        n = len(fd.conversations)
        k = round(n * fraction)
        if n >= 2:
            k = min(max(k, 1), n - 1)
        else:
            k = 0
        order = rng.permutation(n)
        hold = set(order[:k].tolist())
        keep_idx = [i for i in range(n) if i not in hold]
        hold_idx = sorted(hold)
        train.append(_subset(fd, keep_idx))
        if hold_idx:
            held.append(_subset(fd, hold_idx, draw_count=len(hold_idx), skipped=0))
    return train, held


def _subset(fd: Any, indices: list[int], **changes: Any) -> Any:
    """The samples ``indices`` of a :class:`~xcft.data.dataset.FileData`, with their lengths and crop grids."""
    return fd.subset(indices, **changes)


def _redo_counts(files: list[Any], data_path: str, given_num: bool) -> list[Any]:
    """Recompute each file's per-epoch draw for its (smaller) training part (ratios apply to what is left)."""
    sources = load_spec(data_path).sources
    if len(sources) != len(files):
        return files
    return [
        dataclasses.replace(fd, draw_count=draw_count(len(fd.conversations), src.number, given_num))
        for fd, src in zip(files, sources)
    ]


def build_datasets(cfg: Any, tokenizer: Any, model_config: Any, files: Any = None) -> tuple[Any, Any | None, Any]:
    """(train dataset, eval dataset or None, collator) for a :class:`~xcft.train.args.TrainConfig`.

    ``files``: ``(FileData list, (img_size, max_length, hd_num))`` already read for the memory plan;
    used when read with the same sizes, so the data is read once.
    """
    sizes = resolve_run_sizes(cfg, model_config)
    img_size, max_length, hd_num = sizes.img_size, sizes.max_length, sizes.hd_num
    seed = cfg.training.data_seed if cfg.training.data_seed is not None else cfg.training.seed
    if files is not None and files[1] == (img_size, max_length, hd_num):
        files = files[0]
    else:
        files = read_data(cfg.data.data_path, tokenizer, img_size, max_length, cfg.data.given_num, hd_num=hd_num, cache=cfg.data)
    eval_ds = None
    if cfg.data.eval_data_path:
        eval_files = read_data(
            cfg.data.eval_data_path, tokenizer, img_size, max_length, cfg.data.given_num, hd_num=hd_num, cache=cfg.data
        )
        eval_ds = XComposerDataset(eval_files, tokenizer, img_size, max_length, seed=seed, epoch=0, hd_num=hd_num)
        if cfg.data.eval_split > 0:
            logger.info("--eval_data_path given: --eval_split %s is not used", cfg.data.eval_split)
    elif cfg.data.eval_split > 0:
        files, held = split_holdout(files, cfg.data.eval_split, seed)
        if not held:
            raise XcftError(
                f"--eval_split {cfg.data.eval_split} holds out no sample (every file of {cfg.data.data_path} has "
                "fewer than two usable samples); pass --eval_data_path instead"
            )
        files = _redo_counts(files, cfg.data.data_path, cfg.data.given_num)
        eval_ds = XComposerDataset(held, tokenizer, img_size, max_length, seed=seed, epoch=0, hd_num=hd_num)
    train_ds: XComposerDataset | PackedDataset = XComposerDataset(
        files, tokenizer, img_size, max_length, seed=seed, epoch=0, hd_num=hd_num
    )
    logger.info(
        "data: %d training samples per epoch (img_size %d%s, max_length %d)%s",
        len(train_ds),
        img_size,
        f", hd_num {hd_num}" if hd_num is not None else "",
        max_length,
        f", {len(eval_ds)} eval samples" if eval_ds is not None else "",
    )
    collator: DataCollator | PackingCollator = DataCollator(pad_token_id=train_ds.pad_token_id)
    if cfg.data.packing:  # packed rows, block-diagonal attention
        train_ds = PackedDataset(train_ds, max_length)
        collator = PackingCollator(pad_token_id=train_ds.pad_token_id)  # also batches the unpacked eval set
    return train_ds, eval_ds, collator


def source_names(dataset: Any) -> list[str]:
    """The data files of a training or eval dataset (packed or not), in the order of its ``loss_groups`` ids."""
    if dataset is None:
        return []
    base = getattr(dataset, "base", dataset)
    return list(getattr(base, "source_names", []))


@dataclass
class VisionAlignedCollator:
    """Gives every batch at least one image, so every rank runs the vision tower at every step.

    DeepSpeed ZeRO-3 and FSDP gather a module's sharded parameters when it runs (a collective),
    and ZeRO reduces gradients in fixed buckets: when one rank's batch has images and another's
    has none, the ranks' collectives stop matching and the run hangs or aborts. A batch without
    images gets one blank image appended at the end of its longest row: ``slots`` extra
    positions with label -100, after every real token of that row. With causal attention no
    earlier position sees them, so the loss and every gradient are unchanged (the vision
    parameters get an exact zero gradient); the cost is one image's worth of extra positions.
    For a 2.5 model (``blank_grid`` set, normally (1, 1)) the blank image is that crop grid: its
    global view plus its crops, and ``image_grids`` names it.
    """

    collator: Any
    img_size: int
    slots: int
    pad_token_id: int
    blank_grid: tuple[int, int] | None = None

    def __call__(self, features: Any) -> dict[str, Any]:
        batch = self.collator(features)
        pixels = batch.get("pixel_values")
        if pixels is not None and pixels.shape[0] > 0:
            return batch
        ids, labels, image_mask = batch["input_ids"], batch["labels"], batch["image_mask"]
        packed = "attention_mask" not in batch  # PackingCollator: segments by position_ids, no mask
        mask = torch.ones_like(ids) if packed else batch["attention_mask"]
        bsz, width = ids.shape
        row = int(mask.sum(dim=1).argmax())  # a longest row: its tokens fill the whole width
        extra = self.slots

        def widen(t: torch.Tensor, fill: Any) -> torch.Tensor:
            return torch.cat([t, torch.full((bsz, extra), fill, dtype=t.dtype)], dim=1)

        batch["input_ids"] = widen(ids, self.pad_token_id)
        batch["labels"] = widen(labels, -100)
        if packed:  # the blank image is a segment of its own (positions restart), unseen by every sample
            batch["position_ids"] = torch.cat([batch["position_ids"], torch.arange(extra).expand(bsz, extra)], dim=1)
        else:
            new_mask = widen(mask, 0)
            new_mask[row, width:] = 1
            batch["attention_mask"] = new_mask
        if batch.get(LOSS_GROUPS) is not None:
            batch[LOSS_GROUPS] = widen(batch[LOSS_GROUPS], -1)
        new_image_mask = widen(image_mask, False)
        new_image_mask[row, width:] = True
        batch["image_mask"] = new_image_mask
        views = 1 if self.blank_grid is None else 1 + self.blank_grid[0] * self.blank_grid[1]
        batch["pixel_values"] = torch.zeros(views, 3, self.img_size, self.img_size)
        if self.blank_grid is not None:
            batch["image_grids"] = torch.tensor([self.blank_grid], dtype=torch.long)
        counts = torch.zeros(bsz, dtype=torch.long)
        counts[row] = 1
        batch["image_counts"] = counts
        return batch


def vision_aligned(collator: Any, model_config: Any, pad_token_id: int) -> VisionAlignedCollator:
    """:class:`VisionAlignedCollator` for a model: one 2.0 image, or a 2.5 image with a 1x1 crop grid."""
    if getattr(model_config, "hd", False):
        return VisionAlignedCollator(
            collator, int(model_config.img_size), int(model_config.hd_image_tokens(1, 1)), pad_token_id, blank_grid=(1, 1)
        )
    return VisionAlignedCollator(collator, int(model_config.img_size), int(model_config.image_tokens), pad_token_id)


def needs_vision_alignment(training_args: Any, model: Any) -> bool:
    """True when ranks must run the vision tower in lockstep (see :class:`VisionAlignedCollator`)."""
    if training_args.world_size <= 1:
        return False
    if training_args.fsdp:
        return True
    ds = getattr(training_args, "hf_deepspeed_config", None)
    if ds is None:
        return False
    if ds.is_zero3():
        return True
    base = cast("XComposer2ForCausalLM", unwrap_model(model))
    return any(p.requires_grad for p in base.vit.parameters()) or any(p.requires_grad for p in base.vision_proj.parameters())

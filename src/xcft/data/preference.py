"""Preference pairs for training: the training pairs of a data set, their dataset and the pair collator.

Reading, checking and encoding a pair are :mod:`xcft.data.pairs`; the one read pass over a data set
(:mod:`xcft.data.read_pass`) handles pair files as it handles SFT files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xcft.data.cache_options import CacheOptions
from xcft.data.dataset import FileData, XComposerDataset, file_data, make_item, pad_batch
from xcft.data.encode import IGNORE_INDEX, ImageSpec, TokenizerLike
from xcft.data.pairs import EncodedPair, PreferencePair, encode_pair, not_a_pair
from xcft.data.read_pass import read_pass
from xcft.data.schema import raise_first
from xcft.errors import DataError

logger = logging.getLogger(__name__)


def read_pair_data(
    data: str | Path,
    tokenizer: TokenizerLike,
    img_size: int,
    max_length: int,
    given_num: bool = True,
    *,
    hd_num: int | None = None,
    cache: CacheOptions | None = None,
) -> list[FileData]:
    """The training pairs of a data.txt or a JSON file (the read pass); DataError on bad data or SFT data.

    Returns :class:`FileData` whose ``conversations`` are the chosen and ``rejected`` the rejected
    conversations; ``lengths`` are the pair's two sequence lengths added (what one pair costs).
    """
    found = read_pass(data, tokenizer, ImageSpec(int(img_size), hd_num), max_length, given_num, cache=cache)
    for fs in found.files:
        if not fs.pairs and len(fs.table):
            first = fs.table.conversation(0)
            record = {"id": first.id} if first is not None else None
            raise DataError(str(not_a_pair(fs.source.display, 0, record)) + " (a preference stage needs pairs in every file)")
    raise_first(found.problems)
    for problem in found.problems:
        if problem.level == "warning":  # skipped pairs, a number that draws nothing
            logger.warning("%s", problem)
    return [file_data(fs, hd_num, pairs=True) for fs in found.files]


class PreferenceDataset(XComposerDataset):
    """The pairs drawn for the current epoch (same draw rules as SFT data).

    An item holds ``chosen_*`` and ``rejected_*`` sequences (``input_ids``, ``labels``,
    ``image_mask``), the pair's images once (``pixel_values``, 2.5: ``image_grids``) and
    ``pair_key`` [2] = (file, sample) for reference log-probs computed ahead of training.
    """

    def __init__(self, files: Sequence[FileData], *args: Any, end_token: int | None = None, **kwargs: Any) -> None:
        if any(len(f.rejected) != len(f.conversations) for f in files):
            raise ValueError("preference data needs the rejected side of every pair: read it with read_pair_data")
        super().__init__(files, *args, **kwargs)
        #: a token appended to both sequences after their EOS (the reward model's reward token), unscored
        self.end_token = end_token
        #: reference log-probs (chosen, rejected) per file and pair, once computed (precompute_ref_log_probs)
        self.ref_logps: list[np.ndarray] | None = None

    def pair(self, i: int) -> PreferencePair:
        f, j = (int(x) for x in self.draw[i])
        return PreferencePair(self.files[f].conversations[j], self.files[f].rejected[j])

    def encode_pair_at(self, f: int, j: int) -> tuple[PreferencePair, EncodedPair]:
        fd = self.files[f]
        pair = PreferencePair(fd.conversations[j], fd.rejected[j])
        grids = fd.grids[j] if self.image_spec.hd else None
        return pair, encode_pair(pair, self.tokenizer, self.image_spec, self.max_length, grids)

    def item(self, f: int, j: int) -> dict[str, torch.Tensor]:
        """The item of pair ``j`` of file ``f`` (also used to compute reference log-probs)."""
        pair, enc = self.encode_pair_at(f, j)
        chosen = make_item(
            pair.chosen, enc.chosen, self.pad_token_id, self.img_size, fast_jpeg=self.fast_jpeg, hd_num=self.hd_num
        )
        rejected_ids = torch.tensor(enc.rejected.input_ids, dtype=torch.long)
        rejected_mask = rejected_ids < 0
        rejected_ids[rejected_mask] = self.pad_token_id
        if enc.rejected.num_images != enc.chosen.num_images:
            raise DataError(f"{pair.where}: the two answers keep different images after truncation; raise max_length")
        sides = {
            "chosen": (chosen["input_ids"], chosen["labels"], chosen["image_mask"]),
            "rejected": (rejected_ids, torch.tensor(enc.rejected.labels, dtype=torch.long), rejected_mask),
        }
        out: dict[str, torch.Tensor] = {}
        for side, (ids, labels, mask) in sides.items():
            if self.end_token is not None:
                ids, labels, mask = append_token(ids, labels, mask, self.end_token)
            out |= {f"{side}_input_ids": ids, f"{side}_labels": labels, f"{side}_image_mask": mask}
        out |= {
            "pixel_values": chosen["pixel_values"],
            "num_images": torch.tensor(enc.chosen.num_images),
            "pair_key": torch.tensor([f, j], dtype=torch.long),
        }
        if "image_grids" in chosen:
            out["image_grids"] = chosen["image_grids"]
        if self.ref_logps is not None:
            out["ref_logps"] = torch.from_numpy(self.ref_logps[f][j].copy())
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} drawn pairs")
        f, j = (int(x) for x in self.draw[i])
        return self.item(f, j)

    def keys(self) -> list[tuple[int, int]]:
        """Every (file, pair) of the data once (what reference log-probs are computed for)."""
        return [(f, j) for f, fd in enumerate(self.files) for j in range(len(fd.conversations))]


def append_token(
    ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, token: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One more, unscored text token at the end of a sequence (ids, labels, image mask)."""
    return (
        torch.cat([ids, torch.tensor([token], dtype=ids.dtype)]),
        torch.cat([labels, torch.tensor([IGNORE_INDEX], dtype=labels.dtype)]),
        torch.cat([mask, torch.tensor([False])]),
    )


def pair_image_index(num_images: Sequence[int]) -> torch.Tensor:
    """The pairs' images in order (pair 0's, then pair 1's, ...): one side's image occurrences."""
    return torch.arange(int(sum(num_images)), dtype=torch.long)


@dataclass
class PairCollator:
    """Pairs -> one batch of sequences ordered chosen 0..P-1 then rejected 0..P-1.

    Padded (default): one row per sequence, right-padded together (2P rows). ``packed``: one row
    per pair, the chosen then the rejected sequence, positions restarting at the second (no
    ``attention_mask``: block-diagonal attention), P rows. Either way each pair's images appear
    once in ``pixel_values`` (``image_grids``), ``image_index`` tells the model which encoded image
    each image occurrence takes (an image is encoded once per pair), and ``sequence_ids`` [rows,
    width] names the sequence (0..2P-1) each position belongs to; padded batches also carry
    ``score_positions`` [rows], each row's last real position. ``ref_logps`` [P, 2] is passed on
    when the items carry precomputed reference log-probs.
    """

    pad_token_id: int
    packed: bool = False

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        n_pairs = len(features)
        sides = [
            {"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"], "image_mask": f[f"{side}_image_mask"]}
            for side in ("chosen", "rejected")
            for f in features
        ]  # sequence s: chosen of pair s, or rejected of pair s - P
        counts = [int(f["num_images"]) for f in features]
        one_side = pair_image_index(counts)
        if self.packed:
            rows = [_join(sides[k], sides[n_pairs + k]) for k in range(n_pairs)]
            batch = pad_batch(rows, self.pad_token_id, packed=True)
            seq = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
            index: list[int] = []
            for k in range(n_pairs):
                n_chosen = int(sides[k]["input_ids"].shape[0])
                n_all = n_chosen + int(sides[n_pairs + k]["input_ids"].shape[0])
                seq[k, :n_chosen], seq[k, n_chosen:n_all] = k, n_pairs + k
                own = list(range(int(offsets[k]), int(offsets[k + 1])))
                index += own + own
            batch["image_counts"] = torch.tensor([2 * c for c in counts], dtype=torch.long)
            batch["image_index"] = torch.tensor(index, dtype=torch.long)
        else:
            batch = pad_batch(sides, self.pad_token_id)
            seq = torch.arange(2 * n_pairs).unsqueeze(1).expand_as(batch["input_ids"]).clone()
            # each row's last real token (a reward model reads its score there, whatever is appended later)
            batch["score_positions"] = torch.tensor([int(s["input_ids"].shape[0]) - 1 for s in sides], dtype=torch.long)
            batch["image_counts"] = torch.tensor(counts + counts, dtype=torch.long)
            batch["image_index"] = torch.cat([one_side, one_side])
        pixels = [f["pixel_values"] for f in features if f["pixel_values"].shape[0]]
        batch["pixel_values"] = torch.cat(pixels) if pixels else None
        if not pixels:
            batch["image_index"] = None
        if any("image_grids" in f for f in features):
            grids = [f["image_grids"] for f in features if f["image_grids"].shape[0]]
            batch["image_grids"] = torch.cat(grids) if grids else None
        batch["sequence_ids"] = seq
        batch["pair_key"] = torch.stack([f["pair_key"] for f in features])
        if all("ref_logps" in f for f in features):
            batch["ref_logps"] = torch.stack([f["ref_logps"] for f in features])
        return batch


def _join(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two sequences as one packed item (positions restart at the second)."""
    out = {k: torch.cat([first[k], second[k]]) for k in ("input_ids", "labels", "image_mask")}
    out["position_ids"] = torch.cat([torch.arange(first["input_ids"].shape[0]), torch.arange(second["input_ids"].shape[0])])
    return out


__all__ = [
    "PairCollator",
    "PreferenceDataset",
    "append_token",
    "pair_image_index",
    "read_pair_data",
]

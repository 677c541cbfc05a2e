"""``xcft eval``: the loss of a model on every sample of a data set.

Every usable sample of the data (a data.txt or one JSON/JSONL file) is evaluated once, in
data order (data.txt numbers and epoch draws do not apply). A sample's loss is the mean
cross-entropy over its supervised tokens, exactly the official per-sample loss; ``mean_loss``
is the mean over all supervised tokens of the data set (the training objective) and
``mean_sample_loss`` the plain mean of the sample losses. Samples left with no supervised
token after truncation are reported by the data reader and not evaluated.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from xcft.data.dataset import DataCollator, make_item, read_data
from xcft.data.encode import Grid, ImageSpec, encode_conversation
from xcft.errors import DataError, XcftError
from xcft.model.image_processing_xcomposer2 import HD_NUM_TRAIN
from xcft.model.loading import load_pretrained

logger = logging.getLogger(__name__)


class EvalDataset(Dataset):
    """Every usable conversation once, as batch-contract items (``xcft.data`` encoding).

    2.5 (``hd_num`` set): ``grids`` holds each conversation's image crop grids (from :func:`read_data`).
    """

    def __init__(
        self,
        conversations: list[Any],
        tokenizer: Any,
        img_size: int,
        max_length: int,
        hd_num: int | None = None,
        grids: list[list[Grid]] | None = None,
    ) -> None:
        self.conversations = conversations
        self.tokenizer = tokenizer
        self.img_size = int(img_size)
        self.max_length = int(max_length)
        self.hd_num = hd_num
        self.spec = ImageSpec(self.img_size, hd_num)
        self.grids = grids
        if hd_num is not None and (grids is None or len(grids) != len(conversations)):
            raise ValueError("2.5 evaluation needs the crop grids of every conversation")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(tokenizer.eos_token_id if pad is None else pad)

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int) -> dict[str, Any]:
        conv = self.conversations[i]
        grids = self.grids[i] if self.grids is not None else None
        enc = encode_conversation(conv, self.tokenizer, self.spec, self.max_length, grids)
        return {**make_item(conv, enc, self.pad_token_id, self.img_size, hd_num=self.hd_num), "index": i}


def resolve_hd_num(config: Any, hd_num: int | None) -> int | None:
    """The crop budget for a model: the given one or 18 for 2.5; an error when given for a 2.0 model."""
    if getattr(config, "hd", False):
        hd_num = HD_NUM_TRAIN if hd_num is None else int(hd_num)
        if hd_num < 1:
            raise XcftError(f"--hd-num must be at least 1 (crops per image), got {hd_num}")
        return hd_num
    if hd_num is not None:
        raise XcftError(
            f"--hd-num {hd_num}: this is an InternLM-XComposer2 (2.0) model, whose images are one fixed-size view; "
            "--hd-num applies to 2.5 models only. Drop it"
        )
    return None


def evaluate(
    model: Any,
    tokenizer: Any,
    data: str,
    *,
    max_length: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    hd_num: int | None = None,
) -> dict[str, Any]:
    """Per-sample and overall loss of ``model`` on ``data`` (see the module docstring).

    ``hd_num``: crop budget of a 2.5 model (default 18, the training default).
    """
    if batch_size < 1:
        raise XcftError(f"--batch-size must be at least 1, got {batch_size}")
    hd_num = resolve_hd_num(model.config, hd_num)
    max_length = int(max_length or model.config.max_length)
    files = read_data(data, tokenizer, model.config.img_size, max_length, hd_num=hd_num)
    conversations = [conv for f in files for conv in f.conversations]
    grids = [g for f in files for g in f.grids] if hd_num is not None else None
    skipped = sum(f.skipped for f in files)
    if not conversations:
        raise DataError(f"{data}: no sample with a supervised token within max_length={max_length}; nothing to evaluate")
    dataset = EvalDataset(conversations, tokenizer, model.config.img_size, max_length, hd_num, grids)
    collate = DataCollator(dataset.pad_token_id)

    def collate_with_index(items: list[dict[str, Any]]) -> tuple[list[int], dict[str, Any]]:
        return [it["index"] for it in items], collate([{k: v for k, v in it.items() if k != "index"} for it in items])

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_with_index)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    samples: list[dict[str, Any]] = []
    total_nll, total_tokens = 0.0, 0
    try:
        for indices, batch in tqdm(loader, desc="eval", unit="batch", file=sys.stderr, disable=not progress):
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            sums, counts = model.sample_losses(**batch)
            for i, s, n in zip(indices, sums.tolist(), counts.tolist()):
                conv = conversations[i]
                samples.append(
                    {
                        "index": i,
                        "id": conv.id,
                        "file": conv.file,
                        "file_index": conv.index,
                        "loss": s / n,
                        "tokens": int(n),
                    }
                )
                total_nll += s
                total_tokens += int(n)
    finally:
        model.train(was_training)
    return {
        "samples": samples,
        "mean_loss": total_nll / total_tokens,
        "mean_sample_loss": float(np.mean([s["loss"] for s in samples])),
        "num_samples": len(samples),
        "num_tokens": total_tokens,
        "skipped": skipped,
        "max_length": max_length,
    }


def eval_command(
    data: str,
    *,
    model_dir: str,
    max_length: int | None = None,
    batch_size: int = 4,
    output_format: str = "text",
    dtype: str = "float32",
    device: str | None = None,
    hd_num: int | None = None,
    bits: int = 16,
) -> int:
    """``xcft eval DATA --model DIR``: print per-sample losses and the overall mean (``bits`` 4/8: quantized decoder)."""
    model, tokenizer = load_pretrained(model_dir, dtype=dtype, device=device, bits=bits)
    result = evaluate(model, tokenizer, data, max_length=max_length, batch_size=batch_size, hd_num=hd_num)
    if output_format == "json":
        print(json.dumps(result, indent=1, ensure_ascii=False))
        return 0
    width = max(len(str(s["id"])) for s in result["samples"])
    print(f"{'index':>5}  {'id':<{width}}  {'tokens':>6}  {'loss':>9}  file:sample")
    for s in result["samples"]:
        print(f"{s['index']:>5}  {s['id']!s:<{width}}  {s['tokens']:>6}  {s['loss']:9.6f}  {s['file']}:{s['file_index']}")
    print(
        f"mean loss {result['mean_loss']:.6f} over {result['num_tokens']} supervised tokens "
        f"({result['num_samples']} samples, mean of sample losses {result['mean_sample_loss']:.6f}"
        + (f", {result['skipped']} skipped" if result["skipped"] else "")
        + ")"
    )
    return 0


__all__ = ["EvalDataset", "eval_command", "evaluate", "resolve_hd_num"]

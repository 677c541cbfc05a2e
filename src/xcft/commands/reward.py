"""``xcft reward``: the reward of each conversation of a data set under a trained reward model.

The model folder is an ``xcft train --stage rm`` output (a full model or a LoRA adapter, with
``reward_head.safetensors``). For SFT data every conversation is scored; for preference pairs both
answers are, with the margin and the accuracy (share of pairs whose chosen answer scores higher).
Every usable sample is scored once, in data order (data.txt numbers and epoch draws do not apply).
(``xcft eval`` reports losses and log-probs; this command reports reward-model scores.)
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import torch
from tqdm import tqdm

from xcft.data.cache_options import CacheOptions
from xcft.data.dataset import DataCollator, XComposerDataset, read_data
from xcft.data.pairs import is_pair_data
from xcft.data.preference import PairCollator, PreferenceDataset, append_token, read_pair_data
from xcft.data.sizes import model_sizes, resolve_sizes
from xcft.errors import XcftError
from xcft.model.loading import load_pretrained
from xcft.train.reward import REWARD_HEAD_NAME, RewardModel, load_reward_head, reward_token_id

logger = logging.getLogger(__name__)


def load_reward_model(
    model_dir: str, *, dtype: str = "float32", device: str | None = None, bits: int = 16
) -> tuple[RewardModel, Any]:
    """(reward model in eval mode, tokenizer) from an ``xcft train --stage rm`` output folder (``bits``: as xcft eval)."""
    lm, tokenizer = load_pretrained(model_dir, dtype=dtype, device=device, bits=bits)
    head = load_reward_head(model_dir, lm.config.hidden_size)
    if head is None:
        raise XcftError(f"{model_dir} has no {REWARD_HEAD_NAME}: it is not a reward model. Train one with xcft train --stage rm")
    model = RewardModel(lm, lm.config.hidden_size, head.to(next(lm.parameters()).device))
    return model.eval(), tokenizer


@torch.no_grad()
def score(
    model: RewardModel,
    tokenizer: Any,
    data: str,
    *,
    max_length: int | None = None,
    batch_size: int = 4,
    hd_num: int | None = None,
    img_size: int | None = None,
    cache: CacheOptions | None = None,
) -> dict[str, Any]:
    """Rewards of every conversation (or pair) of ``data``; see the module docstring (``cache``: the preprocessing cache's options)."""
    if batch_size < 1:
        raise XcftError(f"--batch-size must be at least 1, got {batch_size}")
    sizes = resolve_sizes(model_sizes(model.lm.config), img_size, max_length, hd_num)
    limit = sizes.max_length - 1  # room for the reward token
    token = reward_token_id(tokenizer)
    device = next(model.parameters()).device

    def run(batch: dict[str, Any]) -> list[float]:
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        return [float(r) for r in model(**batch).tolist()]

    if is_pair_data(data):
        files = read_pair_data(data, tokenizer, sizes.img_size, limit, given_num=False, hd_num=sizes.hd_num, cache=cache)
        pair_ds = PreferenceDataset(
            files, tokenizer, sizes.img_size, limit, hd_num=sizes.hd_num, end_token=token, every_sample=True
        )
        collate = PairCollator(pair_ds.pad_token_id)
        pairs: list[dict[str, Any]] = []
        for start in tqdm(range(0, len(pair_ds), batch_size), desc="reward", unit="batch", file=sys.stderr):
            indices = range(start, min(start + batch_size, len(pair_ds)))
            rewards = run(collate([pair_ds[i] for i in indices]))
            for k, i in enumerate(indices):
                conv = pair_ds.conversation(i)
                chosen, rejected = rewards[k], rewards[len(indices) + k]
                pairs.append({"id": conv.id, "file": conv.file, "file_index": conv.index, "chosen": chosen, "rejected": rejected})
        correct = sum(p["chosen"] > p["rejected"] for p in pairs)
        return {"pairs": pairs, "accuracy": correct / len(pairs), "num_pairs": len(pairs)}

    files_sft = read_data(data, tokenizer, sizes.img_size, limit, given_num=False, hd_num=sizes.hd_num, cache=cache)
    ds = XComposerDataset(files_sft, tokenizer, sizes.img_size, limit, hd_num=sizes.hd_num, every_sample=True)
    collate_sft = DataCollator(ds.pad_token_id)
    samples: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(ds), batch_size), desc="reward", unit="batch", file=sys.stderr):
        indices = range(start, min(start + batch_size, len(ds)))
        items = []
        for i in indices:
            item = dict(ds[i])
            item["input_ids"], item["labels"], item["image_mask"] = append_token(
                item["input_ids"], item["labels"], item["image_mask"], token
            )
            items.append(item)
        for i, r in zip(indices, run(collate_sft(items))):
            conv = ds.conversation(i)
            samples.append({"id": conv.id, "file": conv.file, "file_index": conv.index, "reward": r})
    return {"samples": samples, "num_samples": len(samples)}


def reward_command(
    data: str,
    *,
    model_dir: str,
    max_length: int | None = None,
    batch_size: int = 4,
    output_format: str = "text",
    dtype: str = "float32",
    device: str | None = None,
    hd_num: int | None = None,
    img_size: int | None = None,
    bits: int = 16,
    data_cache_dir: str | None = None,
    no_data_cache: bool = False,
    preprocessing_num_workers: int | None = None,
) -> int:
    """``xcft reward DATA --model DIR``: print each reward (pairs: chosen, rejected, margin) and the accuracy."""
    model, tokenizer = load_reward_model(model_dir, dtype=dtype, device=device, bits=bits)
    cache = CacheOptions(data_cache_dir, no_data_cache, preprocessing_num_workers)
    result = score(
        model, tokenizer, data, max_length=max_length, batch_size=batch_size, hd_num=hd_num, img_size=img_size, cache=cache
    )
    if output_format == "json":
        print(json.dumps(result, indent=1, ensure_ascii=False))
        return 0
    if "pairs" in result:
        width = max(len(str(p["id"])) for p in result["pairs"])
        print(f"{'id':<{width}}  {'chosen':>10}  {'rejected':>10}  {'margin':>10}  file:sample")
        for p in result["pairs"]:
            margin = p["chosen"] - p["rejected"]
            mark = "" if margin > 0 else "  (rejected scores higher)"
            print(
                f"{p['id']!s:<{width}}  {p['chosen']:10.4f}  {p['rejected']:10.4f}  {margin:10.4f}  "
                f"{p['file']}:{p['file_index']}{mark}"
            )
        print(f"accuracy {result['accuracy']:.4f} ({result['num_pairs']} pairs; chosen reward > rejected reward)")
        return 0
    width = max(len(str(s["id"])) for s in result["samples"])
    print(f"{'id':<{width}}  {'reward':>10}  file:sample")
    for s in result["samples"]:
        print(f"{s['id']!s:<{width}}  {s['reward']:10.4f}  {s['file']}:{s['file_index']}")
    return 0


__all__ = ["load_reward_model", "reward_command", "score"]

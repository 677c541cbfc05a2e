"""``xcft eval``: the loss of a model on every sample of a data set.

Every usable sample of the data (a data.txt or one JSON/JSONL file) is evaluated once, in
data order (data.txt numbers and epoch draws do not apply). A sample's loss is the mean
cross-entropy over its supervised tokens, exactly the official per-sample loss; ``logp`` is the
summed log-probability of those (answer) tokens and ``tokens`` their number; ``mean_loss``
is the mean over all supervised tokens of the data set (the training objective) and
``mean_sample_loss`` the plain mean of the sample losses; ``files`` gives each data file's mean
over its supervised tokens (a mixture's per-source loss, as training logs it). Samples left with no supervised
token after truncation are reported by the data reader and not evaluated.

Preference pairs (``conversations_a``/``conversations_b`` or ``chosen``/``rejected`` records): each
pair's two final answers are scored as DPO scores them (summed log-prob ``chosen_logp`` /
``rejected_logp`` and token counts), with the share of pairs whose chosen answer is more likely.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from xcft.data.cache_options import CacheOptions
from xcft.data.dataset import DataCollator, XComposerDataset, read_data
from xcft.data.pairs import is_pair_data
from xcft.data.preference import PairCollator, PreferenceDataset, read_pair_data
from xcft.data.sizes import model_sizes, resolve_sizes
from xcft.errors import DataError, XcftError
from xcft.model.loading import load_pretrained
from xcft.train.dpo import answer_logps

logger = logging.getLogger(__name__)


def evaluate(
    model: Any,
    tokenizer: Any,
    data: str,
    *,
    max_length: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    hd_num: int | None = None,
    img_size: int | None = None,
    cache: CacheOptions | None = None,
) -> dict[str, Any]:
    """Per-sample and overall loss of ``model`` on ``data`` (see the module docstring).

    Sizes as for training (:func:`xcft.data.sizes.resolve_sizes`); ``hd_num``: crop budget of a 2.5
    model (default 18, the training default). The samples are the training dataset's, every one once.
    """
    if batch_size < 1:
        raise XcftError(f"--batch-size must be at least 1, got {batch_size}")
    sizes = resolve_sizes(model_sizes(model.config), img_size, max_length, hd_num)
    max_length = sizes.max_length
    files = read_data(data, tokenizer, sizes.img_size, max_length, hd_num=sizes.hd_num, cache=cache)
    if not any(f.conversations for f in files):
        raise DataError(f"{data}: no sample with a supervised token within max_length={max_length}; nothing to evaluate")
    dataset = XComposerDataset(files, tokenizer, sizes.img_size, max_length, hd_num=sizes.hd_num, every_sample=True)
    skipped = dataset.num_skipped
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=DataCollator(dataset.pad_token_id))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    samples: list[dict[str, Any]] = []
    total_nll, total_tokens = 0.0, 0
    per_file: dict[str, list[float]] = {}  # file -> [summed cross-entropy, supervised tokens]
    try:
        start = 0  # the loader keeps the dataset's order: batch k holds the next len(batch) samples
        for batch in tqdm(loader, desc="eval", unit="batch", file=sys.stderr, disable=not progress):
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            sums, counts = model.sample_losses(**batch)
            indices = range(start, start + len(sums))
            start += len(sums)
            for i, s, n in zip(indices, sums.tolist(), counts.tolist()):
                conv = dataset.conversation(i)
                samples.append(
                    {
                        "index": i,
                        "id": conv.id,
                        "file": conv.file,
                        "file_index": conv.index,
                        "loss": s / n,
                        "logp": -s,
                        "tokens": int(n),
                    }
                )
                total_nll += s
                total_tokens += int(n)
                acc = per_file.setdefault(conv.file, [0.0, 0])
                acc[0] += s
                acc[1] += int(n)
    finally:
        model.train(was_training)
    return {
        "samples": samples,
        "files": [{"file": f, "loss": s / n, "tokens": int(n)} for f, (s, n) in per_file.items() if n],
        "mean_loss": total_nll / total_tokens,
        "mean_sample_loss": float(np.mean([s["loss"] for s in samples])),
        "num_samples": len(samples),
        "num_tokens": total_tokens,
        "skipped": skipped,
        "max_length": max_length,
    }


@torch.no_grad()
def evaluate_pairs(
    model: Any,
    tokenizer: Any,
    data: str,
    *,
    max_length: int | None = None,
    batch_size: int = 4,
    hd_num: int | None = None,
    img_size: int | None = None,
    progress: bool = True,
    cache: CacheOptions | None = None,
) -> dict[str, Any]:
    """Preference pairs: each answer's summed log-prob and token count (final answer only, as DPO scores them).

    ``preference_accuracy`` is the share of pairs whose chosen answer has the higher log-prob.
    """
    if batch_size < 1:
        raise XcftError(f"--batch-size must be at least 1, got {batch_size}")
    sizes = resolve_sizes(model_sizes(model.config), img_size, max_length, hd_num)
    files = read_pair_data(data, tokenizer, sizes.img_size, sizes.max_length, given_num=False, hd_num=sizes.hd_num, cache=cache)
    ds = PreferenceDataset(files, tokenizer, sizes.img_size, sizes.max_length, hd_num=sizes.hd_num, every_sample=True)
    collate = PairCollator(ds.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pairs: list[dict[str, Any]] = []
    try:
        for start in tqdm(range(0, len(ds), batch_size), desc="eval", unit="batch", file=sys.stderr, disable=not progress):
            indices = range(start, min(start + batch_size, len(ds)))
            batch = collate([ds[i] for i in indices])
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            logps, counts = answer_logps(model, batch)
            n = len(indices)
            for k, i in enumerate(indices):
                conv = ds.conversation(i)
                chosen, rejected = float(logps[k]), float(logps[n + k])
                pairs.append(
                    {
                        "index": i,
                        "id": conv.id,
                        "file": conv.file,
                        "file_index": conv.index,
                        "chosen_logp": chosen,
                        "rejected_logp": rejected,
                        "chosen_tokens": int(counts[k]),
                        "rejected_tokens": int(counts[n + k]),
                        "margin": chosen - rejected,
                    }
                )
    finally:
        model.train(was_training)
    return {
        "pairs": pairs,
        "preference_accuracy": sum(p["margin"] > 0 for p in pairs) / len(pairs),
        "mean_margin": float(np.mean([p["margin"] for p in pairs])),
        "num_pairs": len(pairs),
        "skipped": ds.num_skipped,
        "max_length": sizes.max_length,
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
    img_size: int | None = None,
    bits: int = 16,
    data_cache_dir: str | None = None,
    no_data_cache: bool = False,
    preprocessing_num_workers: int | None = None,
) -> int:
    """``xcft eval DATA --model DIR``: per-sample losses, each data file's and the overall mean (``bits`` 4/8: quantized decoder)."""
    model, tokenizer = load_pretrained(model_dir, dtype=dtype, device=device, bits=bits)
    cache = CacheOptions(data_cache_dir, no_data_cache, preprocessing_num_workers)
    if is_pair_data(data):
        result = evaluate_pairs(
            model, tokenizer, data, max_length=max_length, batch_size=batch_size, hd_num=hd_num, img_size=img_size, cache=cache
        )
    else:
        result = evaluate(
            model, tokenizer, data, max_length=max_length, batch_size=batch_size, hd_num=hd_num, img_size=img_size, cache=cache
        )
    if output_format == "json":
        print(json.dumps(result, indent=1, ensure_ascii=False))
        return 0
    if "pairs" in result:
        _print_pairs(result)
        return 0
    width = max(len(str(s["id"])) for s in result["samples"])
    print(f"{'index':>5}  {'id':<{width}}  {'tokens':>6}  {'loss':>9}  file:sample")
    for s in result["samples"]:
        print(f"{s['index']:>5}  {s['id']!s:<{width}}  {s['tokens']:>6}  {s['loss']:9.6f}  {s['file']}:{s['file_index']}")
    if len(result["files"]) > 1:
        for f in result["files"]:
            print(f"file {f['file']}: loss {f['loss']:.6f} over {f['tokens']} supervised tokens")
    print(
        f"mean loss {result['mean_loss']:.6f} over {result['num_tokens']} supervised tokens "
        f"({result['num_samples']} samples, mean of sample losses {result['mean_sample_loss']:.6f}"
        + (f", {result['skipped']} skipped" if result["skipped"] else "")
        + ")"
    )
    return 0


def _print_pairs(result: dict[str, Any]) -> None:
    width = max(len(str(p["id"])) for p in result["pairs"])
    print(f"{'index':>5}  {'id':<{width}}  {'chosen logp':>11}  {'rejected logp':>13}  {'margin':>9}  file:sample")
    for p in result["pairs"]:
        print(
            f"{p['index']:>5}  {p['id']!s:<{width}}  {p['chosen_logp']:11.4f}  {p['rejected_logp']:13.4f}  "
            f"{p['margin']:9.4f}  {p['file']}:{p['file_index']}"
        )
    print(
        f"preference accuracy {result['preference_accuracy']:.4f} ({result['num_pairs']} pairs; chosen answer more likely), "
        f"mean margin {result['mean_margin']:.4f}"
    )


__all__ = ["eval_command", "evaluate", "evaluate_pairs"]

"""``xcft bench predict``: samples/s of batched generation against one prompt at a time, in one process.

The same prompts (samples of a data set, repeated to ``--samples``) are answered one at a time
(batch 1, what ``xcft chat`` does per question) and in batches of ``--batch-size``; every answer
is forced to ``--max-new-tokens`` tokens (a random model would stop at random places), so both
runs generate the same number of tokens. Prompt building and image preprocessing are timed too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from xcft.commands.bench.calibrate import calibration_gflops
from xcft.errors import XcftError
from xcft.model.loading import load_pretrained, resolve_device
from xcft.train.predict import ChatSettings, prompt_inputs, read_prompt_samples

logger = logging.getLogger(__name__)

__all__ = ["format_predict_result", "run_predict_bench"]


def _seconds(model: Any, tokenizer: Any, samples: Sequence[Any], batch_size: int, settings: ChatSettings) -> float:
    start = time.perf_counter()
    for k in range(0, len(samples), batch_size):
        inputs = [prompt_inputs(model, tokenizer, s, settings) for s in samples[k : k + batch_size]]
        model.answer_batch(
            tokenizer, inputs, max_new_tokens=settings.max_new_tokens, do_sample=False, min_new_tokens=settings.max_new_tokens
        )
    return time.perf_counter() - start


def run_predict_bench(
    *,
    model_dir: str,
    data: str,
    sources: Sequence[str] = (),
    samples: int = 16,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    device: str | None = None,
) -> dict[str, Any]:
    """Time batch 1 and batch ``batch_size`` on the same prompts; returns the figures (one JSON object)."""
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, tokenizer = load_pretrained(model_dir, dtype=dtype, device=dev)
    found, _ = read_prompt_samples(data, model, tokenizer)
    found = [s for s in found if not sources or any(x in s.source for x in sources)]
    if not found:
        raise XcftError(f"{data}: no sample to time (check --source)")
    chosen = [found[k % len(found)] for k in range(samples)]
    settings = ChatSettings(max_new_tokens=max_new_tokens)
    calib_before = calibration_gflops() if dev.type == "cpu" else None
    _seconds(model, tokenizer, chosen[:batch_size], batch_size, settings)  # warm-up
    one = _seconds(model, tokenizer, chosen, 1, settings)
    batched = _seconds(model, tokenizer, chosen, batch_size, settings)
    calib_after = calibration_gflops() if dev.type == "cpu" else None
    prompt_lengths = [int(prompt_inputs(model, tokenizer, s, settings).input_ids.shape[0]) for s in chosen]
    return {
        "samples": samples,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "samples_per_s_batch_1": samples / one,
        f"samples_per_s_batch_{batch_size}": samples / batched,
        "speedup": one / batched,
        "seconds_batch_1": one,
        f"seconds_batch_{batch_size}": batched,
        "prompt_tokens_min": min(prompt_lengths),
        "prompt_tokens_max": max(prompt_lengths),
        "images": sum(len(s.images) for s in chosen),
        "calibration_gflops": calib_before,
        "calibration_gflops_after": calib_after,
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,
        "torch": torch.__version__,
        "model": model_dir,
        "data": data,
        "sources": list(sources),
    }


def format_predict_result(r: dict[str, Any]) -> str:
    """A few lines for people (the JSON object has everything)."""
    b = r["batch_size"]
    calib = r["calibration_gflops"]
    return "\n".join(
        [
            f"prompts           {r['samples']} ({r['prompt_tokens_min']}-{r['prompt_tokens_max']} tokens, {r['images']} images), "
            f"{r['max_new_tokens']} new tokens each",
            f"batch 1           {r['samples_per_s_batch_1']:.3f} samples/s",
            f"batch {b:<11} {r[f'samples_per_s_batch_{b}']:.3f} samples/s",
            f"speedup           {r['speedup']:.2f}x",
            f"device            {r['device']} {r['dtype']}, {r['threads']} threads"
            + (f", calibration {calib:.1f} GFLOP/s before, {r['calibration_gflops_after']:.1f} after" if calib else ""),
        ]
    )

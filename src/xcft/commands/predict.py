"""``xcft predict``: a model's answers to every sample of a data set, in batches, one JSON line each.

Prompts as ``xcft chat`` builds them (the model's prompt layout unless ``--layout`` / ``--training-layout``),
greedy unless ``--sample``; see :mod:`xcft.train.predict` for what is asked and how an existing
prediction file is continued. ``--metrics`` scores the file when done (as ``xcft score``).
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm
from transformers import set_seed

from xcft.commands.chat import load_for_chat
from xcft.commands.score import score_command
from xcft.data.cache_options import CacheOptions
from xcft.data.sizes import model_sizes, resolve_sizes
from xcft.errors import DataError, XcftError
from xcft.model.template_xcomposer2 import LAYOUT_TRAINING
from xcft.train.predict import NOT_PREDICTED, ChatSettings, predict_samples, read_prompt_samples

logger = logging.getLogger(__name__)

__all__ = ["predict_command"]


def predict_command(
    *,
    data: str,
    model_dir: str,
    output: str,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    sample: bool = False,
    seed: int = 0,
    system: str | None = None,
    layout: str | None = None,
    training_layout: bool = False,
    hd_num: int | None = None,
    device: str | None = None,
    limit: int | None = None,
    metrics: str | None = None,
    bits: int = 16,
    data_cache_dir: str | None = None,
    no_data_cache: bool = False,
    preprocessing_num_workers: int | None = None,
) -> int:
    """Predict every sample ``output`` does not hold yet; 1 when a sample could not be predicted."""
    cache = CacheOptions(data_cache_dir, no_data_cache, preprocessing_num_workers)
    if batch_size < 1:
        raise XcftError(f"--batch-size must be at least 1, got {batch_size}")
    model, tokenizer = load_for_chat(model_dir, device, bits=bits)
    resolve_sizes(model_sizes(model.config, model_dir), hd_num=hd_num, default_hd_num=None)
    samples, problems = read_prompt_samples(data, model, tokenizer, cache)
    for problem in problems:
        (logger.error if problem.level == "error" else logger.info)("%s (skipped)" if problem.level == "error" else "%s", problem)
    if limit is not None:
        samples = samples[: max(0, limit)]
    if not samples:
        raise DataError(f"{data}: no sample to predict")
    set_seed(seed)
    settings = ChatSettings(
        max_new_tokens=max_new_tokens,
        greedy=not sample,
        system=system,
        layout=LAYOUT_TRAINING if training_layout else layout,
        hd_num=hd_num,
    )
    with tqdm(total=len(samples), unit="sample", desc="predict", file=sys.stderr, dynamic_ncols=True) as bar:

        def progress(done: int, todo: int) -> None:
            if bar.total != todo:
                bar.reset(total=todo)
            bar.update(done)

        written, failures = predict_samples(
            model, tokenizer, samples, output, settings=settings, batch_size=batch_size, progress=progress
        )
    errors = [p for p in problems if p.level == "error"]
    logger.info("%d sample(s) predicted into %s", written, output)
    if failures or errors:
        print(f"{len(failures) + len(errors)} {NOT_PREDICTED}", file=sys.stderr)
    if metrics is not None:
        score_command(predictions=output, metrics=metrics)
    return 1 if failures or errors else 0

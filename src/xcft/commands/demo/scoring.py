"""Held-out answer accuracy through ``xcft predict`` and ``xcft score``, the way a user would measure it.

The held-out questions (one data file per kind, see :func:`~xcft.commands.demo.synthetic.generate_dataset`)
are answered by :func:`xcft.train.predict.predict_samples` (greedy, the model's own prompt layout: the
demo's model is created from scratch, so its folder records the layout training encodes) into a
prediction file, which :func:`xcft.train.answer_metrics.score_predictions` scores with the
``first_word`` metric: the first word of the reply against the one-word answer. Nothing about the
expected answer reaches the model, so the number is only as good as what the model learned. The
blank-image control asks the colour questions about images that carry no information.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcft.commands.demo.synthetic import COLOURS, QA, SHAPES, heldout_kind
from xcft.train.answer_metrics import score_predictions
from xcft.train.predict import ChatSettings, predict_samples, read_predictions, read_prompt_samples

logger = logging.getLogger(__name__)

__all__ = ["HEADLINE_KINDS", "METRIC", "Accuracy", "chance_levels", "heldout_accuracy"]

#: The question kinds the headline accuracy averages over (the demo's >= 90 % target).
HEADLINE_KINDS = ("colour", "shape")
#: The answer metric of the demo's accuracy (``xcft score --metrics first_word``).
METRIC = "first_word"
#: Answers are one word; a few tokens are enough to read the first word.
MAX_NEW_TOKENS = 4


def chance_levels() -> dict[str, float]:
    """Accuracy of a uniform random guess for each question kind (held-out classes are balanced)."""
    return {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "compare": 0.5}


@dataclass
class Accuracy:
    """Accuracy over the headline kinds, per kind, and every (question, reply) pair."""

    overall: float
    per_kind: dict[str, float]
    counts: dict[str, int]
    replies: list[tuple[QA, str]] = field(default_factory=list)
    predictions: str = ""  # the prediction file


def heldout_accuracy(
    model: Any, tokenizer: Any, data: str | Path, predictions: str | Path, questions: Sequence[QA], *, batch_size: int = 8
) -> Accuracy:
    """Predict ``data`` (held-out data.txt or file) into ``predictions`` and score it per kind."""
    samples, problems = read_prompt_samples(data, model, tokenizer)
    if any(p.level == "error" for p in problems):
        raise RuntimeError(f"the demo's held-out data has errors: {problems[0]}")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        _, failures = predict_samples(
            model, tokenizer, samples, predictions, settings=ChatSettings(max_new_tokens=MAX_NEW_TOKENS), batch_size=batch_size
        )
    finally:
        model.train(was_training)
    if failures:
        raise RuntimeError(f"held-out samples could not be predicted: {failures[0]}")
    rows = read_predictions(predictions)
    scores = score_predictions(rows, [METRIC])
    hits: dict[str, int] = {}
    counts: dict[str, int] = {}
    for source, group in scores.groups.items():
        if source == "overall":
            continue
        kind = heldout_kind(source)
        hits[kind] = hits.get(kind, 0) + int(group[f"{METRIC}_hits"])
        counts[kind] = counts.get(kind, 0) + int(group["n"])
    per_kind = {k: hits[k] / counts[k] for k in counts}
    head = sum(counts.get(k, 0) for k in HEADLINE_KINDS)
    overall = sum(hits.get(k, 0) for k in HEADLINE_KINDS) / head if head else float("nan")
    by_id = {q.id: q for q in questions}
    replies = [(by_id[str(r["id"])], str(r["prediction"])) for r in rows if str(r["id"]) in by_id]
    logger.debug("accuracy %.3f %s", overall, per_kind)
    return Accuracy(overall, per_kind, counts, replies, str(predictions))

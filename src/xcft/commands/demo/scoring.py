"""Held-out answer accuracy by greedy chat, the way a user would query the model.

Each question goes through ``model.chat`` with the model's own prompt layout (the demo's model is
created from scratch, so its folder records the layout training encodes: one ``<s>``, no system
prompt), with greedy decoding, and the first word of the reply is compared with the one-word answer. Nothing about the expected answer reaches the model, so the number is only as
good as what the model learned; with ``blank_images`` every image is replaced by zero
``pixel_values`` (no visual information at all), which is the control that shows the answers
come from the vision path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from xcft.commands.demo.synthetic import COLOURS, QA, SHAPES

logger = logging.getLogger(__name__)

__all__ = ["HEADLINE_KINDS", "Accuracy", "answer_accuracy", "chance_levels", "first_word"]

#: The question kinds the headline accuracy averages over (the demo's >= 90 % target).
HEADLINE_KINDS = ("colour", "shape")


def first_word(text: str) -> str:
    """Lower-cased first word of a reply, without surrounding punctuation (``"Red."`` -> ``"red"``)."""
    m = re.search(r"[\w']+", text.lower())
    return m.group(0) if m else ""


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


#: The CLIP normalisation mean in 8-bit RGB: a flat image of it normalises to (almost) zero.
CLIP_MEAN_RGB = (123, 117, 104)


def _blank(size: int, config: Any) -> Any:
    if getattr(config, "hd", False):
        return Image.new("RGB", (size, size), CLIP_MEAN_RGB)
    return torch.zeros(3, size, size)


@torch.no_grad()
def answer_accuracy(
    model: Any,
    tokenizer: Any,
    questions: Sequence[QA],
    *,
    kinds: Iterable[str] | None = None,
    blank_images: bool = False,
    max_new_tokens: int = 4,
) -> Accuracy:
    """Ask every question (optionally only ``kinds``) by greedy chat and score the first word.

    ``model`` is an :class:`XComposer2ForCausalLM` or a peft model wrapping one (anything with
    ``chat``). ``blank_images`` replaces each image by one without information: all-zero pixels
    (2.0), or a flat image of the CLIP mean colour, which normalises to about zero (2.5, whose chat
    takes image files or PIL images for its crop grid).
    """
    keep = set(kinds) if kinds is not None else None
    chat = getattr(model, "chat", None)
    if chat is None:  # peft wrapper: chat lives on the wrapped model
        chat = model.get_base_model().chat
    was_training = getattr(model, "training", False)
    model.eval()
    size = int(model.config.img_size)
    hits: dict[str, list[bool]] = {}
    replies: list[tuple[QA, str]] = []
    try:
        for qa in questions:
            if keep is not None and qa.kind not in keep:
                continue
            images: list[Any] = [_blank(size, model.config) for _ in qa.images] if blank_images else list(qa.images)
            reply, _ = chat(
                tokenizer,
                qa.question,
                images=images,
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
            replies.append((qa, reply))
            hits.setdefault(qa.kind, []).append(first_word(reply) == qa.answer.lower())
    finally:
        model.train(was_training)
    per_kind = {k: sum(v) / len(v) for k, v in hits.items()}
    head = [h for k in HEADLINE_KINDS for h in hits.get(k, [])]
    overall = sum(head) / len(head) if head else float("nan")
    logger.debug("accuracy %.3f %s", overall, per_kind)
    return Accuracy(overall, per_kind, {k: len(v) for k, v in hits.items()}, replies)

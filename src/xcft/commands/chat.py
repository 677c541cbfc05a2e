"""``xcft chat``: one answer (``--query``) or an interactive session with history and streamed tokens.

Works with a base model folder (official or xcft), a full finetune output, or a LoRA adapter folder
(base + adapter, merged in memory).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TextIteratorStreamer, TextStreamer

from xcft.data.images import open_checked_image
from xcft.data.sizes import model_sizes, resolve_sizes
from xcft.errors import XcftError
from xcft.model.loading import load_pretrained, resolve_device
from xcft.model.template_xcomposer2 import IMAGE_PLACEHOLDER, LAYOUT_TRAINING

logger = logging.getLogger(__name__)

HELP_TEXT = "commands: /reset clears the history, /exit (or Ctrl-D) quits"


def stop_token_ids(tokenizer: Any) -> set[int]:
    """Ids that end an answer (end of sequence, end of turn): generated but never shown."""
    return {int(i) for i in (tokenizer.eos_token_id, getattr(tokenizer, "turn_end_id", None)) if i is not None}


class _DropStops:
    """Streamer mixin: leaves the prompt and the stop tokens out; everything else decodes as usual."""

    skip_prompt: bool
    next_tokens_are_prompt: bool

    def __init__(self, tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)  # type: ignore[call-arg]
        self.stops = stop_token_ids(tokenizer)

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        ids = [int(t) for t in value.reshape(-1).tolist() if int(t) not in self.stops]
        if ids:
            self.next_tokens_are_prompt = False
            super().put(torch.tensor(ids))  # type: ignore[misc]


class AnswerPrinter(_DropStops, TextStreamer):
    """Prints an answer's tokens to stdout as they come (``xcft chat``)."""


class AnswerStream(_DropStops, TextIteratorStreamer):
    """Yields an answer's text pieces as they come, to another thread (the web page)."""


def make_streamer(tokenizer: Any, *, iterator: bool = False, timeout: float | None = None) -> TextStreamer:
    """A streamer of the answer without the prompt and stop tokens: printed, or iterated (``iterator=True``)."""
    return AnswerStream(tokenizer, timeout=timeout) if iterator else AnswerPrinter(tokenizer)


def check_model_folder(model_dir: str) -> None:
    """The error a model argument that is no folder gets, before anything is loaded."""
    if not Path(model_dir).is_dir():
        raise XcftError(f"model folder {model_dir} does not exist")


def load_for_chat(model_dir: str, device: str | None, bits: int = 16) -> tuple[Any, Any]:
    """(model, tokenizer) on ``device`` (default: cuda in bfloat16 when available, else cpu in float32).

    ``bits`` 4/8: decoder linears quantized with bitsandbytes (see :func:`xcft.model.loading.load_pretrained`).
    """
    check_model_folder(model_dir)
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, tokenizer = load_pretrained(model_dir, dtype=dtype, device=dev, bits=bits)
    return model.eval(), tokenizer


def load_chat_images(images: Sequence[str]) -> list[Any]:
    """Every ``--image`` decoded up front by the loader check-data uses (one error line for a bad file)."""
    return [open_checked_image(path) for path in images]


def generation_settings(
    max_new_tokens: int, system: str | None, greedy: bool, layout: str | None = None, hd_num: int | None = None
) -> dict[str, Any]:
    """Keyword arguments of ``model.chat``: the model's prompt layout and the official sampling unless overridden."""
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": not greedy}
    if hd_num is not None:
        kwargs["hd_num"] = int(hd_num)
    if layout is not None:
        kwargs["prompt_layout"] = layout
    if system is not None:
        kwargs["meta_instruction"] = system or None  # "" -> no system prompt
    return kwargs


def ask(model: Any, tokenizer: Any, query: str, images: list[Any], **kwargs: Any) -> tuple[str, list[tuple[str, str]]]:
    """``model.chat`` with a placeholder/image count mismatch turned into the one-line user error."""
    try:
        return model.chat(tokenizer, query, images=images or None, **kwargs)
    except ValueError as exc:  # placeholder/image count mismatch
        raise XcftError(f"{exc}; use one <ImageHere> per --image, or none to put the images first") from None


def chat_command(
    *,
    model_dir: str,
    images: Sequence[str],
    query: str | None,
    max_new_tokens: int,
    system: str | None,
    device: str | None,
    greedy: bool = False,
    layout: str | None = None,
    training_layout: bool = False,
    hd_num: int | None = None,
    bits: int = 16,
) -> int:
    """Answer ``query`` (prints the answer) or run an interactive loop; returns the exit status."""
    images = load_chat_images(images or [])
    model, tokenizer = load_for_chat(model_dir, device, bits=bits)
    # chat's crop budget defaults to the official chat's own (model.chat); only a given one is checked
    resolve_sizes(model_sizes(model.config, model_dir), hd_num=hd_num, default_hd_num=None)
    kwargs = generation_settings(max_new_tokens, system, greedy, LAYOUT_TRAINING if training_layout else layout, hd_num)
    if query is not None:
        response, _ = ask(model, tokenizer, query, images, **kwargs)
        print(response)
        return 0
    return _interactive(model, tokenizer, images, kwargs)


def _interactive(model: Any, tokenizer: Any, images: list[Any], kwargs: dict[str, Any]) -> int:
    print(f"xcft chat: {len(images)} image(s) attached to the first question. {HELP_TEXT}", file=sys.stderr)
    history: list[tuple[str, str]] = []
    while True:
        try:
            text = input("user> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        # The images belong to the first turn; later turns see them through the history's placeholders.
        query = text
        if history and IMAGE_PLACEHOLDER in text:
            print(f"(only the first question can hold images; {IMAGE_PLACEHOLDER} ignored)", file=sys.stderr)
            query = text.replace(IMAGE_PLACEHOLDER, "")
        print("assistant> ", end="", flush=True)
        streamer = make_streamer(tokenizer)
        _, history = ask(model, tokenizer, query, images, history=history, streamer=streamer, **kwargs)

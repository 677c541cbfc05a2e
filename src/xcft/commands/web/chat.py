"""The Chat tab's model holder: one loaded model (base, full finetune or LoRA adapter), streamed answers.

Loading, generation settings and the chat template are those of ``xcft chat``
(:func:`xcft.commands.chat.load_for_chat`, :func:`~xcft.commands.chat.generation_settings`, the
model's own ``chat``); this module adds a token stream that a page can show as it grows. Images go
with the first question of a conversation, as in ``xcft chat``'s interactive mode: the history keeps
their ``<ImageHere>`` placeholders and every later turn passes the same images again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TextIteratorStreamer

from xcft.commands.chat import ask, generation_settings, load_chat_images, load_for_chat
from xcft.errors import XcftError
from xcft.model.loading import adapter_base_path, is_adapter_folder
from xcft.model.template_xcomposer2 import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

STREAM_TIMEOUT_S = 600.0
History = list[tuple[str, str]]


class ChatModel:
    """At most one model in memory per server; loads and generations take turns."""

    def __init__(self, device: str | None = None) -> None:
        self.device = device
        self.path: str | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self._lock = threading.Lock()

    def load(self, path: str) -> str:
        """Load ``path`` (an adapter folder finds its base itself); returns a one-line description."""
        path = (path or "").strip()
        if not path:
            raise XcftError("no model folder given; enter a model folder or a LoRA adapter folder")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise XcftError(f"model folder {folder} does not exist")
        base = adapter_base_path(folder) if is_adapter_folder(folder) else None
        with self._lock:
            self.model = self.tokenizer = self.path = None  # free the previous model first
            model, tokenizer = load_for_chat(str(folder), self.device)
            self.model, self.tokenizer, self.path = model, tokenizer, str(folder)
        cfg = model.config
        what = f"LoRA adapter {folder} on base {base}" if base else f"model {folder}"
        n_params = sum(p.numel() for p in model.parameters())
        return f"loaded {what}: {n_params / 1e6:.1f}M parameters, img_size {cfg.img_size}, on {next(model.parameters()).device}"

    def stream(
        self,
        query: str,
        images: Sequence[str],
        history: Sequence[tuple[str, str]],
        *,
        max_new_tokens: int = 256,
        system: str | None = None,
        sampling: bool = True,
        temperature: float = 1.0,
        training_layout: bool = False,
    ) -> Iterator[tuple[str, History | None]]:
        """Yield ``(answer so far, None)`` while generating, then ``(answer, new history)``.

        ``images`` are those of the conversation's first question; on later turns a placeholder in
        ``query`` is dropped, as ``xcft chat`` does. ``system``: None for the official system prompt,
        "" for none.
        """
        if self.model is None:
            raise XcftError("no model loaded; enter a model folder and press Load")
        query = (query or "").strip()
        if not query:
            raise XcftError("empty question")
        if history and IMAGE_PLACEHOLDER in query:
            query = query.replace(IMAGE_PLACEHOLDER, "").strip()
        images = load_chat_images(list(images or []))
        model, tokenizer = self.model, self.tokenizer
        stops = {int(i) for i in (tokenizer.eos_token_id, getattr(tokenizer, "turn_end_id", None)) if i is not None}

        class _Streamer(TextIteratorStreamer):
            def put(self, value: Any) -> None:  # drop the stop tokens; the rest decodes as usual
                if self.skip_prompt and self.next_tokens_are_prompt:
                    self.next_tokens_are_prompt = False
                    return
                ids = [int(t) for t in value.reshape(-1).tolist() if int(t) not in stops]
                if ids:
                    super().put(torch.tensor(ids))

        streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S)
        kwargs = generation_settings(int(max_new_tokens), system, greedy=not sampling, training_layout=training_layout)
        if sampling:
            kwargs["temperature"] = max(float(temperature), 1e-3)
        result: list[tuple[str, History]] = []
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with self._lock:
                    result.append(ask(model, tokenizer, query, images, history=list(history), streamer=streamer, **kwargs))
            except BaseException as exc:  # reported to the page by the consumer below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=generate, name="xcft-web-chat", daemon=True)
        thread.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text, None
        thread.join()
        if failure:
            exc = failure[0]
            if isinstance(exc, XcftError):
                raise exc
            raise XcftError(f"generation failed: {type(exc).__name__}: {exc}") from exc
        response, new_history = result[0]
        yield response, [tuple(turn) for turn in new_history]  # type: ignore[misc]

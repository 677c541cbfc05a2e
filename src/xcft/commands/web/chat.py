"""The Chat tab's model holder: one loaded model (base, full finetune or LoRA adapter), streamed answers.

Loading and the chat template are those of ``xcft chat`` (:func:`xcft.train.chat.load_for_chat`,
the model's own ``chat``); this module adds a token stream that a page can show as it grows.
Images go with the first question of a conversation, as in ``xcft chat``'s interactive mode: the
history keeps their ``<ImageHere>`` placeholders and every later turn passes the same images again.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from xcft.errors import XcftError

logger = logging.getLogger(__name__)

STREAM_TIMEOUT_S = 600.0


class ChatModel:
    """At most one model in memory per server; loads and generations take turns."""

    def __init__(self, device: Optional[str] = None) -> None:
        self.device = device
        self.path: Optional[str] = None
        self.model: Any = None
        self.tokenizer: Any = None
        self._lock = threading.Lock()

    def load(self, path: str) -> str:
        """Load ``path`` (an adapter folder finds its base itself); returns a one-line description."""
        from xcft.train.adapters import adapter_base_path, is_adapter_dir
        from xcft.train.chat import load_for_chat

        path = (path or "").strip()
        if not path:
            raise XcftError("no model folder given; enter a model folder or a LoRA adapter folder")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise XcftError(f"model folder {folder} does not exist")
        base = adapter_base_path(folder) if is_adapter_dir(folder) else None
        with self._lock:
            self.model = self.tokenizer = None  # free the previous model first
            model, tokenizer = load_for_chat(str(folder), self.device)
            self.model, self.tokenizer, self.path = model, tokenizer, str(folder)
        cfg = model.config
        what = f"LoRA adapter {folder} on base {base}" if base else f"model {folder}"
        n_params = sum(p.numel() for p in model.parameters())
        return (f"loaded {what}: {n_params / 1e6:.1f}M parameters, img_size {cfg.img_size}, "
                f"on {next(model.parameters()).device}")

    @staticmethod
    def prepare_query(query: str, images: Sequence[str], history: Sequence[tuple[str, str]]) -> str:
        """The question as the history stores it: placeholders for the images in the first turn only."""
        from xcft.train.chat import IMAGE_PLACEHOLDER, _check_images, _with_placeholders

        query = (query or "").strip()
        if not query:
            raise XcftError("empty question")
        if history:
            return query.replace(IMAGE_PLACEHOLDER, "").strip() or query
        return _with_placeholders(query, len(_check_images(list(images or []))))

    def stream(self, query: str, images: Sequence[str], history: Sequence[tuple[str, str]], *,
               max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0) -> Iterator[str]:
        """Yield the growing answer to ``query`` (from :meth:`prepare_query`), ``images`` those of the first turn."""
        from transformers import TextIteratorStreamer

        if self.model is None:
            raise XcftError("no model loaded; enter a model folder and press Load")
        images = list(images or [])
        tokenizer = self.tokenizer
        stops = {int(i) for i in (tokenizer.eos_token_id, getattr(tokenizer, "turn_end_id", None)) if i is not None}

        class _Streamer(TextIteratorStreamer):
            def put(self, value: Any) -> None:  # drop the stop tokens; the rest decodes as usual
                import torch

                if self.skip_prompt and self.next_tokens_are_prompt:
                    self.next_tokens_are_prompt = False
                    return
                ids = [int(t) for t in value.reshape(-1).tolist() if int(t) not in stops]
                if ids:
                    super().put(torch.tensor(ids))

        streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S)
        kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample)}
        if do_sample:
            kwargs["temperature"] = max(float(temperature), 1e-3)
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with self._lock:
                    self.model.chat(tokenizer, query, images=images or None, history=list(history),
                                    streamer=streamer, **kwargs)
            except BaseException as exc:  # reported to the page by the consumer below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=generate, name="xcft-web-chat", daemon=True)
        thread.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text
        thread.join()
        if failure:
            exc = failure[0]
            if isinstance(exc, XcftError):
                raise exc
            raise XcftError(f"generation failed: {type(exc).__name__}: {exc}") from exc
        yield text.strip()

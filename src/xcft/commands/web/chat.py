"""The Chat tab's models: a small cache of loaded models shared by the server, one selection per page.

Loading, generation settings and the chat template are those of ``xcft chat``
(:func:`xcft.commands.chat.load_for_chat`, :func:`~xcft.commands.chat.generation_settings`, the
model's own ``chat``); this module adds a token stream that a page can show as it grows. Each
browser session names the folder it loaded (its own state); :class:`ModelCache` keeps the last few
loaded folders in memory so that two pages with the same model share it, and a page whose model
was evicted gets it loaded again. Images go with the first question of a conversation, as in
``xcft chat``'s interactive mode: the history keeps their ``<ImageHere>`` placeholders and every
later turn passes the same images again.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcft.commands.chat import AnswerStream, ask, generation_settings, load_chat_images, load_for_chat
from xcft.errors import XcftError
from xcft.model.loading import adapter_base_path, is_adapter_folder
from xcft.model.template_xcomposer2 import IMAGE_PLACEHOLDER, default_system_prompt

logger = logging.getLogger(__name__)

STREAM_TIMEOUT_S = 600.0
#: Models kept in memory at once (pages that chose others reload theirs when they ask).
CACHE_SIZE = 2
History = list[tuple[str, str]]


@dataclass
class LoadedModel:
    """One model in memory; its generations take turns."""

    folder: str
    model: Any
    tokenizer: Any
    description: str
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def layout(self) -> str:
        """The prompt layout the folder records (``config.prompt_layout``)."""
        return str(self.model.config.prompt_layout)

    def default_system(self, layout: str | None = None) -> str:
        """The system prompt of ``layout`` (default: the model's) for this model's family; "" for none."""
        return default_system_prompt(bool(self.model.config.hd), layout or self.layout) or ""


def model_folder(path: str) -> str:
    """The folder a page names, checked (an adapter folder's base must exist too)."""
    path = (path or "").strip()
    if not path:
        raise XcftError("no model folder given; enter a model folder or a LoRA adapter folder and press Load")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise XcftError(f"model folder {folder} does not exist")
    if is_adapter_folder(folder):
        adapter_base_path(folder)  # raises the one-line error for a missing base
    return str(folder.resolve())


class ModelCache:
    """The last ``size`` loaded folders, shared by every page of one server."""

    def __init__(self, device: str | None = None, size: int = CACHE_SIZE) -> None:
        self.device = device
        self.size = max(1, int(size))
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, folder: str) -> LoadedModel:
        """The loaded model of ``folder`` (loaded now if it is not in memory)."""
        folder = model_folder(folder)
        with self._lock:
            if folder in self._models:
                self._models.move_to_end(folder)
                return self._models[folder]
            while len(self._models) >= self.size:  # make room first: two 7B models rarely fit
                evicted, _ = self._models.popitem(last=False)
                logger.info("chat: %s leaves memory (the %d most recent models stay)", evicted, self.size)
            model, tokenizer = load_for_chat(folder, self.device)
            entry = LoadedModel(folder, model, tokenizer, _describe(folder, model))
            self._models[folder] = entry
            return entry

    def folders(self) -> list[str]:
        with self._lock:
            return list(self._models)


def _describe(folder: str, model: Any) -> str:
    base = adapter_base_path(Path(folder)) if is_adapter_folder(Path(folder)) else None
    what = f"LoRA adapter {folder} on base {base}" if base else f"model {folder}"
    n_params = sum(p.numel() for p in model.parameters())
    return (
        f"{what}: {n_params / 1e6:.1f}M parameters, img_size {model.config.img_size}, "
        f"prompt layout {model.config.prompt_layout}, on {next(model.parameters()).device}"
    )


@dataclass(frozen=True)
class ChatSettings:
    """The Chat tab's settings, as ``xcft chat`` options.

    ``system``: the text of the system prompt ("" for none); ``layout``: "official" or "training"
    (None: the model's own).
    """

    max_new_tokens: int = 256
    system: str = ""
    sampling: bool = True
    temperature: float = 1.0
    layout: str | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.chat`` (through ``xcft chat``'s own settings)."""
        if int(self.max_new_tokens) < 1:
            raise XcftError(f"max new tokens {self.max_new_tokens}: give at least 1")
        kwargs = generation_settings(int(self.max_new_tokens), self.system.strip(), not self.sampling, self.layout)
        if self.sampling:
            kwargs["temperature"] = max(float(self.temperature), 1e-3)
        return kwargs


def stream_answer(
    loaded: LoadedModel,
    query: str,
    images: Sequence[str],
    history: Sequence[tuple[str, str]],
    settings: ChatSettings,
) -> Iterator[tuple[str, History | None]]:
    """Yield ``(answer so far, None)`` while generating, then ``(answer, new history)``.

    ``images`` are those of the conversation's first question; on later turns a placeholder in
    ``query`` is dropped, as ``xcft chat`` does.
    """
    query = (query or "").strip()
    if not query:
        raise XcftError("empty question")
    if history and IMAGE_PLACEHOLDER in query:
        query = query.replace(IMAGE_PLACEHOLDER, "").strip()
    pictures = load_chat_images(list(images or []))
    kwargs = settings.generate_kwargs()
    streamer = AnswerStream(loaded.tokenizer, timeout=STREAM_TIMEOUT_S)
    result: list[tuple[str, History]] = []
    failure: list[BaseException] = []

    def generate() -> None:
        try:
            with loaded.lock:
                result.append(
                    ask(loaded.model, loaded.tokenizer, query, pictures, history=list(history), streamer=streamer, **kwargs)
                )
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
    yield response, [(str(q), str(a)) for q, a in new_history]

"""The Chat tab: each browser session loads its own model and keeps its own conversation.

The session's choice (folder, family) is page state; the models themselves live in the server's
:class:`~xcft.commands.web.chat.ModelCache`, so two pages never answer with each other's model.
After *Load* the settings show the model's own defaults: its prompt layout and that layout's
system prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

import xcft.commands.web.ui as ui
from xcft.commands.web.chat import ChatSettings, ModelCache, stream_answer
from xcft.errors import XcftError
from xcft.model.template_xcomposer2 import PROMPT_LAYOUTS, default_system_prompt

#: What the chat shows for an answer that is only a stop token.
EMPTY_ANSWER = "*(empty answer: the model stopped at once)*"


@dataclass(frozen=True)
class Choice:
    """The model a session loaded."""

    folder: str
    hd: bool
    layout: str


def load(cache: ModelCache, path: str) -> tuple[str, Any, Any, Any]:
    """Load ``path`` for one session: (status, its choice, layout value, system prompt value).

    A folder that cannot be loaded leaves the session with the model it had.
    """
    try:
        loaded = cache.get(path)
    except Exception as exc:
        return ui.error(exc, ui.CHAT_FIELDS), gr.skip(), gr.skip(), gr.skip()
    choice = Choice(loaded.folder, bool(loaded.model.config.hd), loaded.layout)
    return ui.status(f"loaded {loaded.description}", "ok", model=loaded.folder), choice, loaded.layout, loaded.default_system()


def layout_system(choice: Choice | None, layout: str) -> Any:
    """The system prompt of a layout for the session's model (unchanged without a model)."""
    if choice is None:
        return gr.skip()
    return default_system_prompt(choice.hd, layout) or ""


def send(
    cache: ModelCache,
    choice: Choice | None,
    query: str,
    files: list[str] | None,
    history: list[tuple[str, str]],
    conv_images: list[str],
    messages: list[dict[str, Any]],
    settings: ChatSettings,
) -> Iterator[tuple[list[dict[str, Any]], list[tuple[str, str]], list[str], str, str]]:
    """Yield (chat messages, history, conversation images, question box, status) as the answer grows.

    A question that cannot be answered leaves the conversation as it was and the question in its box.
    """
    before = list(messages or [])
    try:
        if choice is None:
            raise XcftError("no model loaded; enter a model folder and press Load")
        if not (query or "").strip():
            raise XcftError("empty question")
        images = list(conv_images) if history else [str(f) for f in (files or [])]
        shown = before + ([{"role": "user", "content": {"path": p}} for p in images] if not history else [])
        shown += [{"role": "user", "content": query.strip()}, {"role": "assistant", "content": ""}]
        yield shown, history, conv_images, "", ui.status("answering ...")
        loaded = cache.get(choice.folder)  # loaded again if other pages' models pushed it out
        for answer, new_history in stream_answer(loaded, query, images, history, settings):
            shown[-1] = {"role": "assistant", "content": answer}
            if new_history is None:
                yield shown, history, conv_images, "", gr.skip()
                continue
            if not answer.strip():
                shown[-1] = {"role": "assistant", "content": EMPTY_ANSWER}
            done = ui.status(f"answered turn {len(new_history)} ({len(answer)} characters)", "ok")
            yield shown, new_history, images, "", done
    except Exception as exc:
        yield before, history, conv_images, query, ui.error(exc, ui.CHAT_FIELDS)


def build(cache: ModelCache) -> None:
    """Lay out the Chat tab and wire it (inside a ``gr.Tab``)."""
    with gr.Row():
        c_model = gr.Textbox(
            label="model folder or LoRA adapter folder (its base is found from it)", scale=4, elem_id="chat-model"
        )
        c_load = gr.Button("Load", scale=1, elem_id="chat-load")
    c_status = gr.HTML(ui.status("no model loaded: enter a model folder and press Load"), elem_id="chat-status")
    with gr.Row():
        with gr.Column(scale=1):
            c_images = gr.File(
                label="images (go with the first question)",
                file_count="multiple",
                file_types=["image"],
                type="filepath",
                elem_id="chat-images",
            )
            c_max = gr.Slider(1, 2048, value=256, step=1, label="max new tokens", elem_id="chat-max-new-tokens")
            c_layout = gr.Dropdown(
                list(PROMPT_LAYOUTS),
                value=PROMPT_LAYOUTS[0],
                label="prompt layout (Load sets the one the model records; training: no system prompt, one <s>)",
                elem_id="chat-layout",
            )
            c_system = gr.Textbox(label="system prompt (the layout's; empty: none)", lines=3, max_lines=6, elem_id="chat-system")
            c_sample = gr.Checkbox(
                label="sampling (official settings: top_p 0.8; off: greedy)", value=True, elem_id="chat-sampling"
            )
            c_temp = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature (with sampling)", elem_id="chat-temperature")
        with gr.Column(scale=3):
            c_bot = gr.Chatbot(label="chat", height=520, elem_id="chat-bot")
            c_query = gr.Textbox(label="question", placeholder="Ask about the images; Enter sends", elem_id="chat-query")
            with gr.Row():
                c_send = gr.Button("Send", variant="primary", elem_id="chat-send")
                c_clear = gr.Button("Clear", elem_id="chat-clear")
    c_choice = gr.State(None)  # this session's model
    c_history = gr.State([])
    c_conv_images = gr.State([])

    gr.on([c_load.click, c_model.submit], lambda p: load(cache, p), [c_model], [c_status, c_choice, c_layout, c_system])
    c_layout.input(layout_system, [c_choice, c_layout], [c_system])

    def on_send(choice, query, files, history, conv_images, messages, max_new, system, sampling, temperature, layout):
        settings = ChatSettings(int(max_new), system or "", bool(sampling), float(temperature), layout or None)
        yield from send(cache, choice, query, files, history, conv_images, messages, settings)

    gr.on(
        [c_send.click, c_query.submit],
        on_send,
        [c_choice, c_query, c_images, c_history, c_conv_images, c_bot, c_max, c_system, c_sample, c_temp, c_layout],
        [c_bot, c_history, c_conv_images, c_query, c_status],
    )
    c_clear.click(
        lambda: ([], [], [], "", None, ui.status("cleared: the next question starts a new conversation")),
        None,
        [c_bot, c_history, c_conv_images, c_query, c_images, c_status],
    )

"""The page of ``xcft web``: five tabs (Data, Train, Eval, Chat, Export) wired to the library.

Each tab is one module (:mod:`.data_tab`, :mod:`.train_tab`, :mod:`.eval_tab`, :mod:`.chat_tab`,
:mod:`.export_tab`) that lays itself out and wires its handlers; the work is done by gradio-free
modules (:mod:`.data_view`, :mod:`.train_view`, :mod:`.train_form`, :mod:`.runs`, :mod:`.evals`,
:mod:`.eval_view`, :mod:`.chat`, :mod:`.export`). Training runs and eval runs are child processes
that outlive the server (:class:`~.runs.ChildRuns`). Every handler turns a user error into the CLI's one-line message, in the page's
words; no input can stop the server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

import xcft.commands.web.chat_tab as chat_tab
import xcft.commands.web.data_tab as data_tab
import xcft.commands.web.eval_tab as eval_tab
import xcft.commands.web.export_tab as export_tab
import xcft.commands.web.train_tab as train_tab
from xcft.commands.web.chat import ModelCache
from xcft.commands.web.evals import EvalRuns
from xcft.commands.web.runs import RunManager
from xcft.commands.web.ui import CSS
from xcft.errors import XcftError

logger = logging.getLogger(__name__)


def _carry(data: str, model: str, old_data: str, old_model: str) -> tuple[Any, Any]:
    """The checked data set and model, into another tab's fields that are still empty."""

    def fill(new: str, old: str) -> Any:
        return gr.update(value=new.strip()) if (new or "").strip() and not (old or "").strip() else gr.skip()

    return fill(data, old_data), fill(model, old_model)


def build_app(workdir: str | Path, device: str | None = None) -> Any:
    """The Gradio Blocks of the whole page (not launched)."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    runs = RunManager(workdir)
    evals = EvalRuns(workdir, device)
    models = ModelCache(device)
    with gr.Blocks(title="xcft", analytics_enabled=False) as page:
        gr.Markdown(f"## xcft — finetune InternLM-XComposer2 &nbsp; <small>work folder: `{workdir}`</small>")
        with gr.Tabs():
            with gr.Tab("Data", id="data", elem_id="tab-data"):
                data = data_tab.build()
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab.build(runs, workdir, page)
            with gr.Tab("Eval", id="eval", elem_id="tab-eval"):
                evals_tab = eval_tab.build(evals, page)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat_tab.build(models)
            with gr.Tab("Export", id="export", elem_id="tab-export"):
                export_tab.build()
        # the checked data set and model go into the Train form and the Eval tab where those are still empty
        for to in ([train.fields["data_path"], train.fields["model_name_or_path"]], [evals_tab.data, evals_tab.model]):
            data.checked.then(_carry, [data.data, data.model, *to], to, show_progress="hidden")
    return page


def launch(page: Any, host: str, port: int, *, block: bool = True, on_ready: Callable[[str], None] | None = None) -> Any:
    """Start the server; prints the address."""
    page.queue(default_concurrency_limit=4)
    try:
        app = page.launch(
            server_name=host,
            server_port=port,
            css=CSS,
            ssr_mode=False,
            prevent_thread_lock=True,
            quiet=True,
            show_error=True,
            footer_links=[],
        )
    except OSError as exc:
        raise XcftError(f"cannot listen on {host}:{port} ({exc}); pass another --port") from None
    url = f"http://{host}:{port}/"
    if on_ready is not None:
        on_ready(url)
    if block:
        page.block_thread()
    return app

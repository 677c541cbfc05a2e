"""The Export tab: ``xcft merge`` of an adapter, with its output as it comes and its probe result."""

from __future__ import annotations

import html
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

import xcft.commands.web.ui as ui
from xcft.commands.web.export import MergeProgress, merge_argv, run_merge


def result_html(p: MergeProgress, output: str) -> str:
    """The merge's verdict: the probe difference against its tolerance, or the error in the page's words."""
    if not p.ok or p.check is None:
        return ui.status(ui.in_page_terms(p.error or "merge failed", ui.EXPORT_FIELDS), "error")
    c = p.check
    return (
        f'<div class="xcft-status xcft-ok xcft-probe" data-diff="{c.max_abs_logit_diff!r}" data-tolerance="{c.tolerance!r}">'
        f"merged and verified: max |logit difference| merged vs base + adapter = "
        f'<b class="xcft-diff">{c.max_abs_logit_diff:.3e}</b> (tolerance {c.tolerance:.1e}; '
        f"probe of {c.probe_tokens} tokens, {c.probe_images} image(s)); written to "
        f"<code>{html.escape(output.strip())}</code></div>"
    )


def merge(adapter: str, base: str, output: str) -> Iterator[tuple[str, str]]:
    """Yield (result, log): at once a "merging" line (the last result leaves the page), then the output as it comes."""
    yield ui.status("merging: checking the folders ...", merging=1), ""
    try:
        argv = merge_argv(adapter, output, base)
        if not Path(adapter.strip()).expanduser().is_dir():
            raise FileNotFoundError(f"adapter folder {adapter.strip()} does not exist")
        for p in run_merge(argv, output.strip()):
            yield (result_html(p, output) if p.done else ui.status("merging ...", merging=1)), p.log
    except FileNotFoundError as exc:
        yield ui.status(str(exc), "error"), ""
    except Exception as exc:
        yield ui.error(exc, ui.EXPORT_FIELDS), ""


def build() -> None:
    """Lay out the Export tab and wire it (inside a ``gr.Tab``)."""
    gr.Markdown(
        "Merge a LoRA adapter into its base (`xcft merge`): the merged folder is reloaded and "
        "checked against base + adapter on a probe image and text before it is moved into place."
    )
    with gr.Row():
        e_adapter = gr.Textbox(label="LoRA adapter folder (a --use_lora output)", elem_id="export-adapter")
        e_base = gr.Textbox(label="base model (empty: the one the adapter names)", elem_id="export-base")
        e_output = gr.Textbox(label="output folder for the merged model", elem_id="export-output")
    e_merge = gr.Button("Merge", variant="primary", elem_id="export-merge")
    e_result = gr.HTML(elem_id="export-result")
    e_log = gr.Textbox(label="xcft merge output", lines=10, interactive=False, elem_id="export-log")
    e_merge.click(merge, [e_adapter, e_base, e_output], [e_result, e_log], show_progress_on=[e_result])

"""The page of ``xcft web``: four tabs (Data, Train, Chat, Export) wired to the library.

Only layout and event wiring live here; the work is done by :mod:`.data_view` (check-data pass,
sample view), :mod:`.train_form` (form <-> ``xcft train`` options), :mod:`.runs` (training
subprocesses), :mod:`.chat` and :mod:`.export`. Every handler turns a user error into the CLI's
one-line message shown in the page; no input can stop the server.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

import xcft.commands.web.data_view as data_view
import xcft.commands.web.train_form as train_form
from xcft.commands.web.chat import ChatModel
from xcft.commands.web.export import merge_argv, run_merge
from xcft.commands.web.runs import RunManager, RunStatus
from xcft.errors import XcftError
from xcft.model.template_xcomposer2 import OFFICIAL_SYSTEM_PROMPT

logger = logging.getLogger(__name__)

REFRESH_S = 1.0

CSS = """
.xcft-status { padding: 6px 10px; border-radius: 6px; background: var(--background-fill-secondary); }
.xcft-error { background: #fde8e8; color: #9b1c1c; font-weight: 600; }
.xcft-ok { background: #e7f6ec; color: #14532d; }
.xcft-sample { font-size: 14px; }
.xcft-where { font-weight: 600; margin-bottom: 4px; }
.xcft-counts { display: flex; flex-wrap: wrap; gap: 14px; margin: 6px 0; }
.xcft-truncated { color: #b45309; }
.xcft-thumbs { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0; }
.xcft-thumb { margin: 0; border: 1px solid #ccc; border-radius: 6px; padding: 4px; text-align: center; }
.xcft-thumb img { max-width: 160px; max-height: 160px; display: block; margin: auto; }
.xcft-thumb figcaption { font-size: 12px; max-width: 160px; overflow-wrap: anywhere; }
.xcft-dropped { opacity: 0.45; }
.xcft-broken { width: 160px; color: #9b1c1c; font-size: 12px; }
.xcft-seq { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.7;
            border: 1px solid #ddd; border-radius: 6px; padding: 8px; max-height: 480px; overflow: auto; }
.xcft-trained { background: #bbf7d0; color: #14532d; border-radius: 3px; }
.xcft-context { color: inherit; }
.xcft-special { color: #6b7280; font-size: 11px; }
.xcft-slot { display: inline-block; background: #dbeafe; color: #1e3a8a; border: 1px solid #93c5fd;
             border-radius: 4px; padding: 0 6px; margin: 0 2px; font-size: 12px; }
.xcft-cut { display: inline-block; background: #fef3c7; color: #92400e; border-radius: 4px; padding: 0 6px; }
.xcft-legend { font-size: 12px; margin: 4px 0; }
.xcft-problems { margin: 4px 0; padding-left: 18px; }
.xcft-problem.xcft-error { background: none; }
.xcft-run progress { width: 100%; height: 14px; }
.xcft-probe { font-size: 16px; }
#train-log textarea, #export-log textarea { font-family: ui-monospace, monospace; font-size: 12px; }
"""


def _message(exc: BaseException) -> str:
    """The one-line message of an error (user errors as the CLI prints them; anything else named)."""
    if isinstance(exc, XcftError):
        return str(exc)
    logger.exception("unexpected error in a web handler")
    return f"{type(exc).__name__}: {exc}"


def _status(text: str, kind: str = "") -> str:
    cls = {"error": " xcft-error", "ok": " xcft-ok"}.get(kind, "")
    prefix = "error: " if kind == "error" else ""
    return f'<div class="xcft-status{cls}">{html.escape(prefix + text)}</div>'


def _error(exc: BaseException) -> str:
    return _status(_message(exc), "error")


def _int_or_none(value: Any) -> int | None:
    if value is None or value == "" or int(value) <= 0:
        return None
    return int(value)


# --------------------------------------------------------------------------- Data tab handlers


def _data_outputs_empty(message_html: str) -> tuple[Any, ...]:
    return message_html, None, None, None, "", None, "", gr.update()


def check_data(
    data: str,
    model: str,
    img_size: Any,
    max_length: Any,
    given_num: bool,
    level: str,
    text: str,
    progress: Any = None,
    hd_num: Any = None,
) -> tuple[Any, ...]:
    """The one check-data pass; returns status, summary, histogram, problems, counts, index, sample, index box."""
    import pandas as pd  # lazy: gradio tables only, slow to import

    phases = {"reading": (0.0, 0.1), "images": (0.1, 0.5), "encoding": (0.5, 1.0)}

    def report(phase: str, done: int, total: int) -> None:
        if progress is not None:
            lo, hi = phases.get(phase, (0.0, 1.0))
            progress(lo + (hi - lo) * (done / max(total, 1)), desc=f"{phase} {done}/{total}")

    try:
        start = time.perf_counter()
        index = data_view.build_index(
            data,
            model,
            _int_or_none(img_size),
            _int_or_none(max_length),
            bool(given_num),
            progress=report,
            hd_num=_int_or_none(hd_num),
        )
        took = time.perf_counter() - start
    except Exception as exc:
        return _data_outputs_empty(_error(exc))
    summary = pd.DataFrame(data_view.summary_rows(index), columns=data_view.SUMMARY_HEADERS)
    rows, matching = data_view.problem_rows(index, level, text)
    kind = "ok" if index.result.ok else "error"
    status = (
        f'<div class="xcft-status xcft-{kind}" data-samples="{index.total}" data-seconds="{took:.2f}">'
        f"{html.escape(data_view.verdict(index))} (checked in {took:.1f} s)</div>"
    )
    if index.result.spec is None:  # the data path itself is wrong: its problem is the message
        first = index.result.problems[0] if index.result.problems else None
        return _data_outputs_empty(_status(str(first) if first else "no data", "error"))
    first_view = _view_html(index, 0) if index.total else ""
    return (
        status,
        summary,
        data_view.length_histogram(index),
        _problems_frame(rows),
        _problem_count(len(rows), matching),
        index,
        first_view,
        0 if index.total else None,
    )


def _problems_frame(rows: list[list[Any]]) -> Any:
    import pandas as pd  # lazy: gradio tables only, slow to import

    return pd.DataFrame(rows, columns=data_view.PROBLEM_HEADERS)


def _problem_count(shown: int, matching: int) -> str:
    if matching == 0:
        return "no problem matches"
    if shown < matching:
        return f"{matching} problem(s) match; the first {shown} are listed (narrow the filter to see others)"
    return f"{matching} problem(s)"


def filter_problems(index: data_view.DataIndex | None, level: str, text: str) -> tuple[Any, str]:
    if index is None:
        return None, ""
    rows, matching = data_view.problem_rows(index, level, text)
    return _problems_frame(rows), _problem_count(len(rows), matching)


def _view_html(index: data_view.DataIndex, overall: int) -> str:
    try:
        return data_view.sample_view(index, overall).html
    except Exception as exc:
        return _error(exc)


def show_sample(index: data_view.DataIndex | None, overall: Any, sample_id: str = "", step: int = 0) -> tuple[str, Any]:
    """The sample view for an overall index (moved by ``step``) or, when given, an id."""
    if index is None:
        return _status("check a data set first (press Check)", "error"), overall
    try:
        if sample_id and sample_id.strip():
            target = index.index_of_id(sample_id.strip())
        else:
            if overall is None or overall == "":
                raise XcftError("enter a sample index or id")
            target = int(overall) + step
            target = min(max(target, 0), max(index.total - 1, 0))
        return data_view.sample_view(index, target).html, target
    except Exception as exc:
        return _error(exc), overall


# --------------------------------------------------------------------------- Train tab helpers


def _run_status_html(st: RunStatus | None) -> str:
    if st is None:
        return '<div class="xcft-run xcft-status" data-state="none">no run yet: fill the form and press Start</div>'
    pct = f'<progress value="{st.step}" max="{max(st.max_steps, 1)}"></progress>' if st.max_steps else ""
    eta = f" · ETA {_duration(st.eta_s)}" if st.eta_s is not None and st.active else ""
    steps = f"step {st.step} / {st.max_steps}{eta}" if st.max_steps else "waiting for the first step"
    last = f", last {st.loss[-1][1]:.4f}" if st.loss else ""
    ev = (
        f' · <span class="xcft-eval-points" data-n="{len(st.eval_loss)}">{len(st.eval_loss)} eval point(s)</span>'
        if st.eval_loss
        else ""
    )
    kind = {"failed": " xcft-error", "ended": " xcft-error", "finished": " xcft-ok"}.get(st.state, "")
    return (
        f'<div class="xcft-run xcft-status{kind}" data-state="{st.state}" data-run="{html.escape(st.run_id)}">'
        f'<div><b class="xcft-run-state">{st.state}</b> — <span class="xcft-run-message">{html.escape(st.message)}</span></div>'
        f"{pct}<div>{steps} · "
        f'<span class="xcft-loss-points" data-n="{len(st.loss)}">{len(st.loss)} loss point(s){last}</span>{ev}</div>'
        f"<div>output: <code>{html.escape(st.output_dir)}</code>"
        + (f" · checkpoints: {', '.join(html.escape(Path(c).name) for c in st.checkpoints)}" if st.checkpoints else "")
        + "</div></div>"
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def loss_figure(st: RunStatus | None) -> Any:
    from matplotlib.figure import Figure  # lazy: only for plots, slow to import

    fig = Figure(figsize=(7, 3.2), dpi=90)
    ax = fig.add_subplot(1, 1, 1)
    if st is not None and st.loss:
        ax.plot(
            [s for s, _ in st.loss],
            [v for _, v in st.loss],
            label="train loss",
            linewidth=1.3,
            marker="." if len(st.loss) < 60 else None,
        )
    if st is not None and st.eval_loss:
        ax.plot([s for s, _ in st.eval_loss], [v for _, v in st.eval_loss], "o-", label="eval loss")
    if st is None or not (st.loss or st.eval_loss):
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _suggest_output_dir(workdir: Path) -> str:
    return str((workdir / "output" / time.strftime("%Y%m%d-%H%M%S")).resolve())


# --------------------------------------------------------------------------- the page


def build_app(workdir: str | Path, device: str | None = None) -> Any:
    """The Gradio Blocks of the whole page (not launched)."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    runs = RunManager(workdir)
    chat_model = ChatModel(device)
    fields = train_form.form_fields()

    with gr.Blocks(title="xcft", analytics_enabled=False) as demo:
        gr.Markdown(f"## xcft — finetune InternLM-XComposer2 &nbsp; <small>work folder: `{workdir}`</small>")
        with gr.Tabs():
            # ------------------------------------------------------------------ Data
            with gr.Tab("Data", id="data", elem_id="tab-data"):
                with gr.Row():
                    d_data = gr.Textbox(
                        label="data.txt or .json/.jsonl", placeholder="/path/to/data.txt", scale=3, elem_id="data-path"
                    )
                    d_model = gr.Textbox(label="model folder (tokenizer, img_size, max_length)", scale=3, elem_id="data-model")
                    d_img = gr.Number(label="img_size (0: the model's)", value=0, precision=0, scale=1, elem_id="data-img-size")
                    d_max = gr.Number(
                        label="max_length (0: the model's)", value=0, precision=0, scale=1, elem_id="data-max-length"
                    )
                    d_hd = gr.Number(
                        label="hd_num (2.5 models; 0: the default)", value=0, precision=0, scale=1, elem_id="data-hd-num"
                    )
                    d_given = gr.Checkbox(label="given_num (numbers are thousands)", value=True, scale=1)
                d_check = gr.Button("Check", variant="primary", elem_id="data-check")
                d_status = gr.HTML(elem_id="data-status")
                d_summary = gr.Dataframe(
                    headers=data_view.SUMMARY_HEADERS,
                    label="summary per file (check-data)",
                    interactive=False,
                    elem_id="data-summary",
                    wrap=True,
                    column_widths=["28%", *(["8%"] * 9)],
                )
                d_hist = gr.Plot(label="token lengths per file (dashed: max_length)", format="png", elem_id="data-hist")
                with gr.Row():
                    d_level = gr.Dropdown(
                        ["all", *data_view.LEVELS], value="all", label="level", scale=1, elem_id="problems-level"
                    )
                    d_filter = gr.Textbox(label="filter (file, id or text)", scale=3, elem_id="problems-filter")
                d_count = gr.Markdown(elem_id="problems-count")
                d_problems = gr.Dataframe(
                    headers=data_view.PROBLEM_HEADERS,
                    label="problems (click a row to open its sample)",
                    interactive=False,
                    elem_id="data-problems",
                    wrap=True,
                    max_height=360,
                    column_widths=["7%", "16%", "5%", "6%", "8%", "30%", "21%", "7%"],
                )
                with gr.Row():
                    d_index = gr.Number(
                        label="sample index (overall, data.txt order)", value=None, precision=0, elem_id="sample-index"
                    )
                    d_id = gr.Textbox(label="or sample id", elem_id="sample-id")
                    d_show = gr.Button("Show", elem_id="sample-show")
                    d_prev = gr.Button("◀ Previous", elem_id="sample-prev")
                    d_next = gr.Button("Next ▶", elem_id="sample-next")
                d_sample = gr.HTML(elem_id="sample-view")
                d_state = gr.State(None)

            # ------------------------------------------------------------------ Train
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                comps: list[Any] = []
                common = [f for f in fields if f.common]
                rest = [f for f in fields if not f.common]

                def component(f: train_form.FormField) -> Any:
                    kw: dict[str, Any] = {"label": f.name, "info": f.help or None, "elem_id": f"train-{f.name}"}
                    if f.kind == "bool":
                        return gr.Checkbox(value=f.form_default(), **kw)
                    if f.kind in ("choice", "optional_bool"):
                        return gr.Dropdown(list(f.choices), value=f.form_default(), allow_custom_value=f.kind == "choice", **kw)
                    if f.kind in ("int", "float"):
                        return gr.Number(value=f.form_default(), precision=0 if f.kind == "int" else None, **kw)
                    return gr.Textbox(value=f.form_default(), **kw)

                with gr.Row(equal_height=False):
                    for column in (common[0::3], common[1::3], common[2::3]):
                        with gr.Column():
                            comps += [(f, component(f)) for f in column]
                with gr.Accordion(f"all other options ({len(rest)})", open=False, elem_id="train-more"):
                    for group, title in train_form.GROUP_TITLES.items():
                        members = [f for f in rest if f.group == group]
                        if not members:
                            continue
                        with gr.Accordion(f"{title} ({len(members)})", open=False), gr.Row():
                            for column in (members[0::3], members[1::3], members[2::3]):
                                with gr.Column():
                                    comps += [(f, component(f)) for f in column]
                form_fields = [f for f, _ in comps]
                form_comps = [c for _, c in comps]
                with gr.Row():
                    t_cmd = gr.Code(label="equivalent command", language="shell", interactive=False, elem_id="train-command")
                    t_yaml = gr.Code(
                        label="the same as YAML (xcft train config.yaml)",
                        language="yaml",
                        interactive=False,
                        elem_id="train-yaml",
                    )
                with gr.Row():
                    t_start = gr.Button("Start", variant="primary", elem_id="train-start")
                    t_stop = gr.Button("Stop (SIGTERM: checkpoint, then stop)", variant="stop", elem_id="train-stop")
                    t_resume = gr.Button("Resume from the latest checkpoint", elem_id="train-resume")
                    t_run = gr.Dropdown([], label="run", value=None, allow_custom_value=True, elem_id="train-run", scale=2)
                t_action = gr.HTML(elem_id="train-action")
                t_status = gr.HTML(_run_status_html(None), elem_id="train-status")
                t_plot = gr.Plot(label="loss", format="png", elem_id="train-loss")
                t_log = gr.Textbox(
                    label="log (xcft train output)",
                    lines=14,
                    max_lines=14,
                    autoscroll=True,
                    interactive=False,
                    elem_id="train-log",
                )
                t_sig = gr.State(None)
                t_timer = gr.Timer(REFRESH_S)

            # ------------------------------------------------------------------ Chat
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                with gr.Row():
                    c_model = gr.Textbox(
                        label="model folder or LoRA adapter folder (its base is found from it)", scale=4, elem_id="chat-model"
                    )
                    c_load = gr.Button("Load", scale=1, elem_id="chat-load")
                c_status = gr.HTML(elem_id="chat-status")
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
                        c_system = gr.Textbox(
                            value=OFFICIAL_SYSTEM_PROMPT,
                            label="system prompt (the official one; empty: none)",
                            lines=3,
                            max_lines=6,
                            elem_id="chat-system",
                        )
                        c_sample = gr.Checkbox(
                            label="sampling (official settings: top_p 0.8; off: greedy)", value=True, elem_id="chat-sampling"
                        )
                        c_temp = gr.Slider(
                            0.05, 2.0, value=1.0, step=0.05, label="temperature (with sampling)", elem_id="chat-temperature"
                        )
                        c_layout = gr.Checkbox(
                            label="prompt as training encodes it (one <s>; models trained only with xcft)",
                            value=False,
                            elem_id="chat-training-layout",
                        )
                    with gr.Column(scale=3):
                        c_bot = gr.Chatbot(label="chat", height=520, elem_id="chat-bot")
                        c_query = gr.Textbox(
                            label="question", placeholder="Ask about the images; Enter sends", elem_id="chat-query"
                        )
                        with gr.Row():
                            c_send = gr.Button("Send", variant="primary", elem_id="chat-send")
                            c_clear = gr.Button("Clear", elem_id="chat-clear")
                c_history = gr.State([])
                c_conv_images = gr.State([])

            # ------------------------------------------------------------------ Export
            with gr.Tab("Export", id="export", elem_id="tab-export"):
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

        # ================================================================== wiring: Data
        check_inputs = [d_data, d_model, d_img, d_max, d_given, d_level, d_filter, d_hd]
        check_outputs = [d_status, d_summary, d_hist, d_problems, d_count, d_state, d_sample, d_index]

        def on_check(data, model, img, max_len, given, level, text, hd, progress=gr.Progress()):  # noqa: B008
            out = check_data(data, model, img, max_len, given, level, text, progress, hd_num=hd)
            # a fresh mark on every answer, so the page (and a test) can tell a new result from the last one
            return (f'<div class="xcft-check" data-done="{time.time():.6f}">{out[0]}</div>', *out[1:])

        d_check.click(on_check, check_inputs, check_outputs, concurrency_limit=2)
        d_data.submit(on_check, check_inputs, check_outputs, concurrency_limit=2)
        gr.on(
            [d_level.change, d_filter.submit, d_filter.blur], filter_problems, [d_state, d_level, d_filter], [d_problems, d_count]
        )
        d_show.click(lambda s, i, sid: show_sample(s, i, sid), [d_state, d_index, d_id], [d_sample, d_index])
        d_id.submit(lambda s, i, sid: show_sample(s, i, sid), [d_state, d_index, d_id], [d_sample, d_index])
        d_index.submit(lambda s, i: show_sample(s, i), [d_state, d_index], [d_sample, d_index])
        d_prev.click(lambda s, i: show_sample(s, i, step=-1), [d_state, d_index], [d_sample, d_index])
        d_next.click(lambda s, i: show_sample(s, i, step=1), [d_state, d_index], [d_sample, d_index])

        def on_problem_select(index, evt: gr.SelectData):
            row = evt.row_value or []
            overall = row[-1] if row else None
            if overall in (None, ""):
                return _status("this problem concerns the whole file (or a data.txt line), not one sample"), gr.update()
            return show_sample(index, int(overall))

        d_problems.select(on_problem_select, [d_state], [d_sample, d_index])

        # ================================================================== wiring: Train
        def preview(*values):
            try:
                changed = train_form.changed_values(form_fields, values)
                argv = train_form.to_argv(changed)
                return train_form.command_preview(argv), train_form.yaml_preview(changed)
            except Exception as exc:
                return f"# error: {_message(exc)}", ""

        # always_last: a burst of edits ends with the preview of the final form, never a stale one
        gr.on(
            [c.change for c in form_comps],
            preview,
            form_comps,
            [t_cmd, t_yaml],
            show_progress="hidden",
            trigger_mode="always_last",
        )

        out_comp = form_comps[[f.name for f in form_fields].index("output_dir")]

        def on_start(*values):
            try:
                changed = train_form.changed_values(form_fields, values)
                if not changed.get("output_dir"):
                    changed["output_dir"] = _suggest_output_dir(workdir)
                run_id = runs.start(train_form.to_argv(changed), str(changed["output_dir"]))
            except Exception as exc:
                return _error(exc), gr.update(), gr.update()
            # a folder the page suggested is replaced by a fresh suggestion for the next run; one the user typed stays
            next_output = gr.update()
            if Path(str(changed["output_dir"])).parent == workdir / "output":
                time.sleep(1.1)  # the next suggestion gets another time stamp
                next_output = gr.update(value=_suggest_output_dir(workdir))
            return _status(f"started run {run_id}", "ok"), gr.update(choices=runs.run_ids(), value=run_id), next_output

        t_start.click(on_start, form_comps, [t_action, t_run, out_comp])

        def on_stop(run_id):
            try:
                if not run_id:
                    raise XcftError("no run selected")
                return _status(runs.stop(run_id), "ok")
            except Exception as exc:
                return _error(exc)

        def on_resume(run_id):
            try:
                if not run_id:
                    raise XcftError("no run selected")
                runs.resume(run_id)
                return _status(f"resuming run {run_id} from its latest checkpoint", "ok")
            except Exception as exc:
                return _error(exc)

        t_stop.click(on_stop, [t_run], [t_action])
        t_resume.click(on_resume, [t_run], [t_action])

        def refresh(run_id, last_sig):
            if not run_id:
                return _run_status_html(None), gr.skip(), "", last_sig
            try:
                st = runs.status(run_id)
            except Exception as exc:
                return _error(exc), gr.skip(), "", last_sig
            sig = (run_id, len(st.loss), len(st.eval_loss), st.state)
            plot = loss_figure(st) if sig != last_sig else gr.skip()
            return _run_status_html(st), plot, runs.log_tail(run_id), sig

        t_timer.tick(refresh, [t_run, t_sig], [t_status, t_plot, t_log, t_sig], show_progress="hidden")
        t_run.change(lambda r: refresh(r, None), [t_run], [t_status, t_plot, t_log, t_sig], show_progress="hidden")

        out_pos = [f.name for f in form_fields].index("output_dir")

        def on_load(*raw):
            values = list(raw)
            if not values[out_pos]:
                values[out_pos] = _suggest_output_dir(workdir)
            cmd, yaml_text = preview(*values)
            ids = runs.run_ids()
            return gr.update(choices=ids, value=ids[0] if ids else None), values[out_pos], cmd, yaml_text

        demo.load(on_load, form_comps, [t_run, out_comp, t_cmd, t_yaml])

        # ================================================================== wiring: Chat
        def on_load_model(path):
            try:
                return _status(chat_model.load(path), "ok")
            except Exception as exc:
                return _error(exc)

        c_load.click(on_load_model, [c_model], [c_status])
        c_model.submit(on_load_model, [c_model], [c_status])

        def on_send(query, files, history, conv_images, messages, max_new, system, sampling, temperature, layout):
            messages = list(messages or [])
            try:
                images = list(conv_images) if history else [str(f) for f in (files or [])]
                if not (query or "").strip():
                    raise XcftError("empty question")
                if not history:
                    messages += [{"role": "user", "content": {"path": p}} for p in images]
                messages += [{"role": "user", "content": query.strip()}, {"role": "assistant", "content": ""}]
                yield messages, history, images, "", _status("answering ...")
                for answer, new_history in chat_model.stream(
                    query,
                    images,
                    history,
                    max_new_tokens=int(max_new),
                    system=None if (system or "").strip() == OFFICIAL_SYSTEM_PROMPT.strip() else (system or "").strip(),
                    sampling=bool(sampling),
                    temperature=float(temperature),
                    training_layout=bool(layout),
                ):
                    messages[-1] = {"role": "assistant", "content": answer}
                    if new_history is None:
                        yield messages, history, images, "", gr.skip()
                    else:
                        yield (
                            messages,
                            new_history,
                            images,
                            "",
                            _status(f"answered turn {len(new_history)} ({len(answer)} characters)", "ok"),
                        )
            except Exception as exc:
                while messages and messages[-1].get("role") == "assistant" and not messages[-1].get("content"):
                    messages = messages[:-1]
                yield messages, history, conv_images, query, _error(exc)

        send_io = (
            [c_query, c_images, c_history, c_conv_images, c_bot, c_max, c_system, c_sample, c_temp, c_layout],
            [c_bot, c_history, c_conv_images, c_query, c_status],
        )
        c_send.click(on_send, *send_io)
        c_query.submit(on_send, *send_io)
        c_clear.click(
            lambda: ([], [], [], "", _status("cleared: the next question starts a new conversation")),
            None,
            [c_bot, c_history, c_conv_images, c_query, c_status],
        )

        # ================================================================== wiring: Export
        def on_merge(adapter, base, output):
            try:
                argv = merge_argv(adapter, output, base)
                for p in run_merge(argv):
                    if not p.done:
                        yield _status("merging ..."), p.log
                        continue
                    if p.ok:
                        probe = (
                            f'<div class="xcft-status xcft-ok xcft-probe" data-diff="{html.escape(p.diff or "")}">'
                            f"merged and verified: max |logit difference| merged vs base + adapter = "
                            f'<b class="xcft-diff">{html.escape(p.diff or "?")}</b> '
                            f"(tolerance {html.escape(p.tolerance or '?')}); written to "
                            f"<code>{html.escape(output.strip())}</code></div>"
                        )
                        yield probe, p.log
                    else:
                        yield _status(p.error or "merge failed", "error"), p.log
            except Exception as exc:
                yield _error(exc), ""

        e_merge.click(on_merge, [e_adapter, e_base, e_output], [e_result, e_log])
    return demo


def launch(demo: Any, host: str, port: int, *, block: bool = True, on_ready: Callable[[str], None] | None = None) -> Any:
    """Start the server; prints the address."""
    demo.queue(default_concurrency_limit=4)
    try:
        app = demo.launch(
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
        demo.block_thread()
    return app

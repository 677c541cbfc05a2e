"""The Train tab: the ``xcft train`` form, its command and YAML, and the runs started from the page.

Selecting a run (or reloading the page, which selects the newest) puts the form, command and YAML
back to what that run was started with; a timer refreshes the selected run's status, loss curve
and log, and which of *Stop* / *Resume* apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

import xcft.commands.web.train_form as train_form
import xcft.commands.web.train_view as train_view
import xcft.commands.web.ui as ui
from xcft.commands.web.runs import RunManager

REFRESH_S = 1.0


def preview(fields: list[train_form.FormField], values: list[Any]) -> tuple[str, str]:
    """The equivalent command and YAML of the form values (an error in place of the command)."""
    try:
        changed = train_form.changed_values(fields, values)
        return train_form.command_preview(train_form.to_argv(changed)), train_form.yaml_preview(changed)
    except Exception as exc:
        return f"# error: {ui.message(exc)}", ""


def start(runs: RunManager, workdir: Path, fields: list[train_form.FormField], values: list[Any]) -> tuple[str, str | None]:
    """Start a run from the form: (status line, the new run's id or None)."""
    try:
        changed = train_form.changed_values(fields, values)
        if not changed.get("output_dir"):
            changed["output_dir"] = train_view.suggest_output_dir(workdir, runs)
        run_id = runs.start(train_form.to_argv(changed), str(changed["output_dir"]))
    except Exception as exc:
        return ui.error(exc), None
    return ui.status(f"started run {run_id}", "ok"), run_id


def stop(runs: RunManager, run_id: str | None) -> str:
    if not run_id:
        return ui.status("no run selected", "error")
    try:
        return ui.status(runs.stop(run_id), "ok")
    except Exception as exc:
        return ui.error(exc)


def resume(runs: RunManager, run_id: str | None) -> str:
    if not run_id:
        return ui.status("no run selected", "error")
    try:
        runs.resume(run_id)
    except Exception as exc:
        return ui.error(exc)
    return ui.status(f"resuming run {run_id} from its latest checkpoint", "ok")


@dataclass
class TrainTab:
    """The Train tab's components other tabs fill."""

    fields: dict[str, Any]  # option name -> form component


def _component(f: train_form.FormField) -> Any:
    kw: dict[str, Any] = {"label": f.label, "info": f.help or None, "elem_id": f"train-{f.name}"}
    if f.kind == "bool":
        return gr.Checkbox(value=f.form_default(), **kw)
    if f.kind in ("choice", "optional_bool"):
        return gr.Dropdown(list(f.choices), value=f.form_default(), allow_custom_value=f.kind == "choice", **kw)
    if f.kind in ("int", "float"):
        return gr.Number(value=f.form_default(), precision=0 if f.kind == "int" else None, **kw)
    return gr.Textbox(value=f.form_default(), **kw)


def _form() -> tuple[list[train_form.FormField], list[Any]]:
    """The form: common fields in three columns, the rest folded by group."""
    fields = train_form.form_fields()
    common = [f for f in fields if f.common]
    rest = [f for f in fields if not f.common]
    comps: list[tuple[train_form.FormField, Any]] = []
    with gr.Row(equal_height=False):
        for column in (common[0::3], common[1::3], common[2::3]):
            with gr.Column():
                comps += [(f, _component(f)) for f in column]
    with gr.Accordion(f"all other options ({len(rest)})", open=False, elem_id="train-more"):
        for group, title in train_form.GROUP_TITLES.items():
            members = [f for f in rest if f.group == group]
            if not members:
                continue
            with gr.Accordion(f"{title} ({len(members)})", open=False), gr.Row():
                for column in (members[0::3], members[1::3], members[2::3]):
                    with gr.Column():
                        comps += [(f, _component(f)) for f in column]
    return [f for f, _ in comps], [c for _, c in comps]


def build(runs: RunManager, workdir: Path, page: gr.Blocks) -> TrainTab:
    """Lay out the Train tab and wire it (inside a ``gr.Tab``)."""
    fields, form = _form()
    with gr.Row():
        t_cmd = gr.Code(label="equivalent command", language="shell", interactive=False, elem_id="train-command")
        t_yaml = gr.Code(
            label="the same as YAML (xcft train config.yaml)", language="yaml", interactive=False, elem_id="train-yaml"
        )
    with gr.Row():
        t_start = gr.Button("Start", variant="primary", elem_id="train-start")
        t_new = gr.Button("New output folder", elem_id="train-new")
        t_stop = gr.Button("Stop (SIGTERM: checkpoint, then stop)", variant="stop", interactive=False, elem_id="train-stop")
        t_resume = gr.Button("Resume from the latest checkpoint", interactive=False, elem_id="train-resume")
        t_run = gr.Dropdown([], label="run", value=None, allow_custom_value=True, elem_id="train-run", scale=2)
    t_action = gr.HTML(elem_id="train-action")
    t_status = gr.HTML(train_view.status_html(None), elem_id="train-status")
    t_plot = gr.Plot(label="loss", format="png", elem_id="train-loss")
    t_log = gr.HTML(ui.log_html(""), label="log (xcft train output)", elem_id="train-log")
    t_key = gr.State(None)  # what the plot shows: redrawn only when it changes
    t_timer = gr.Timer(REFRESH_S)
    quiet: dict[str, Any] = {"show_progress": "hidden"}

    # always_last: a burst of edits ends with the preview of the final form, never a stale one
    gr.on(
        [c.change for c in form], lambda *v: preview(fields, list(v)), form, [t_cmd, t_yaml], trigger_mode="always_last", **quiet
    )

    def on_start(*values):
        message, run_id = start(runs, workdir, fields, list(values))
        return message, (gr.update(choices=runs.run_ids(), value=run_id) if run_id else gr.skip())

    t_start.click(on_start, form, [t_action, t_run])
    t_stop.click(lambda r: stop(runs, r), [t_run], [t_action])
    t_resume.click(lambda r: resume(runs, r), [t_run], [t_action])

    view_outputs = [t_status, t_plot, t_log, t_key, t_stop, t_resume]

    def refresh(run_id, last_key):
        view = train_view.run_view(runs, run_id)
        plot = train_view.loss_figure(view.run) if view.plot_key != last_key else gr.skip()
        buttons = gr.update(interactive=view.can_stop), gr.update(interactive=view.can_resume)
        return view.status, plot, view.log, view.plot_key, *buttons

    t_timer.tick(refresh, [t_run, t_key], view_outputs, **quiet)

    def on_select(run_id):
        """The run's view, and the form, command and YAML it was started with."""
        shown = refresh(run_id, None)
        if not run_id:
            return (*shown, *[gr.skip()] * (len(form) + 2))
        try:
            values = train_view.form_of_run(runs, run_id, fields)
        except Exception as exc:
            return (ui.error(exc), *shown[1:], *[gr.skip()] * (len(form) + 2))
        return (*shown, *values, *preview(fields, values))

    t_run.change(on_select, [t_run], [*view_outputs, *form, t_cmd, t_yaml], **quiet)

    out_comp = form[[f.name for f in fields].index("output_dir")]

    def on_page_load():
        ids = runs.run_ids()
        if ids:  # the newest run is selected: its change event restores its form
            return gr.update(choices=ids, value=ids[0]), gr.skip()
        return gr.update(choices=[], value=None), train_view.suggest_output_dir(workdir, runs)

    page.load(on_page_load, None, [t_run, out_comp], **quiet)
    # the same settings again, into a fresh folder (a selected run's own folder already holds that run)
    t_new.click(lambda: train_view.suggest_output_dir(workdir, runs), None, [out_comp], **quiet)
    return TrainTab({f.name: c for f, c in zip(fields, form)})

"""The web page's training runs without a browser: start, follow, stop, resume, fail, and a new server.

The runs execute a small stand-in for ``xcft train`` that keeps its file contract through
:mod:`xcft.run_files` and :mod:`xcft.output_dir` (trainer log lines, marked checkpoints written on
SIGTERM, exit 143, the one-line ``error:``), so the state machine is tested in seconds; the browser
tests run the real ``xcft train``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from xcft.commands.web import train_form, train_view
from xcft.commands.web.runs import RunManager
from xcft.run_files import complete_checkpoints, find_last_checkpoint

FAKE_TRAIN = '''
"""Stand-in for xcft train: --output_dir, --max_steps, --step_s, --fail_at, --resume_from_checkpoint."""
import signal, sys, time
from pathlib import Path
from xcft.output_dir import write_marker
from xcft.run_files import EXIT_SIGTERM, TRAINER_LOG_NAME, TRAINER_STATE_NAME, find_last_checkpoint, trainer_log_record

args, key = {}, None
for word in sys.argv[1:]:
    if word.startswith("--"):
        key = word[2:]
        args[key] = ""
    else:
        args[key] = word
out = Path(args["output_dir"])
out.mkdir(parents=True, exist_ok=True)
write_marker(out, "train")
max_steps, step_s = int(args.get("max_steps", 4)), float(args.get("step_s", 0.05))
start = 0
if args.get("resume_from_checkpoint") == "true":
    last = find_last_checkpoint(out)
    start = int(last.rsplit("-", 1)[1])
    print(f"resuming from {last}", flush=True)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))


def save(step):
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir()
    (ckpt / TRAINER_STATE_NAME).write_text("{}")
    write_marker(ckpt, "train")


with open(out / TRAINER_LOG_NAME, "a") as log:
    log.write(trainer_log_record("begin", start, max_steps, None, time.time()))
    for step in range(start + 1, max_steps + 1):
        time.sleep(step_s)
        per_file = {"loss/a.json": 8.0 / step, "loss/b.json": 12.0 / step} if "two_files" in args else {}
        log.write(trainer_log_record("log", step, max_steps, None, time.time(), {"loss": 10.0 / step, **per_file}))
        log.flush()
        if int(args.get("fail_at", 0)) == step:
            print("error: the data went away (restore it and press Resume)", flush=True)
            sys.exit(1)
        if stop:
            save(step)
            print("stopped by SIGTERM", flush=True)
            sys.exit(EXIT_SIGTERM)
(out / TRAINER_STATE_NAME).write_text("{}")
write_marker(out, "train", [TRAINER_STATE_NAME, TRAINER_LOG_NAME])
print("finished", flush=True)
'''


@pytest.fixture
def manager(tmp_path: Path) -> Callable[[], RunManager]:
    """``manager()``: a RunManager on one work folder whose runs execute the stand-in (a new one = a new server)."""
    script = tmp_path / "fake_xcft_train.py"
    script.write_text(FAKE_TRAIN)
    return lambda: RunManager(tmp_path / "work", command=[sys.executable, str(script)])


def test_start_follow_finish_and_a_new_server_sees_it(manager, tmp_path, wait_status):
    runs = manager()
    out = tmp_path / "out" / "a"
    argv = ["--output_dir", str(out), "--max_steps", "5"]
    run_id = runs.start(argv, str(out))
    assert runs.run_ids() == [run_id] and runs.argv(run_id) == argv
    st = wait_status(runs, run_id, lambda s: s.state == "finished")
    assert st.loss == [(k, 10.0 / k) for k in range(1, 6)] and (st.step, st.max_steps) == (5, 5)
    assert not st.active and not st.can_resume
    assert "finished" in runs.log_tail(run_id) and "exited with status 0" in runs.log_tail(run_id)
    again = manager().status(run_id)  # a restarted server reads the same files
    assert (again.state, again.loss) == ("finished", st.loss)
    with pytest.raises(Exception, match="already holds a run"):
        runs.start(argv, str(out))


def test_stop_writes_a_checkpoint_and_resume_continues_from_it(manager, tmp_path, wait_status):
    runs = manager()
    out = tmp_path / "out" / "b"
    run_id = runs.start(["--output_dir", str(out), "--max_steps", "400", "--step_s", "0.05"], str(out))
    st = wait_status(runs, run_id, lambda s: s.state == "running" and len(s.loss) >= 2)
    assert st.active and not st.can_resume
    with pytest.raises(Exception, match="still running"):
        runs.resume(run_id)
    assert "SIGTERM sent" in runs.stop(run_id)
    st = wait_status(runs, run_id, lambda s: s.state == "stopped")
    assert st.checkpoints == [str(c) for c in complete_checkpoints(out)] and len(st.checkpoints) == 1
    assert f"checkpoint written: {Path(st.checkpoints[0]).name}" in st.message and st.can_resume
    stopped_at = st.step
    with pytest.raises(Exception, match="not running"):
        runs.stop(run_id)

    runs.resume(run_id)
    st = wait_status(runs, run_id, lambda s: s.state == "running" and s.step > stopped_at)
    assert f"resuming from {st.checkpoints[0]}" in runs.log_tail(run_id)
    assert runs.argv(run_id) == ["--output_dir", str(out), "--max_steps", "400", "--step_s", "0.05"]  # as started
    runs.stop(run_id)
    st = wait_status(runs, run_id, lambda s: s.state == "stopped")
    assert len(st.checkpoints) == 2 and all(k <= st.step for k, _ in st.loss)


def test_failed_run_shows_the_error_line(manager, tmp_path, wait_status):
    runs = manager()
    out = tmp_path / "out" / "c"
    run_id = runs.start(["--output_dir", str(out), "--max_steps", "9", "--fail_at", "2"], str(out))
    st = wait_status(runs, run_id, lambda s: s.state == "failed")
    assert st.message == "failed (exit 1): the data went away (restore it and press Resume)"
    assert not st.can_resume  # no checkpoint to continue from
    with pytest.raises(Exception, match="no checkpoint"):
        runs.resume(run_id)


def test_checkpoint_list_is_what_resume_uses(manager, tmp_path, wait_status):
    """A checkpoint-N someone else put in the output folder is neither listed nor offered for resume."""
    runs = manager()
    out = tmp_path / "out" / "d"
    run_id = runs.start(["--output_dir", str(out), "--max_steps", "400", "--step_s", "0.05"], str(out))
    wait_status(runs, run_id, lambda s: s.state == "running" and len(s.loss) >= 1)
    foreign = out / "checkpoint-999999"
    foreign.mkdir()
    (foreign / "trainer_state.json").write_text("{}")  # looks complete, but xcft did not write it
    runs.stop(run_id)
    st = wait_status(runs, run_id, lambda s: s.state == "stopped")
    assert st.checkpoints == [find_last_checkpoint(out)] and str(foreign) not in st.checkpoints


def test_selected_run_gives_back_its_form(manager, tmp_path, wait_status):
    runs = manager()
    fields = train_form.form_fields()
    out = tmp_path / "out" / "e"
    raw = [f.form_default() for f in fields]
    names = [f.name for f in fields]
    for key, value in {"output_dir": str(out), "max_steps": 3, "use_lora": True, "lora_target_modules": "a.b c.d"}.items():
        raw[names.index(key)] = value
    changed = train_form.changed_values(fields, raw)
    run_id = runs.start(train_form.to_argv(changed), str(out))
    restored = train_view.form_of_run(runs, run_id, fields)
    assert train_form.changed_values(fields, restored) == changed
    assert restored[names.index("max_steps")] == 3 and restored[names.index("use_lora")] is True
    wait_status(runs, run_id, lambda s: s.state == "finished")
    # the next suggestion is a new folder, never the one a run already uses
    suggestion = train_view.suggest_output_dir(tmp_path / "work", runs)
    assert Path(suggestion) != out and not Path(suggestion).exists()


def test_run_view_says_which_buttons_apply(manager, tmp_path, wait_status):
    runs = manager()
    none = train_view.run_view(runs, None)
    assert (none.can_stop, none.can_resume) == (False, False) and 'data-state="none"' in none.status
    out = tmp_path / "out" / "f"
    run_id = runs.start(["--output_dir", str(out), "--max_steps", "400", "--step_s", "0.05"], str(out))
    wait_status(runs, run_id, lambda s: s.state == "running" and len(s.loss) >= 1)  # its SIGTERM handler is set
    view = train_view.run_view(runs, run_id)
    assert (view.can_stop, view.can_resume) == (True, False) and 'data-state="running"' in view.status
    runs.stop(run_id)
    wait_status(runs, run_id, lambda s: s.state == "stopped")
    view = train_view.run_view(runs, run_id)
    assert (view.can_stop, view.can_resume) == (False, True)
    assert 'class="xcft-log"' in view.log and "stopped by SIGTERM" in view.log


def test_a_mixture_shows_a_curve_per_file(manager, tmp_path, wait_status):
    runs = manager()
    out = tmp_path / "out" / "mix"
    run_id = runs.start(["--output_dir", str(out), "--max_steps", "3", "--two_files", "1"], str(out))
    st = wait_status(runs, run_id, lambda s: s.state == "finished")
    assert st.sources == {"loss/a.json": [(k, 8.0 / k) for k in (1, 2, 3)], "loss/b.json": [(k, 12.0 / k) for k in (1, 2, 3)]}
    assert 'class="xcft-source-curves" data-n="2"' in train_view.status_html(st)
    labels = [line.get_label() for line in train_view.loss_figure(st).axes[0].get_lines()]
    assert labels == ["train loss", "train: a.json", "train: b.json"]
    view = train_view.run_view(runs, run_id)
    assert view.plot_key[3] == 6  # the plot is redrawn when a per-file point arrives

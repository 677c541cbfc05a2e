"""The Eval tab's runs and views without a browser: start, progress, stop and continue, two models one after
the other, the scores table against ``xcft score``, the sample filters, and bad input.

The runs execute a small stand-in for ``xcft predict`` that keeps its file contract (the samples the
data reading gives, skips what its output holds, appends one line of the prediction keys per sample,
exits 1 after naming the bad samples with predict's last line); the samples are read once by the
test (as the page reads them) and its answers come from an ``answers.json`` beside a tiny model's
files. The browser test runs the real one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from xcft.commands.score import comparison_rows, score_files, scores_rows
from xcft.commands.web import eval_view
from xcft.commands.web.evals import EvalRuns, EvalSettings, prediction_name, read_data
from xcft.errors import XcftError
from xcft.train.predict import NOT_PREDICTED, PREDICTION_KEYS

FAKE_PREDICT = """
# Stand-in for xcft predict: DATA --model M --output O [--limit N]; the samples from M/plan.json, answers from M/answers.json.
import json, sys, time
from pathlib import Path

argv = sys.argv[1:]
data, args = argv[0], dict(zip(argv[1::2], argv[2::2]))
model, out = Path(args["--model"]), Path(args["--output"])
answers = json.loads((model / "answers.json").read_text())
plan = json.loads((model / "plan.json").read_text())
delay = float((model / "delay").read_text()) if (model / "delay").exists() else 0.0
samples = plan["samples"][: int(args["--limit"])] if "--limit" in args else plan["samples"]
done = {(r["source"], r["id"]) for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
with open(out, "a") as f:
    for s in samples:
        if (s["source"], s["id"]) in done:
            continue
        time.sleep(delay)
        line = {**s, "prompt": s["question"], "prediction": answers.get(s["id"], ""), "new_tokens": 3, "seconds": delay}
        f.write(json.dumps({key: line[key] for key in KEYS}) + "\\n")
        f.flush()
for problem in plan["errors"]:
    print(f"error: {problem} (skipped)", flush=True)
if plan["errors"]:
    print(f"{len(plan['errors'])} NOT_PREDICTED", flush=True)
sys.exit(1 if plan["errors"] else 0)
""".replace("NOT_PREDICTED", NOT_PREDICTED).replace("KEYS", repr(PREDICTION_KEYS))


def _sample(sid: str, question: str, answer: str | None, image: str | None = None) -> dict:
    turns = [{"from": "user", "value": ("<ImageHere>" if image else "") + question}]
    if answer is not None:
        turns.append({"from": "assistant", "value": answer})
    return {"id": sid, **({"image": image} if image else {}), "conversations": turns}


@pytest.fixture
def eval_data(tmp_path: Path, tiny_base: Path) -> dict[str, Path]:
    """A data.txt of two files (one sample with an image, one without a reference, one broken) and two "models"."""
    from PIL import Image

    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(root / "red.png")
    a = [
        _sample("red", "What colour?", "red", "red.png"),
        _sample("cat", "Which animal?\nA. cat\nB. dog", "A"),
        _sample("sky", "Sky colour?", "blue"),
    ]
    b = [_sample("hi", "Say hi.", "hello"), _sample("open", "Anything?", None), {"id": "bad", "conversations": []}]
    (root / "a.json").write_text(json.dumps(a))
    (root / "b.json").write_text(json.dumps(b))
    (root / "data.txt").write_text("a.json 0.003\nb.json 0.003\n")
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    samples, problems = read_data(str(root / "data.txt"), str(tiny_base))
    keys = ("id", "source", "index", "question", "reference")
    plan = {
        "samples": [dict(zip(keys, (s.id, s.source, s.index, s.query, s.reference))) for s in samples],
        "errors": [str(p) for p in problems if p.level == "error"],
    }
    for folder, answers in (
        (base, {"red": "Red.", "cat": "B", "sky": "grey", "hi": "hello", "open": "yes"}),
        (tuned, {"red": "blue", "cat": "(A) cat", "sky": "Blue", "hi": "hello", "open": "no"}),
    ):
        folder.mkdir()
        for part in tiny_base.iterdir():  # a model folder to read the data with (tokenizer, sizes)
            (folder / part.name).symlink_to(part)
        (folder / "answers.json").write_text(json.dumps(answers))
        (folder / "plan.json").write_text(json.dumps(plan))
    return {"data": root / "data.txt", "base": base, "tuned": tuned, "image": root / "red.png"}


@pytest.fixture
def evals(tmp_path: Path) -> Callable[[], EvalRuns]:
    """``evals()``: EvalRuns on one work folder running the stand-in (a new one = a new server)."""
    script = tmp_path / "fake_xcft_predict.py"
    script.write_text(FAKE_PREDICT)
    return lambda: EvalRuns(tmp_path / "work", command=[sys.executable, str(script)])


def test_two_models_run_in_turn_and_score_as_xcft_score(evals, eval_data, tmp_path, wait_status):
    runs = evals()
    settings = EvalSettings(str(eval_data["data"]), (str(eval_data["base"]), str(eval_data["tuned"])), metrics="exact,bleu")
    run_id, problems = runs.start(settings)
    assert [p.id for p in problems if p.level == "error"] == ["bad"]
    st = wait_status(runs, run_id, lambda s: not s.active)
    # each model's predict names the broken sample and exits 1; both answered every other sample
    assert (st.state, st.done, st.total, st.skipped) == ("finished", [5, 5], 5, 1), (st.message, runs.log_tail(run_id))
    assert st.message == "finished; some samples could not be predicted (named in the log)" and not st.can_continue
    log = runs.log_tail(run_id)
    assert log.count("$ ") == 2 and "--output " + str(tmp_path / "work" / "evals" / run_id / prediction_name(1)) in log
    files = [str(p) for p in runs.prediction_files(run_id)]
    lines = [json.loads(x) for x in Path(files[0]).read_text().splitlines()]
    assert all(tuple(line) == PREDICTION_KEYS for line in lines)

    expected = score_files(files[0], files[1], "exact,bleu")
    result = runs.results(run_id)
    assert result.to_dict() == expected.to_dict()
    header, rows = eval_view.metrics_table(result)
    assert header == ["source", "n", "exact 1", "exact 2", "exact Δ", "bleu 1", "bleu 2", "bleu Δ"]
    assert rows == [[g, n, *(c for cell in cells for c in cell)] for g, n, cells in comparison_rows(expected)]
    assert [r[0] for r in rows] == ["a.json", "b.json", "overall"] and rows[-1][2:5] == ["50.0%", "50.0%", "+0.0"]
    changes = eval_view.changes_html(result)
    assert 'class="xcft-fixed" data-n="1"' in changes and 'class="xcft-broken-n" data-n="1"' in changes
    assert "1 sample(s) without a reference" in changes

    # a new server finds the run and the same scores
    again = evals()
    assert again.run_ids() == [run_id] and again.results(run_id).to_dict() == expected.to_dict()

    rows_ = eval_view.sample_rows(again.predictions(run_id), result)
    assert [r.id for r in rows_] == ["red", "cat", "sky", "hi", "open"]
    wrong = {r.id for r in eval_view.filter_rows(rows_, "wrong")}
    assert wrong == {"red", "cat"}  # exact: "blue" for red, "(A) cat" for A; "Blue" is right, "no" not scored
    changed = {r.id: r.change for r in eval_view.filter_rows(rows_, "changed")}
    assert changed == {"red": "broken", "sky": "fixed"}
    assert {s["id"] for s in result.fixed} | {s["id"] for s in result.broken} == set(changed)
    assert len(eval_view.filter_rows(rows_, "all")) == 5

    view = eval_view.results_view(again, run_id, "changed")
    assert view.header == header and view.rows == rows
    assert view.samples.count('class="xcft-eval-sample"') == 2 and 'data-change="broken"' in view.samples
    red = view.samples[view.samples.index('data-id="red"') :]
    assert red.count("<img") == 1 and "red.png" in red and "reference</b>: red" in red
    assert 'data-model="1" data-passed="true"' in red and 'data-model="2" data-passed="false"' in red


def test_one_model_scores_and_wrong_filter(evals, eval_data, wait_status):
    runs = evals()
    run_id, _ = runs.start(EvalSettings(str(eval_data["data"]), (str(eval_data["base"]), ""), limit=3))
    st = wait_status(runs, run_id, lambda s: not s.active)
    assert (st.state, st.done, st.total) == ("finished", [3], 3), st.message
    expected = score_files(str(runs.prediction_files(run_id)[0]))
    header, rows = eval_view.metrics_table(runs.results(run_id))
    assert header == ["source", "n", *expected.metrics] and rows == scores_rows(expected)
    rows_ = eval_view.sample_rows(runs.predictions(run_id), runs.results(run_id))
    assert {r.id for r in eval_view.filter_rows(rows_, "wrong")} == {s["id"] for s in expected.failed} == {"cat", "sky"}
    assert eval_view.filter_rows(rows_, "changed") == []


def test_stop_and_continue_without_repeating_a_sample(evals, eval_data, wait_status):
    runs = evals()
    (eval_data["tuned"] / "delay").write_text("0.3")
    run_id, _ = runs.start(EvalSettings(str(eval_data["data"]), (str(eval_data["base"]), str(eval_data["tuned"]))))
    st = wait_status(runs, run_id, lambda s: s.state == "running" and s.done[1] >= 1)
    assert st.done[0] == 5 and "model 2 of 2 answering" in st.message and 'data-state="running"' in eval_view.status_html(st)
    assert "SIGTERM sent" in runs.stop(run_id)
    st = wait_status(runs, run_id, lambda s: s.state == "stopped")
    assert st.can_continue and st.done[0] == 5 and 1 <= st.done[1] < 5 and "stopped at model 2 of 2" in st.message
    assert runs.results(run_id) is not None  # both models answered something: scored on what they share
    (eval_data["tuned"] / "delay").unlink()
    runs.continue_run(run_id)
    st = wait_status(runs, run_id, lambda s: not s.active and s.state != "stopped")
    assert st.done == [5, 5], st.message
    assert runs.log_tail(run_id).count("$ ") == 3  # model 1 had answered everything: only model 2 ran again
    ids = [json.loads(x)["id"] for x in runs.prediction_files(run_id)[1].read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 5
    with pytest.raises(XcftError, match="has finished"):
        runs.continue_run(run_id)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"models": ("",)}, "no model"),
        ({"models": ("/no/such/model",)}, "model folder /no/such/model does not exist"),
        ({"data": ""}, "no data file"),
        ({"data": "/no/such/data.txt"}, "data path not found"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"metrics": "exact,acc"}, "unknown metric 'acc'"),
    ],
)
def test_bad_input_is_refused_before_anything_starts(evals, eval_data, change, message):
    runs = evals()
    fields = {"data": str(eval_data["data"]), "models": (str(eval_data["base"]),), **change}
    with pytest.raises(XcftError, match=message):
        runs.start(EvalSettings(**fields))
    assert runs.run_ids() == []


def test_status_before_any_run():
    assert 'data-state="none"' in eval_view.status_html(None)
    assert eval_view.metrics_table(None) == (["source", "n"], [])


def test_tab_handlers_word_errors_as_the_page_and_give_back_a_runs_form(evals, eval_data, wait_status):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'xcft[web]')")
    from xcft.commands.web import eval_tab

    runs = evals()
    data, base, tuned = str(eval_data["data"]), str(eval_data["base"]), str(eval_data["tuned"])
    message, run_id = eval_tab.run(runs, data, base, "", 8, 0, "", eval_tab.MODEL_LAYOUT, None)
    assert run_id is None and "xcft-error" in message and "batch size must be at least 1" in message and "--" not in message
    message, run_id = eval_tab.run(runs, data, base, "", None, 2, "", "official", 0)
    assert run_id is None and "max new tokens is empty" in message
    message, run_id = eval_tab.run(runs, data, str(eval_data["base"] / "nope"), "", 8, 2, "", "official", 0)
    assert run_id is None and "model folder" in message and "does not exist" in message
    assert runs.run_ids() == []
    message, run_id = eval_tab.run(runs, data, base, tuned, 8, 2, "exact", "training", 0)
    assert run_id and "started eval" in message and "1 sample(s) left out" in message and "bad" in message
    assert eval_tab.form_of_run(runs, run_id) == [data, base, tuned, 8, 2, "exact", "training", None]
    assert runs.record(run_id)["steps"][0][-4:] == ["--batch-size", "2", "--layout", "training"]
    wait_status(runs, run_id, lambda s: not s.active)
    assert "not running" in eval_tab.stop(runs, run_id) and "has finished" in eval_tab.continue_run(runs, run_id)
    assert "no eval selected" in eval_tab.stop(runs, None)


def test_samples_come_a_page_at_a_time():
    rows = [eval_view.EvalRow("a.json", f"s{k}", k, "q?", "r", ["r"], [True]) for k in range(2 * eval_view.PAGE_SIZE + 5)]
    first, pages = eval_view.samples_html(rows, ["/m/base"], {}, 1)
    assert pages == 3 and first.count('class="xcft-eval-sample"') == eval_view.PAGE_SIZE and 'data-id="s0"' in first
    last, _ = eval_view.samples_html(rows, ["/m/base"], {}, 99)  # past the end: the last page, said as such
    assert last.count('class="xcft-eval-sample"') == 5 and 'data-page="3"' in last and "page 3 of 3" in last
    assert f'data-id="s{2 * eval_view.PAGE_SIZE}"' in last and "(sample not in the data now)" in last

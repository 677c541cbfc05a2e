"""The web page's handlers without a browser: Data (check, sample navigation), Chat (settings, one model
per session, a failed question) and Export (the merge result as data), and the page's wording.

Gradio is imported (the handlers return its updates) but no server or browser is started.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio", reason="gradio is not installed (pip install 'xcft[web]')")

from xcft.commands.web import chat_tab, data_tab, export_tab, ui
from xcft.commands.web.chat import ChatSettings, ModelCache, stream_answer
from xcft.commands.web.export import MergeProgress, merge_argv, run_merge
from xcft.errors import XcftError
from xcft.model.template_xcomposer2 import LAYOUT_OFFICIAL, LAYOUT_TRAINING, OFFICIAL_SYSTEM_PROMPT
from xcft.run_files import MergeCheck

# --------------------------------------------------------------------------- wording


def test_cli_flags_become_the_pages_field_names():
    text = "--model /m has no tokenizer.model; pass --model-dir or raise --max-length"
    assert ui.in_page_terms(text, ui.DATA_FIELDS) == (
        "the model folder /m has no tokenizer.model; pass --model-dir or raise max_length"
    )
    assert "--output" not in ui.in_page_terms("--output /x already holds an earlier xcft output", ui.EXPORT_FIELDS)


def test_bad_model_folder_is_one_line_in_page_terms(tiny_data, tmp_path):
    view = data_tab.check(str(tiny_data), str(tmp_path / "nope"))
    assert view.index is None and "xcft-error" in view.status and "Traceback" not in view.status
    assert "--model" not in view.status and str(tmp_path / "nope") in view.status


# --------------------------------------------------------------------------- Data tab


@pytest.fixture(scope="module")
def checked(tiny_data, tiny_base):
    return data_tab.check(str(tiny_data), str(tiny_base))


def test_check_fills_every_output_by_name(checked):
    assert checked.index is not None and checked.index.total == 6
    assert "6 samples in 3 file(s)" in checked.status and "OK: training can start" in checked.status
    assert list(checked.summary.iloc[-1][:2]) == ["total", 6]
    assert checked.sample_index == 0 and 'data-index="0"' in checked.sample
    assert checked.histogram is not None and checked.count
    # a level filter in the table's words: info problems are notes, as the verdict counts them
    levels = set(checked.problems["level"])
    assert levels <= {"error", "warning", "note"}
    rows, _ = data_tab.filter_problems(checked.index, "note", "")
    assert set(rows["level"]) <= {"note"}


def test_sample_navigation_says_where_it_ends(checked):
    last = checked.index.total - 1
    nav = data_tab.show_sample(checked.index, last, step=1)
    assert nav.sample is None and nav.index == last and f"last sample (index {last})" in nav.nav
    nav = data_tab.show_sample(checked.index, 0, step=-1)
    assert nav.sample is None and nav.index == 0 and "first sample" in nav.nav
    nav = data_tab.show_sample(checked.index, 99)
    assert nav.sample is None and nav.index == 99 and f"from 0 to {last}" in nav.nav and "xcft-error" in nav.nav
    nav = data_tab.show_sample(checked.index, -3)
    assert nav.sample is None and "no sample with index -3" in nav.nav
    nav = data_tab.show_sample(checked.index, 2, step=1)
    assert nav.index == 3 and 'data-index="3"' in nav.sample and nav.nav == ""
    nav = data_tab.show_sample(None, 0)
    assert "press Check" in nav.nav


# --------------------------------------------------------------------------- Chat tab


def test_chat_settings_are_xcft_chats():
    kw = ChatSettings(max_new_tokens=7, system="", sampling=False, layout=LAYOUT_TRAINING).generate_kwargs()
    assert kw == {"max_new_tokens": 7, "do_sample": False, "prompt_layout": LAYOUT_TRAINING, "meta_instruction": None}
    kw = ChatSettings(system=OFFICIAL_SYSTEM_PROMPT, temperature=0.5, layout=LAYOUT_OFFICIAL).generate_kwargs()
    assert kw["meta_instruction"] == OFFICIAL_SYSTEM_PROMPT and kw["do_sample"] and kw["temperature"] == 0.5
    with pytest.raises(XcftError, match="at least 1"):
        ChatSettings(max_new_tokens=0).generate_kwargs()


@pytest.fixture(scope="module")
def two_models(tiny_folder):
    return tiny_folder(seed=0), tiny_folder(seed=1)


def _answer(cache, choice, question, history=(), images=()):
    out = list(chat_tab.send(cache, choice, question, list(images), list(history), [], [], ChatSettings(8, "", False, 1.0, None)))
    messages, new_history, _, box, status = out[-1]
    assert "xcft-error" not in status, status
    return messages, new_history, box


def test_each_session_answers_with_its_own_model(two_models):
    from xcft.model.loading import load_pretrained

    refs = []
    for folder in two_models:
        model, tok = load_pretrained(folder, dtype=torch.float32, device="cpu")
        refs.append(model.chat(tok, "Say something.", do_sample=False, max_new_tokens=8)[0])
    assert refs[0] != refs[1]  # otherwise this test could not tell the models apart

    cache = ModelCache("cpu", size=1)  # one model in memory: every switch reloads
    status_a, choice_a, layout_a, system_a = chat_tab.load(cache, str(two_models[0]))
    _, choice_b, _, _ = chat_tab.load(cache, str(two_models[1]))  # another page loads another model
    assert str(two_models[0].resolve()) in status_a and (layout_a, system_a) == (LAYOUT_TRAINING, "")
    for _ in range(2):  # each page keeps answering with its own model, whatever the other did
        for choice, ref in ((choice_a, refs[0]), (choice_b, refs[1])):
            messages, history, _ = _answer(cache, choice, "Say something.")
            assert messages[-1]["content"] == (ref or chat_tab.EMPTY_ANSWER) and history == [("Say something.", ref)]
    assert cache.folders() == [choice_b.folder]


def test_a_question_that_fails_leaves_the_conversation_as_it_was(two_models):
    cache = ModelCache("cpu")
    before = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    history = [("Hi", "Hello")]
    *_, last = chat_tab.send(cache, None, "What now?", [], history, [], before, ChatSettings())
    messages, new_history, _, box, status = last
    assert (messages, new_history, box) == (before, history, "What now?") and "press Load" in status
    _, choice, _, _ = chat_tab.load(cache, str(two_models[0]))
    *_, last = chat_tab.send(cache, choice, "<ImageHere><ImageHere>Two?", ["/nope.png"], [], [], before, ChatSettings())
    messages, new_history, _, box, status = last
    assert (messages, new_history, box) == (before, [], "<ImageHere><ImageHere>Two?") and "xcft-error" in status
    assert "no model folder given" in chat_tab.load(cache, " ")[0]


def test_layout_change_shows_that_layouts_system_prompt(two_models):
    cache = ModelCache("cpu")
    _, choice, _, _ = chat_tab.load(cache, str(two_models[0]))
    assert chat_tab.layout_system(choice, LAYOUT_OFFICIAL) == OFFICIAL_SYSTEM_PROMPT
    assert chat_tab.layout_system(choice, LAYOUT_TRAINING) == ""


def test_stream_grows_to_the_answer(two_models):
    cache = ModelCache("cpu")
    loaded = cache.get(str(two_models[0]))
    pieces = list(stream_answer(loaded, "Say something.", [], [], ChatSettings(8, "", False)))
    *growing, (answer, history) = pieces
    assert all(h is None for _, h in growing) and history == [("Say something.", answer)]
    assert growing and all(answer.startswith(text.strip()) for text, _ in growing)  # the answer is stripped


# --------------------------------------------------------------------------- Export tab


def test_merge_result_is_read_as_data():
    check = MergeCheck(3.2e-6, 1e-3, 40, 1, 40, "/a", "/b")
    html = export_tab.result_html(MergeProgress("log", done=True, ok=True, check=check), "/out")
    assert 'data-diff="3.2e-06"' in html and "xcft-probe" in html and "/out" in html
    failed = MergeProgress("log", done=True, ok=False, error="--output /out already holds an earlier xcft output")
    assert "the output folder /out already holds" in export_tab.result_html(failed, "/out")


def test_merge_answers_at_once_and_names_the_missing_folder(tmp_path):
    steps = export_tab.merge(str(tmp_path / "nope"), "", str(tmp_path / "merged"))
    first = next(steps)
    assert 'data-merging="1"' in first[0]  # the old result leaves the page before anything runs
    result, _ = next(steps)
    assert "xcft-error" in result and "does not exist" in result
    with pytest.raises(XcftError, match="no output folder"):
        merge_argv("/a", "")


@pytest.mark.slow
def test_merge_runner_reads_merge_check_json(tiny_base, tiny_data, tmp_path, subprocess_env, monkeypatch):
    """A real ``xcft merge`` of a tiny adapter: the page's result is merge_check.json, whatever the log says."""
    from xcft.commands.train import train_command

    adapter = tmp_path / "lora"
    argv = ["--model_name_or_path", str(tiny_base), "--data_path", str(tiny_data), "--use_lora", "true"]
    argv += ["--lora_r", "4", "--max_steps", "1", "--per_device_train_batch_size", "1", "--output_dir", str(adapter)]
    assert train_command(argv) == 0
    for key, value in subprocess_env.items():
        monkeypatch.setenv(key, value)
    merged = tmp_path / "merged"
    *_, done = run_merge(merge_argv(str(adapter), str(merged)), str(merged))
    recorded = json.loads((merged / "merge_check.json").read_text())
    assert done.ok and done.check is not None and done.check.max_abs_logit_diff == recorded["max_abs_logit_diff"]
    assert Path(merged / "config.json").is_file()

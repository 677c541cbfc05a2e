"""``xcft predict``: what is asked of each sample, the prediction file, continuing an interrupted run, bad samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from xcft.cli import main
from xcft.data.schema import Conversation, Message
from xcft.model.loading import load_pretrained
from xcft.train.predict import PREDICTION_KEYS, ChatSettings, predict_samples, prompt_sample, read_prompt_samples

torch.set_num_threads(1)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_the_last_user_turn_is_asked_and_the_answer_after_it_is_the_reference():
    conv = Conversation(
        [
            Message("system", "Be brief."),
            Message("user", "<ImageHere>What is it?"),
            Message("assistant", "A cat."),
            Message("user", "Colour?"),
            Message("assistant", "Black."),
        ],
        [Path("cat.png")],
        "7",
        "f.json",
        3,
    )
    s = prompt_sample(conv)
    assert not isinstance(s, str)
    assert (s.query, s.history, s.system, s.reference) == (
        "Colour?",
        [("<ImageHere>What is it?", "A cat.")],
        "Be brief.",
        "Black.",
    )
    question_only = Conversation([Message("user", "Why?")], [], "q", "f.json", 0)
    s = prompt_sample(question_only)
    assert not isinstance(s, str) and s.reference is None and s.history == []


def test_predict_writes_one_line_per_sample_as_chat_answers(tiny_base, tiny_data, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    rc = main(
        ["predict", str(tiny_data), "--model", str(tiny_base), "--output", str(out), "--batch-size", "4", "--max-new-tokens", "5"]
    )
    assert rc == 0
    rows = _lines(out)
    assert [(r["source"].split("/")[-1], r["id"]) for r in rows] == [
        (f, i) for f in ("text.json", "single.json", "multi.json") for i in ("0", "1")
    ]
    assert all(tuple(r) == PREDICTION_KEYS for r in rows)
    by_key = {(r["source"].split("/")[-1], r["id"]): r for r in rows}
    second = by_key[("multi.json", "0")]
    assert second["question"] == "Which one is larger?" and second["reference"] == "The first one."
    assert second["prompt"].count("<ImageHere>") == 2 and second["prompt"].endswith("assistant\n")
    # the same question through chat, alone: the same answer
    model, tok = load_pretrained(tiny_base, dtype="float32", device="cpu")
    data_dir = tiny_data.parent / "data"
    images = [str(data_dir / "images" / n) for n in ("green.png", "grey.jpeg")]
    history = [("Image1: <ImageHere>; Image2: <ImageHere>. Are they the same colour?", "No, green and grey.")]
    reply, _ = model.chat(tok, "Which one is larger?", images=images, history=history, max_new_tokens=5, do_sample=False)
    assert second["prediction"] == reply


def test_an_interrupted_run_continues_without_repeating_or_losing_a_sample(tiny_base, tiny_data, tmp_path):
    model, tok = load_pretrained(tiny_base, dtype="float32", device="cpu")
    samples, problems = read_prompt_samples(tiny_data, model, tok)
    assert len(samples) == 6 and not [p for p in problems if p.level == "error"]
    settings = ChatSettings(max_new_tokens=4)
    full = tmp_path / "full.jsonl"
    predict_samples(model, tok, samples, full, settings=settings, batch_size=2)

    out = tmp_path / "preds.jsonl"
    calls = []

    def stop_after_two_batches(done: int, todo: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_samples(model, tok, samples, out, settings=settings, batch_size=2, progress=stop_after_two_batches)
    assert len(_lines(out)) == 4
    # a kill in the middle of writing the next batch leaves part of a line
    with open(out, "a", encoding="utf-8") as f:
        f.write(full.read_text(encoding="utf-8").splitlines()[4][:25])
    written, failures = predict_samples(model, tok, samples, out, settings=settings, batch_size=2)
    assert (written, failures) == (2, [])
    rows = _lines(out)
    keys = [(r["source"], r["id"]) for r in rows]
    assert len(keys) == len(set(keys)) == 6
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert sorted(map(json.dumps, map(strip, rows))) == sorted(map(json.dumps, map(strip, _lines(full))))
    # nothing left to do: the file is unchanged
    before = out.read_bytes()
    assert predict_samples(model, tok, samples, out, settings=settings, batch_size=2) == (0, [])
    assert out.read_bytes() == before


def test_bad_samples_are_named_and_the_rest_predicted(tiny_base, tiny_data, tmp_path, capsys, caplog):
    root = tmp_path / "data"
    shutil.copytree(tiny_data.parent, root)
    single = root / "data" / "single.json"
    rows = json.loads(single.read_text())
    rows[1]["image"] = ["data/images/missing.png"]
    rows.append({"id": "q", "image": "data/images/red.png", "conversations": [{"from": "user", "value": "Colour?"}]})
    rows.append({"id": "broken", "conversations": [{"from": "user", "value": "<ImageHere> two <ImageHere>"}]})
    single.write_text(json.dumps(rows))
    (root / "data" / "images" / "grey.jpeg").write_bytes(b"not a picture")
    out = tmp_path / "preds.jsonl"
    rc = main(["predict", str(root / "data.txt"), "--model", str(tiny_base), "--output", str(out), "--max-new-tokens", "3"])
    assert rc == 1
    got = {(Path(r["source"]).name, r["id"]) for r in _lines(out)}
    assert got == {("text.json", "0"), ("text.json", "1"), ("single.json", "0"), ("single.json", "q")}
    assert {r["reference"] for r in _lines(out) if r["id"] == "q"} == {None}
    messages = caplog.text
    assert "single.json: sample 1 (id '1')" in messages and "missing.png" in messages
    assert "id 'broken'" in messages
    assert "multi.json: sample 0 (id '0')" in messages and "grey.jpeg" in messages


@pytest.mark.parametrize("text", ['{"my": "notes"}\n', "my notes", '{"id": "1", "source": "s", "prediction": "x"}\nnotes'])
def test_a_file_that_is_not_a_prediction_file_is_refused_and_kept(tiny_base, tiny_data, tmp_path, capsys, text):
    out = tmp_path / "notes.jsonl"
    out.write_text(text)
    rc = main(["predict", str(tiny_data), "--model", str(tiny_base), "--output", str(out), "--max-new-tokens", "2"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "not JSON" in err or "not a prediction" in err
    assert out.read_text() == text


def test_predict_maps_what_check_data_read(tiny_base, tiny_data, tmp_path, monkeypatch):
    """check-data then predict: the files are read once; the samples equal a read without the cache."""
    import xcft.data.cache as cache_module
    from xcft.data.cache_options import CacheOptions

    cache = CacheOptions(data_cache_dir=str(tmp_path / "cache"))
    assert main(["check-data", str(tiny_data), "--model", str(tiny_base), "--data_cache_dir", cache.data_cache_dir]) == 0
    model, tok = load_pretrained(tiny_base, dtype="float32", device="cpu")
    uncached, _ = read_prompt_samples(tiny_data, model, tok, CacheOptions(no_data_cache=True))

    def no_build(*args, **kwargs):
        raise AssertionError("the file was read again")

    monkeypatch.setattr(cache_module, "build_table", no_build)
    cached, problems = read_prompt_samples(tiny_data, model, tok, cache)
    assert cached == uncached and len(cached) == 6
    assert not [p for p in problems if p.level == "error"]

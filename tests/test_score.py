"""``xcft score``: answer metrics, multiple-choice letters, per-source scores, and two files compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from xcft.cli import main
from xcft.train.answer_metrics import (
    choice_letter,
    compare_predictions,
    normalize_answer,
    options_of,
    score_predictions,
    verdicts,
)

QUESTION = "What is in the picture?\nA. a cat\nB. a dog\nC. a red car\nD. nothing"


def test_normalisation_and_verdicts():
    assert normalize_answer("  The Red, car! ") == "red car"
    assert verdicts("The red car.", "red car") == {"exact": True, "contains": True, "first_word": False, "choice": False}
    assert verdicts("It is a red car, I think", "Red car")["contains"]
    assert not verdicts("scarred car", "red car")["contains"]  # whole words only
    assert verdicts("Red.", "red")["first_word"] and not verdicts("", "red")["first_word"]


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("The answer is C: a red car", "C"),
        ("a dog", "B"),  # the option's text
        ("It shows a red car.", "C"),
        ("A or B", None),  # two letters: undecided
        ("a cat and a dog", None),  # two options' texts
        ("no idea", None),
    ],
)
def test_choice_letters_as_mmbench_reads_them(answer, letter):
    assert choice_letter(answer, options_of(QUESTION)) == letter


def test_choice_verdict_reads_the_reference_letter_or_text():
    assert verdicts("(C)", "C", QUESTION, ["choice"]) == {"choice": True}
    assert verdicts("It is a red car", "C. a red car", QUESTION, ["choice"]) == {"choice": True}
    assert verdicts("B", "C", QUESTION, ["choice"]) == {"choice": False}


def _rows(source: str, pairs: list[tuple[str, str | None]], start: int = 0) -> list[dict]:
    return [
        {"id": str(start + k), "source": source, "question": "q", "reference": ref, "prediction": pred}
        for k, (pred, ref) in enumerate(pairs)
    ]


def test_scores_per_source_and_overall_with_library_bleu_and_rouge():
    a = _rows("a.json", [("red", "red"), ("blue", "green"), ("a big red ball", "the big red ball")])
    b = _rows("b.json", [("the cat sat on the mat", "the cat sat on a mat"), ("x", None)])
    scores = score_predictions(a + b)
    assert scores.unscored == 1
    assert scores.groups["a.json"]["n"] == 3 and scores.groups["a.json"]["exact"] == pytest.approx(2 / 3)
    assert scores.groups["overall"]["exact_hits"] == 3 and scores.groups["overall"]["n"] == 4
    preds = ["red", "blue", "a big red ball", "the cat sat on the mat"]
    refs = ["red", "green", "the big red ball", "the cat sat on a mat"]
    assert scores.groups["overall"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score / 100)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / 4
    assert scores.groups["overall"]["rouge_l"] == pytest.approx(rouge)
    assert [s["id"] for s in scores.failed] == ["1"]  # "blue"; the articles do not count
    assert scores.to_dict()["samples"][0]["passed"] is False  # failed samples first


def test_compare_lists_fixed_and_broken_samples():
    before = _rows("a.json", [("red", "red"), ("blue", "green"), ("cat", "cat"), ("x", "y")])
    after = _rows("a.json", [("red", "red"), ("green", "green"), ("dog", "cat")]) + _rows("b.json", [("z", "z")])
    c = compare_predictions(before, after, ["exact"])
    assert [f["id"] for f in c.fixed] == ["1"] and [b["id"] for b in c.broken] == ["2"]
    assert c.only_before == 1 and c.only_after == 1
    assert c.deltas["overall"]["exact"] == pytest.approx(0.0)
    assert c.fixed[0]["before"] == "blue" and c.fixed[0]["after"] == "green"


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_cli_table_json_and_comparison(tmp_path, capsys):
    a = _write(tmp_path / "base.jsonl", _rows("a.json", [("red", "red"), ("blue", "green")]))
    b = _write(tmp_path / "tuned.jsonl", _rows("a.json", [("pink", "red"), ("green", "green")]))
    assert main(["score", str(a), "--metrics", "exact,bleu"]) == 0
    text = capsys.readouterr().out
    assert "a.json" in text and "50.0%" in text and "failed by exact: 1" in text and "'blue'" in text
    assert main(["score", str(a), "--format", "json", "--metrics", "first_word"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["scores"]["overall"]["first_word"] == 0.5 and doc["failed"] == ["1"]
    assert main(["score", str(a), str(b), "--metrics", "exact"]) == 0
    text = capsys.readouterr().out
    assert "fixed by exact: 1" in text and "broken by exact: 1" in text and "+0.0" in text
    assert main(["score", str(a), str(b), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [x["id"] for x in doc["fixed"]] == ["1"] and [x["id"] for x in doc["broken"]] == ["0"]


def test_score_errors_name_the_file_and_the_fix(tmp_path, capsys):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"a": 1}\n')
    assert main(["score", str(bad)]) == 1
    assert "x.jsonl line 1: not a prediction" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "none.jsonl")]) == 1
    assert main(["score", str(bad), "--metrics", "accuracy"]) == 1
    assert "unknown metric 'accuracy'" in capsys.readouterr().err

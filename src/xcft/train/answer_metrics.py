"""Answer metrics of prediction files: per sample verdicts, per source and overall scores, and comparisons.

Verdict metrics say of each answer whether it is right: ``exact`` (equal after normalisation:
case, punctuation, articles, spaces), ``contains`` (the normalised reference inside the normalised
answer), ``first_word`` (the answer's first word is the reference's), ``choice`` (the option letter
read from the answer, multiple-choice style as MMBench / VLMEvalKit read it, is the reference's).
Text metrics score the answers of a group together: ``bleu`` (corpus BLEU-4, sacrebleu) and
``rouge_l`` (mean ROUGE-L F1, rouge-score). Samples without a reference are not scored.

The first verdict metric asked for decides which samples failed and, comparing two prediction
files, which were fixed or broken.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xcft.errors import XcftError

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "TEXT_METRICS",
    "VERDICT_METRICS",
    "Comparison",
    "Scores",
    "choice_letter",
    "compare_predictions",
    "first_word",
    "normalize_answer",
    "options_of",
    "parse_metrics",
    "score_predictions",
    "verdicts",
]

VERDICT_METRICS = ("exact", "contains", "first_word", "choice")
TEXT_METRICS = ("bleu", "rouge_l")
METRICS = VERDICT_METRICS + TEXT_METRICS
DEFAULT_METRICS = METRICS
OVERALL = "overall"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans(dict.fromkeys(string.punctuation, " "))
#: An option line of a question: ``A. text``, ``(A) text``, ``A: text``, ``A) text``.
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.+?)\s*$", re.MULTILINE)
#: Characters read as separators around an option letter (``(B)``, ``B.``, ``B:`` ...).
_LETTER_SEPARATORS = str.maketrans(dict.fromkeys(".()[],:;!*#{}'\"", " "))


def parse_metrics(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"exact,bleu"`` (or a list) as metric names, checked; None or "" gives the default set."""
    if text is None or text == "" or text == ():
        return DEFAULT_METRICS
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise XcftError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, spaces collapsed."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def first_word(text: str) -> str:
    """Lower-cased first word of a reply, without surrounding punctuation (``"Red."`` -> ``"red"``)."""
    m = re.search(r"[\w']+", text.lower())
    return m.group(0) if m else ""


def options_of(question: str) -> dict[str, str]:
    """The lettered options written in a question, one per line (``A. cat`` -> ``{"A": "cat"}``)."""
    return {letter: text for letter, text in _OPTION_LINE.findall(question or "")}


def choice_letter(answer: str, options: Mapping[str, str]) -> str | None:
    """The option an answer picks: one option letter standing alone (``B``, ``B.``, ``(B)``), else the
    one option whose text it contains; None when neither names exactly one option.

    Letters are the question's options (A-D when it lists none).
    """
    letters = list(options) or ["A", "B", "C", "D"]
    words = set(answer.translate(_LETTER_SEPARATORS).split())
    named = [k for k in letters if k in words]
    if len(named) == 1:
        return named[0]
    low = answer.lower()
    by_text = [k for k, text in options.items() if text and text.lower() in low]
    return by_text[0] if len(by_text) == 1 else None


def _reference_letter(reference: str, options: Mapping[str, str]) -> str | None:
    ref = reference.strip()
    if len(ref) == 1 and ref.isalpha():
        return ref.upper()
    return choice_letter(ref, options)


def verdicts(prediction: str, reference: str, question: str = "", metrics: Iterable[str] = VERDICT_METRICS) -> dict[str, bool]:
    """Whether ``prediction`` is right by each verdict metric."""
    out: dict[str, bool] = {}
    for name in metrics:
        if name == "exact":
            out[name] = normalize_answer(prediction) == normalize_answer(reference)
        elif name == "contains":
            ref = normalize_answer(reference)
            out[name] = bool(ref) and f" {ref} " in f" {normalize_answer(prediction)} "
        elif name == "first_word":
            out[name] = first_word(prediction) == first_word(reference) != ""
        elif name == "choice":
            options = options_of(question)
            picked = choice_letter(prediction, options)
            out[name] = picked is not None and picked == _reference_letter(reference, options)
    return out


def _bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score) / 100.0


def _rouge_l(predictions: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return sum(scores) / len(scores)


@dataclass
class Scores:
    """Scores per source and overall, and each scored sample's verdicts."""

    metrics: tuple[str, ...]
    groups: dict[str, dict[str, Any]]  # source (and "overall") -> {"n": ..., metric: value}
    samples: list[dict[str, Any]]  # id, source, reference, prediction, verdicts, passed (by the primary metric)
    unscored: int = 0  # lines without a reference

    @property
    def primary(self) -> str | None:
        return next((m for m in self.metrics if m in VERDICT_METRICS), None)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [s for s in self.samples if s["passed"] is False]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": list(self.metrics),
            "primary": self.primary,
            "scores": self.groups,
            "unscored": self.unscored,
            "failed": [s["id"] for s in self.failed],
            "samples": sorted(self.samples, key=lambda s: s["passed"] is not False),
        }


def _group(rows: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(rows)}
    for m in metrics:
        if m in VERDICT_METRICS:
            hits = sum(1 for r in rows if r["verdicts"][m])
            out[m] = hits / len(rows) if rows else None
            out[f"{m}_hits"] = hits
        elif rows:
            preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
            out[m] = _bleu(preds, refs) if m == "bleu" else _rouge_l(preds, refs)
        else:
            out[m] = None
    return out


def score_predictions(lines: Iterable[Mapping[str, Any]], metrics: Sequence[str] = DEFAULT_METRICS) -> Scores:
    """Score prediction lines (``xcft predict`` output) per source and overall."""
    metrics = tuple(metrics)
    verdict_names = [m for m in metrics if m in VERDICT_METRICS]
    primary = verdict_names[0] if verdict_names else None
    samples: list[dict[str, Any]] = []
    unscored = 0
    for line in lines:
        if line.get("reference") is None:
            unscored += 1
            continue
        prediction, reference = str(line["prediction"]), str(line["reference"])
        v = verdicts(prediction, reference, str(line.get("question") or ""), verdict_names)
        samples.append(
            {
                "id": str(line["id"]),
                "source": str(line["source"]),
                "question": line.get("question"),
                "reference": reference,
                "prediction": prediction,
                "verdicts": v,
                "passed": v[primary] if primary else None,
            }
        )
    groups: dict[str, dict[str, Any]] = {}
    for source in dict.fromkeys(str(s["source"]) for s in samples):
        groups[source] = _group([s for s in samples if s["source"] == source], metrics)
    groups[OVERALL] = _group(samples, metrics)
    return Scores(metrics, groups, samples, unscored)


@dataclass
class Comparison:
    """Two scored prediction files of the same samples: score deltas, and the verdicts that changed."""

    before: Scores
    after: Scores
    deltas: dict[str, dict[str, float | None]] = field(default_factory=dict)
    fixed: list[dict[str, Any]] = field(default_factory=list)  # wrong before, right after
    broken: list[dict[str, Any]] = field(default_factory=list)  # right before, wrong after
    only_before: int = 0
    only_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": list(self.after.metrics),
            "primary": self.after.primary,
            "before": self.before.groups,
            "after": self.after.groups,
            "deltas": self.deltas,
            "fixed": self.fixed,
            "broken": self.broken,
            "only_before": self.only_before,
            "only_after": self.only_after,
        }


def compare_predictions(
    before: Iterable[Mapping[str, Any]], after: Iterable[Mapping[str, Any]], metrics: Sequence[str] = DEFAULT_METRICS
) -> Comparison:
    """Score both files on the samples they share (by source and id) and list what changed."""
    a = {(str(r["source"]), str(r["id"])): r for r in before}
    b = {(str(r["source"]), str(r["id"])): r for r in after}
    shared = [k for k in a if k in b]
    first = score_predictions([a[k] for k in shared], metrics)
    second = score_predictions([b[k] for k in shared], metrics)
    deltas: dict[str, dict[str, float | None]] = {}
    for group, scores in second.groups.items():
        old = first.groups.get(group, {})
        deltas[group] = {
            m: (scores[m] - old[m]) if scores.get(m) is not None and old.get(m) is not None else None for m in second.metrics
        }
    comparison = Comparison(first, second, deltas, only_before=len(a) - len(shared), only_after=len(b) - len(shared))
    old_by_key = {(s["source"], s["id"]): s for s in first.samples}
    for s in second.samples:
        o = old_by_key[(s["source"], s["id"])]
        if o["passed"] is None or o["passed"] == s["passed"]:
            continue
        change = {
            "id": s["id"],
            "source": s["source"],
            "reference": s["reference"],
            "before": o["prediction"],
            "after": s["prediction"],
        }
        (comparison.fixed if s["passed"] else comparison.broken).append(change)
    return comparison

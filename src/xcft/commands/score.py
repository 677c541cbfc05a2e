"""``xcft score``: answer metrics of a prediction file per source and overall, or two files compared.

The metrics are :mod:`xcft.train.answer_metrics`'s. Text output: a table (one row per data
file of the predicted data set, then ``overall``), then the failed samples (or, comparing, the
samples fixed and broken); ``--format json``: one object with everything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from xcft.train.answer_metrics import VERDICT_METRICS, Comparison, Scores, compare_predictions, parse_metrics, score_predictions
from xcft.train.predict import read_predictions

__all__ = ["comparison_rows", "comparison_text", "score_command", "score_files", "scores_rows", "scores_text"]


def _cell(metric: str, value: Any) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if metric in VERDICT_METRICS else f"{100 * value:.2f}"


def _delta(metric: str, value: Any) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if metric in VERDICT_METRICS else f"{100 * value:+.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[k])) for r in [header, *rows]) for k in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if k == 0 else str(c).rjust(w) for k, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(header), *(fmt(r) for r in rows)]


def _clip(text: str, width: int = 70) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def scores_rows(scores: Scores) -> list[list[str]]:
    """One row per source, then ``overall``: the source, its sample count, each metric's cell."""
    return [[g, str(v["n"]), *(_cell(m, v.get(m)) for m in scores.metrics)] for g, v in scores.groups.items()]


def comparison_rows(comparison: Comparison) -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    """Per source, then ``overall``: (source, sample count, each metric's (first, second, delta) cells)."""
    rows = []
    for group, after in comparison.after.groups.items():
        before = comparison.before.groups.get(group, {})
        deltas = comparison.deltas[group]
        cells = [(_cell(m, before.get(m)), _cell(m, after.get(m)), _delta(m, deltas.get(m))) for m in comparison.after.metrics]
        rows.append((group, str(after["n"]), cells))
    return rows


def scores_text(scores: Scores, show: int = 10) -> str:
    """The metrics table (verdict metrics in %, BLEU-4 and ROUGE-L x100), then the failed samples."""
    lines = _table(["source", "n", *scores.metrics], scores_rows(scores))
    if scores.unscored:
        lines.append(f"({scores.unscored} prediction(s) without a reference not scored)")
    failed = scores.failed
    if scores.primary and failed:
        lines += ["", f"failed by {scores.primary}: {len(failed)}"]
        for s in failed[:show]:
            lines.append(f"  {s['source']} {s['id']}: expected {_clip(s['reference'], 30)!r}, got {_clip(s['prediction'], 40)!r}")
        if len(failed) > show:
            lines.append(f"  ... {len(failed) - show} more (--show N, or --format json)")
    return "\n".join(lines)


def comparison_text(comparison: Comparison, show: int = 10) -> str:
    """Per source: each metric before -> after (delta), then the samples fixed and broken."""
    rows = [[group, n, *(f"{b} -> {a} ({d})" for b, a, d in cells)] for group, n, cells in comparison_rows(comparison)]
    lines = _table(["source", "n", *comparison.after.metrics], rows)
    if comparison.only_before or comparison.only_after:
        lines.append(
            f"(compared on the samples both files hold; {comparison.only_before} only in the first, "
            f"{comparison.only_after} only in the second)"
        )
    primary = comparison.after.primary
    if primary:
        for name, changed in (("fixed", comparison.fixed), ("broken", comparison.broken)):
            lines += ["", f"{name} by {primary}: {len(changed)}"]
            for c in changed[:show]:
                lines.append(
                    f"  {c['source']} {c['id']}: expected {_clip(c['reference'], 24)!r}: "
                    f"{_clip(c['before'], 30)!r} -> {_clip(c['after'], 30)!r}"
                )
            if len(changed) > show:
                lines.append(f"  ... {len(changed) - show} more (--show N, or --format json)")
    return "\n".join(lines)


def score_files(predictions: str, other: str | None = None, metrics: str | Sequence[str] | None = None) -> Scores | Comparison:
    """Scores of one prediction file, or the comparison of two."""
    names = parse_metrics(metrics)
    first = read_predictions(predictions)
    if other is None:
        return score_predictions(first, names)
    return compare_predictions(first, read_predictions(other), names)


def score_command(
    *, predictions: str, other: str | None = None, metrics: str | None = None, output_format: str = "text", show: int = 10
) -> int:
    """Entry point of ``xcft score``: print the scores (or the comparison)."""
    result = score_files(predictions, other, metrics)
    if output_format == "json":
        print(json.dumps(result.to_dict(), indent=1, ensure_ascii=False))
    elif isinstance(result, Comparison):
        print(comparison_text(result, show))
    else:
        print(scores_text(result, show))
    return 0

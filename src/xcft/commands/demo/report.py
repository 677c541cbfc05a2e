"""What the demo shows the user: a short table or one JSON object (the loss curve is :mod:`xcft.train.plots`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["format_table", "to_json"]


def _pct(x: float | None) -> str:
    return "  -  " if x is None else f"{100 * x:5.1f}%"


def format_table(result: Mapping[str, Any]) -> str:
    """Render a demo result dict (see :class:`xcft.commands.demo.run.DemoResult.to_dict`) as a few aligned lines."""
    before, after = result["accuracy_before"], result["accuracy_after"]
    kinds = [k for k in ("colour", "shape", "compare", "text") if k in result["per_kind_after"]]
    rows = [("held-out accuracy", _pct(before), _pct(after))]
    for k in kinds:
        chance = result.get("chance", {}).get(k)
        label = f"  {k} (n={result['per_kind_count'][k]}" + (f", chance {100 * chance:.0f}%)" if chance else ")")
        rows.append((label, _pct(result["per_kind_before"].get(k)), _pct(result["per_kind_after"].get(k))))
    if result.get("accuracy_blank_images") is not None:
        rows.append(("  colour, blank images (control)", "", _pct(result["accuracy_blank_images"])))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'':{w}}   before     after", *(f"{a:{w}}   {b:>6}  ->  {c:>6}" for a, b, c in rows)]
    lines.append("")
    lines.append(f"{'training loss':{w}}   {result['loss_first']:.3f} -> {result['loss_last']:.3f}  ({result['steps']} steps)")
    lines.append(f"{'training time':{w}}   {result['train_seconds']:.1f} s  (total {result['total_seconds']:.1f} s)")
    if result.get("reload_answer") is not None:
        q = result["reload_question"]
        lines.append(
            f"{'merged model, new process':{w}}   {q['question']!r} on {Path(q['image']).name} -> "
            f"{result['reload_answer']!r} (expected {q['answer']!r})"
        )
    lines.append("")
    if result.get("predictions_after"):
        lines.append(
            f"{'same figures':{w}}   xcft score {result['predictions_before']} {result['predictions_after']} --metrics first_word"
        )
    for key, label in (
        ("output_dir", "output"),
        ("data_txt", "data"),
        ("base_dir", "base model"),
        ("adapter_dir", "LoRA adapter"),
        ("merged_dir", "merged model"),
        ("loss_png", "loss curve"),
    ):
        if result.get(key):
            lines.append(f"{label + ':':{w}}   {result[key]}")
    return "\n".join(lines)


def to_json(result: Mapping[str, Any]) -> str:
    """One JSON object, paths as strings."""
    return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in result.items()}, indent=1, sort_keys=True)

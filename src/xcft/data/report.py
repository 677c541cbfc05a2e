"""The check-data results in words: one wording for ``xcft check-data`` and the web page's Data tab."""

from __future__ import annotations

from collections.abc import Iterable

from xcft.data.check import CheckResult, Settings, length_stats
from xcft.data.encode import slots_per_image
from xcft.data.schema import Problem

__all__ = ["LEVELS", "LEVEL_WORDS", "describe_images", "level_counts", "stats_text", "verdict"]

#: Problem levels, most severe first (``info`` problems are shown as notes).
LEVELS = ("error", "warning", "info")
#: What the reports call each level (the verdict counts notes; the CLI prints NOTE lines).
LEVEL_WORDS = {"error": "error", "warning": "warning", "info": "note"}


def describe_images(settings: Settings) -> str:
    """How the model sees images: the fixed slot count (2.0) or the crop budget (2.5)."""
    if settings.hd_num is not None:
        return (
            f"InternLM-XComposer-2.5, {settings.img_size} px views, hd_num {settings.hd_num} (slots per image from its crop grid)"
        )
    return f"img_size {settings.img_size} ({slots_per_image(settings.img_size)} slots per image)"


def stats_text(values: list[int]) -> str:
    """``min/median/max`` of token counts, ``-`` when there are none."""
    st = length_stats(values)
    return "-" if st["min"] is None else f"{st['min']}/{st['median']}/{st['max']}"


def level_counts(problems: Iterable[Problem]) -> dict[str, int]:
    """How many problems of each level (every level present, 0 when none)."""
    counts = dict.fromkeys(LEVELS, 0)
    for p in problems:
        counts[p.level] = counts.get(p.level, 0) + 1
    return counts


def verdict(result: CheckResult) -> str:
    """The closing line: whether training can start, with the problem counts."""
    counts = level_counts(result.problems)
    if result.ok:
        return f"OK: training can start ({counts['warning']} warning(s), {counts['info']} note(s))"
    if counts["error"]:
        return f"FAILED: {counts['error']} error(s), {counts['warning']} warning(s); fix the errors before training"
    return "FAILED: no sample would be drawn per epoch"

"""The loss curve: one drawing for ``xcft train``'s loss.png, the demo's plot and the web page's chart."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from xcft.output_dir import OWN_PREFIX
from xcft.run_files import SOURCE_LOSS_PREFIX, is_pair_metric, is_source_loss

__all__ = ["loss_figure", "loss_points", "metric_points", "save_figure", "source_points", "write_loss_plot"]

Points = Sequence[tuple[float, float]]
#: Below this many points each one gets a marker (a short run stays readable).
MARKERS_BELOW = 60


def loss_points(log_history: Iterable[dict[str, Any]]) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """``(train, eval)`` ``(step, loss)`` pairs of a Trainer's ``log_history``."""
    history = list(log_history)
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    return train, evals


def _keyed_points(log_history: Iterable[dict[str, Any]], wanted: Callable[[str], bool]) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for h in log_history:
        for key, value in h.items():
            if wanted(key) and "step" in h:
                out.setdefault(key, []).append((h["step"], value))
    return out


def source_points(log_history: Iterable[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """A mixture's per-file curves of a ``log_history``: ``loss/<file>`` and ``eval_loss/<file>`` -> ``(step, loss)``."""
    return _keyed_points(log_history, is_source_loss)


def metric_points(log_history: Iterable[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """A preference stage's pair-metric curves of a ``log_history`` (``rewards/accuracies``, ...) -> ``(step, value)``."""
    return _keyed_points(log_history, is_pair_metric)


def loss_figure(
    train: Points,
    evals: Points = (),
    *,
    sources: Mapping[str, Points] | None = None,
    metrics: Mapping[str, Points] | None = None,
    title: str = "",
    log_scale: bool = False,
    size: tuple[float, float] = (7, 3.6),
) -> Any:
    """A matplotlib Figure of the training (and eval) loss by optimizer step; a note when nothing was logged.

    ``sources``: a mixture's per-file curves (:func:`source_points`), drawn thinner (eval ones dashed).
    ``metrics``: a preference stage's pair metrics (:func:`metric_points`), in a second panel below.

    Built without pyplot (no global figure state), so a server may draw from any thread.
    """
    from matplotlib.figure import Figure  # lazy: plotting is slow to import and rarely needed

    fig = Figure(figsize=(size[0], size[1] * 1.7) if metrics else size, dpi=100)
    ax = fig.add_subplot(2 if metrics else 1, 1, 1)
    if train:
        marker = "." if len(train) < MARKERS_BELOW else None
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1.2, marker=marker)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    for key, points in sorted((sources or {}).items()):
        is_eval = not key.startswith(SOURCE_LOSS_PREFIX)
        name = key.split("/", 1)[1]
        style = "--" if is_eval else "-"
        ax.plot(
            [s for s, _ in points],
            [v for _, v in points],
            style,
            linewidth=0.8,
            alpha=0.8,
            label=f"{'eval' if is_eval else 'train'}: {name}",
        )
    if train or evals:
        ax.legend(fontsize=8)
        if log_scale:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
    if title:
        ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if metrics:
        low = fig.add_subplot(2, 1, 2, sharex=ax)
        for key, points in sorted(metrics.items()):
            low.plot([s for s, _ in points], [v for _, v in points], "o--" if key.startswith("eval_") else "-", label=key)
        low.legend(fontsize=8)
        low.set_xlabel("optimizer step")
        low.set_ylabel("pair metrics")
        low.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG under a temporary name, then rename it into place."""
    out = Path(path)
    tmp = out.with_name(f"{OWN_PREFIX}-{out.name}.tmp")  # an xcft name until complete
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out


def write_loss_plot(log_history: Iterable[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path | None:
    """The loss curve of a Trainer's ``log_history`` as a PNG; None (nothing written) when no loss was logged."""
    history = list(log_history)
    train, evals = loss_points(history)
    if not train and not evals:
        return None
    figure = loss_figure(train, evals, sources=source_points(history), metrics=metric_points(history), title=title)
    return save_figure(figure, path)

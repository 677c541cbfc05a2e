"""The loss curve: one drawing for ``xcft train``'s loss.png, the demo's plot and the web page's chart."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from xcft.output_dir import OWN_PREFIX

__all__ = ["loss_figure", "loss_points", "save_figure", "write_loss_plot"]

Points = Sequence[tuple[float, float]]
#: Below this many points each one gets a marker (a short run stays readable).
MARKERS_BELOW = 60


def loss_points(log_history: Iterable[dict[str, Any]]) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """``(train, eval)`` ``(step, loss)`` pairs of a Trainer's ``log_history``."""
    history = list(log_history)
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    return train, evals


def loss_figure(
    train: Points, evals: Points = (), *, title: str = "", log_scale: bool = False, size: tuple[float, float] = (7, 3.6)
) -> Any:
    """A matplotlib Figure of the training (and eval) loss by optimizer step; a note when nothing was logged.

    Built without pyplot (no global figure state), so a server may draw from any thread.
    """
    from matplotlib.figure import Figure  # lazy: plotting is slow to import and rarely needed

    fig = Figure(figsize=size, dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        marker = "." if len(train) < MARKERS_BELOW else None
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1.2, marker=marker)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
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
    train, evals = loss_points(log_history)
    if not train and not evals:
        return None
    return save_figure(loss_figure(train, evals, title=title), path)

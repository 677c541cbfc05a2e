"""``xcft bench``: training-step and data-loading benchmarks (figures only; never pass/fail).

``xcft bench train`` times real optimizer steps through the ``xcft train`` code path
(:mod:`xcft.commands.bench.train`); ``xcft bench data`` times image preprocessing (:mod:`xcft.commands.bench.data`); ``xcft bench predict``
times batched generation against one prompt at a time (:mod:`xcft.commands.bench.predict`).
Every report carries a machine calibration figure (:mod:`xcft.commands.bench.calibrate`) so that numbers
taken on different machines, or under different load, can be compared.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from xcft.commands.bench.options import TrainBenchOptions
from xcft.errors import XcftError


def _photo_size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise XcftError(f"--photo {text}: expected WIDTHxHEIGHT, e.g. 4000x3000") from None
    if w < 16 or h < 16:
        raise XcftError(f"--photo {text}: too small; use e.g. 4000x3000")
    return w, h


def bench_train_command(*, output_format: str = "text", **options: Any) -> int:
    """``xcft bench train``: time real optimizer steps; prints text or one JSON object."""
    # torch and the training stack load only when a benchmark runs (keeps `xcft --help` fast)
    from xcft.commands.bench.train import format_train_result, run_train_bench

    opts = TrainBenchOptions(**options)
    # Libraries print to stdout (DeepSpeed's accelerator notice, Trainer logs): keep it for the report.
    with contextlib.redirect_stdout(sys.stderr):
        result = run_train_bench(opts)
    print(json.dumps(result) if output_format == "json" else format_train_result(result))
    return 0


def bench_data_command(
    *,
    data: str,
    img_size: int = 490,
    workers: int = 0,
    fast_jpeg: bool = False,
    photo: str | None = None,
    sources: Sequence[str] = (),
    output_format: str = "text",
) -> int:
    """``xcft bench data``: time image decoding and preprocessing; prints text or one JSON object."""
    from xcft.commands.bench.data import format_data_result, run_data_bench

    with contextlib.redirect_stdout(sys.stderr):
        result = run_data_bench(
            data, img_size, workers=workers, fast_jpeg=fast_jpeg, photo=_photo_size(photo), sources=tuple(sources)
        )
    print(json.dumps(result) if output_format == "json" else format_data_result(result))
    return 0


def bench_predict_command(*, output_format: str = "text", **options: Any) -> int:
    """``xcft bench predict``: batched generation against one prompt at a time; prints text or one JSON object."""
    from xcft.commands.bench.predict import format_predict_result, run_predict_bench

    with contextlib.redirect_stdout(sys.stderr):
        result = run_predict_bench(**options)
    print(json.dumps(result) if output_format == "json" else format_predict_result(result))
    return 0


__all__ = ["bench_data_command", "bench_predict_command", "bench_train_command"]

"""``xcft bench``: training-step and data-loading benchmarks (figures only; never pass/fail).

``xcft bench train`` times real optimizer steps through the ``xcft train`` code path
(:mod:`xcft.commands.bench.train`); ``xcft bench data`` times image preprocessing (:mod:`xcft.commands.bench.data`).
Every report carries a machine calibration figure (:mod:`xcft.commands.bench.calibrate`) so that numbers
taken on different machines, or under different load, can be compared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from xcft.commands.bench.options import from_namespace
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


def bench_command(args: argparse.Namespace) -> int:
    """Entry point of ``xcft bench train`` / ``xcft bench data``; prints text or one JSON object."""
    if args.bench_command == "train":
        # torch and the training stack load only when a benchmark runs (keeps `xcft --help` fast)
        from xcft.commands.bench.train import format_train_result, run_train_bench

        opts = from_namespace(args)
        # Libraries print to stdout (DeepSpeed's accelerator notice, Trainer logs): keep it for the report.
        with contextlib.redirect_stdout(sys.stderr):
            result = run_train_bench(opts)
        print(json.dumps(result) if args.format == "json" else format_train_result(result))
        return 0
    if args.bench_command == "data":
        from xcft.commands.bench.data import format_data_result, run_data_bench

        with contextlib.redirect_stdout(sys.stderr):
            result = run_data_bench(
                args.data,
                args.img_size,
                workers=args.workers,
                fast_jpeg=args.fast_jpeg,
                photo=_photo_size(getattr(args, "photo", None)),
                sources=tuple(getattr(args, "source", None) or ()),
            )
        print(json.dumps(result) if args.format == "json" else format_data_result(result))
        return 0
    raise XcftError(f"unknown bench command {args.bench_command!r}; use 'train' or 'data'")


__all__ = ["bench_command"]

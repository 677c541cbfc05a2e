"""``xcft check-data`` and ``xcft inspect``: the data checks of :mod:`xcft.data.check`, printed.

check-data prints a per-file summary and every problem found; exit 0 when training can start (no
error-level problem), 1 otherwise. inspect prints how one sample is encoded.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from xcft.data.cache_options import CacheOptions
from xcft.data.check import CheckResult, encode_for, encode_pair_for, find_sample, load_settings, render_sample, run_check
from xcft.data.encode import slots_per_image
from xcft.data.pairs import PreferencePair, pair_skip_reason
from xcft.data.report import describe_images, stats_text, verdict
from xcft.data.schema import Problem
from xcft.errors import XcftError

MAX_NOTES_PER_FILE = 3
#: The per-file counts the JSON output adds up in "total".
TOTAL_KEYS = ("samples", "drawn_per_epoch", "images", "tokens", "supervised_tokens", "over_max_length", "image_tokens")


def _print_text(result: CheckResult, data: str, out: TextIO) -> None:
    s = result.settings
    hd = s.hd_num is not None
    for note in s.notes:
        print(f"note: {note}", file=out)
    print(f"data: {data}  ({describe_images(s)}; max_length {s.max_length})", file=out)
    if result.is_preference:
        print(
            "preference pairs (for --stage dpo or rm): samples count pairs; tokens are a pair's two sequences together; "
            "supervised = the scored tokens of both final answers",
            file=out,
        )
    if result.files:
        header: tuple[str, ...] = ("file", "samples", "drawn/epoch", "images", "tokens min/median/max", "supervised", "truncated")
        if hd:
            header += ("image tokens min/median/max",)
        rows = []
        for f in [*result.files, result.total]:
            samples = str(f.samples) if f.usable == f.samples else f"{f.usable}/{f.samples}"
            row = (
                f.display,
                samples,
                str(f.drawn_per_epoch),
                str(f.images),
                stats_text(f.lengths),
                str(f.supervised),
                str(f.truncated),
            )
            rows.append(row + ((stats_text(f.image_tokens),) if hd else ()))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        print(fmt.format(*header), file=out)
        for r in rows:
            print(fmt.format(*r), file=out)
        print(
            "(samples shown as usable/total when some cannot be trained; tokens include image slots; "
            "truncated = longer than max_length)",
            file=out,
        )

    errors = [p for p in result.problems if p.level == "error"]
    warnings = [p for p in result.problems if p.level == "warning"]
    notes = [p for p in result.problems if p.level == "info"]
    if errors or warnings or notes:
        print(file=out)
    for p in errors:
        print(f"ERROR {p}", file=out)
    for p in warnings:
        print(f"WARNING {p}", file=out)
    # notes repeat per sample (e.g. every single-image sample without placeholder): a few per file
    by_key: dict[tuple[str, str], list[Problem]] = {}
    for p in notes:
        by_key.setdefault((p.file, p.message), []).append(p)
    for (file, _msg), group in by_key.items():
        for p in group[:MAX_NOTES_PER_FILE]:
            print(f"NOTE {p}", file=out)
        if len(group) > MAX_NOTES_PER_FILE:
            print(f"NOTE {file}: ... and {len(group) - MAX_NOTES_PER_FILE} more sample(s) with the same note", file=out)
    print(file=out)
    print(verdict(result), file=out)


def check_data_command(
    data: str,
    *,
    model_dir: str,
    img_size: int | None = None,
    max_length: int | None = None,
    given_num: bool = True,
    output_format: str = "text",
    workers: int | None = None,
    hd_num: int | None = None,
    data_cache_dir: str | None = None,
    no_data_cache: bool = False,
    preprocessing_num_workers: int | None = None,
) -> int:
    """Validate a data.txt or JSON file against a model's tokenizer and sizes; 0 when training can start."""
    settings = load_settings(model_dir, img_size, max_length, hd_num)
    cache = CacheOptions(data_cache_dir, no_data_cache, preprocessing_num_workers)
    result = run_check(data, settings, given_num=given_num, workers=workers, cache=cache)
    if output_format == "json":
        obj = {
            "ok": result.ok,
            "data": str(data),
            "img_size": settings.img_size,
            "max_length": settings.max_length,
            "slots_per_image": None if settings.hd_num is not None else slots_per_image(settings.img_size),
            "family": settings.family,
            "hd_num": settings.hd_num,
            "preference": result.is_preference,
            "notes": settings.notes,
            "files": [f.to_dict() for f in result.files],
            "total": {k: v for k, v in result.total.to_dict().items() if k in TOTAL_KEYS},
            "errors": len(result.errors),
            "problems": [p.to_dict() for p in result.problems],
        }
        print(json.dumps(obj, ensure_ascii=False, indent=1))
    else:
        _print_text(result, str(data), sys.stdout)
    return 0 if result.ok else 1


def inspect_command(
    data: str,
    *,
    model_dir: str,
    index: int | None = None,
    sample_id: str | None = None,
    img_size: int | None = None,
    max_length: int | None = None,
    output_format: str = "text",
    hd_num: int | None = None,
    data_cache_dir: str | None = None,
    no_data_cache: bool = False,
    preprocessing_num_workers: int | None = None,
) -> int:
    """Print how one sample is encoded (by overall index in data.txt order, or by id)."""
    if (index is None) == (sample_id is None):
        raise XcftError("give exactly one of --index or --id")
    settings = load_settings(model_dir, img_size, max_length, hd_num)
    cache = CacheOptions(data_cache_dir, no_data_cache, preprocessing_num_workers)
    conv, problems, where = find_sample(data, settings, index, sample_id, cache)
    errs = [p for p in problems if p.level == "error"]
    if conv is None or errs:
        for p in errs:
            print(f"ERROR {p}", file=sys.stderr)
        return 1
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    if isinstance(conv, PreferencePair):
        return _inspect_pair(conv, problems, where, settings, output_format, color)
    enc = encode_for(conv, settings)
    if output_format == "json":
        print(json.dumps({"input_ids": enc.input_ids, "labels": enc.labels, "image_mask": enc.image_mask}))
        return 0
    print(f"{where}, id {conv.id!r}")
    print(
        f"{len(enc)} tokens ({enc.untruncated_length} before truncation), {enc.num_supervised} supervised, "
        f"{enc.num_images} image(s){', truncated' if enc.truncated else ''}"
        + (f", {enc.dropped_images} image(s) dropped by truncation" if enc.dropped_images else "")
    )
    for p in problems:
        print(f"{p.level.upper()} {p}")
    for path in conv.images[: enc.num_images]:
        print(f"image: {path}")
    legend = "supervised tokens in bold green" if color else "supervised tokens between « »"
    print(f"--- ({legend})")
    print(render_sample(enc, settings.tokenizer, color))
    if enc.num_supervised == 0:
        print("--- this sample has no supervised token: training skips it")
    return 0


def _inspect_pair(
    pair: PreferencePair, problems: list[Problem], where: str, settings: Any, output_format: str, color: bool
) -> int:
    """Both sides of a preference pair: the shared prompt, then each answer with its scored tokens marked."""
    enc = encode_pair_for(pair, settings)
    if output_format == "json":
        sides = {"chosen": enc.chosen, "rejected": enc.rejected}
        print(
            json.dumps({k: {"input_ids": e.input_ids, "labels": e.labels, "image_mask": e.image_mask} for k, e in sides.items()})
        )
        return 0
    print(f"{where}, id {pair.id!r}: preference pair")
    for p in problems:
        print(f"{p.level.upper()} {p}")
    for path in pair.images[: enc.chosen.num_images]:
        print(f"image: {path}")
    why = pair_skip_reason(pair, enc, settings.max_length)
    legend = "scored tokens in bold green" if color else "scored tokens between « »"
    for side, e in (("chosen", enc.chosen), ("rejected", enc.rejected)):
        print(
            f"--- {side}: {len(e)} tokens ({e.untruncated_length} before truncation), {e.num_supervised} scored"
            f"{', truncated' if e.truncated else ''} ({legend})"
        )
        print(render_sample(e, settings.tokenizer, color))
    if why is not None:
        print(f"--- {why}: training skips this pair")
    return 0


__all__ = ["check_data_command", "inspect_command"]

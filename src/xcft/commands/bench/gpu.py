"""The GPU check behind ``benchmarks/gpu_check.sh``: one model, four ``xcft bench train`` runs.

The ``7b`` preset (random weights, 490 px) is built once on the GPU in bf16 and wrapped with LoRA
exactly as ``xcft train --use_lora true`` does; then four runs of :func:`run_train_bench` share it:
activation checkpointing on / off × unpacked batch 1 (one ~``length``-token sample per step) /
packed (samples of ``length / 2`` tokens, two per ``length``-position row). Each prints tokens/s,
MFU and peak memory; a failing run (e.g. out of memory) is reported and the others still run.
``--preset tiny`` runs the same code on a CPU in seconds (the repository's tests do).

``--bits 4`` quantizes the decoder linears as ``xcft train --bits 4`` does (QLoRA); ``--preset 7b-2.5``
with ``--hd-num`` trains the 2.5 model on samples whose image has the largest crop grid the budget
allows. ``--jsonl FILE`` appends one JSON line per configuration: peak allocated and reserved GPU
memory (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the timed run), step
time and MFU, with the run's shape.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import transformers

from xcft.commands.bench.options import TrainBenchOptions
from xcft.commands.bench.train import _train_argv, prepare_model, run_train_bench
from xcft.model.bits import BITS_HELP, SUPPORTED_BITS
from xcft.train.args import parse_train_args

logger = logging.getLogger(__name__)

TARGET_MFU = 0.45
TARGET_PEAK_GIB = 20.0


def _versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "flash_attn"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return out


def run_gpu_check(
    preset: str = "7b",
    length: int = 4096,
    steps: int = 4,
    warmup: int = 2,
    images: int = 1,
    configs: Sequence[str] = ("ac-unpacked", "ac-packed", "noac-unpacked", "noac-packed"),
    bf16: bool | None = None,
    calibration_seconds: float = 0.3,
    bits: int = 16,
    hd_num: int | None = None,
) -> list[dict[str, Any]]:
    """Run the check; returns one result (or error) per configuration, in order."""

    if bf16 is None:
        bf16 = torch.cuda.is_available()
    base = TrainBenchOptions(
        preset=preset,
        synthetic=length,
        synthetic_images=images,
        batch_size=1,
        steps=steps,
        warmup=warmup,
        max_length=length,
        use_lora=True,
        bf16=bf16,
        calibration_seconds=calibration_seconds,
        bits=bits,
        hd_num=hd_num,
    )

    t0 = time.perf_counter()
    cfg = parse_train_args(_train_argv(base, "/tmp/xcft-gpu-check"))
    prepared = prepare_model(base, cfg)
    build_s = time.perf_counter() - t0
    quantized = f", decoder linears in {bits} bit" if bits != 16 else ""
    print(f"# model {preset} built{quantized} and wrapped with LoRA in {build_s:.1f} s", flush=True)
    results = []
    for name in configs:
        ac = name.startswith("ac-")
        packed = name.endswith("-packed")
        opts = TrainBenchOptions(
            **{**base.__dict__, "activation_checkpointing": ac, "packing": packed, "synthetic": length // 2 if packed else length}
        )
        entry: dict[str, Any] = {"config": name, "activation_checkpointing": ac, "packing": packed}
        try:
            r = run_train_bench(opts, prepared=prepared)
            entry.update(r)
        except Exception as exc:  # report and go on: one failing configuration must not hide the others
            entry["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        results.append(entry)
        print(_line(entry), flush=True)
    return results


def memory_record(preset: str, length: int, bits: int, hd_num: int | None, e: dict[str, Any], device: str) -> dict[str, Any]:
    """One JSON line of the memory check: what ran and what it peaked at (or its error)."""
    record: dict[str, Any] = {
        "preset": preset,
        "config": e["config"],
        "mode": "qlora" if bits != 16 else "lora",
        "bits": bits,
        "length": length,
        "hd_num": e.get("hd_num", hd_num),
        "image_grid": e.get("image_grid"),
        "activation_checkpointing": e["activation_checkpointing"],
        "packing": e["packing"],
        "device": device,
    }
    if "error" in e:
        return {**record, "error": e["error"]}
    return {
        **record,
        "max_memory_allocated": e.get("peak_gpu_bytes"),
        "max_memory_reserved": e.get("peak_gpu_reserved_bytes"),
        "seconds_per_step": e["seconds_per_step"],
        "tokens_per_step": e["tokens_per_step"],
        "mfu": e.get("mfu"),
        "attn_implementation": e["attn_implementation"],
    }


def _line(e: dict[str, Any]) -> str:
    if "error" in e:
        return f"{e['config']:<14} FAILED {e['error']}"
    gib = (e["peak_gpu_bytes"] if "peak_gpu_bytes" in e else e["peak_rss_bytes"]) / 1024**3
    where = "GPU" if "peak_gpu_bytes" in e else "RSS"
    mfu = e.get("mfu")
    mfu_s = f"{mfu * 100:5.1f}%" if mfu is not None else "  n/a "
    return (
        f"{e['config']:<14} {e['tokens_per_s']:10.0f} tokens/s  {e['seconds_per_step']:7.3f} s/step  MFU {mfu_s}  "
        f"peak {where} {gib:6.2f} GiB  {e['tokens_per_step']:.0f} tokens/step  padding {e['padding_fraction']:.3f}  "
        f"attention {e['attn_implementation']}  checkpointing active {e['activation_checkpointing_active']}  calibration {e['calibration_gflops']:.0f} GFLOP/s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xcft.commands.bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="7b")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--configs", default="ac-unpacked,ac-packed,noac-unpacked,noac-packed")
    p.add_argument("--no-bf16", action="store_true", help="float32 (CPU test runs)")
    p.add_argument("--calibration-seconds", type=float, default=0.3, help="per CPU calibration repeat")
    p.add_argument("--json", default=None, help="also write every result to this JSON file")
    p.add_argument("--bits", type=int, choices=list(SUPPORTED_BITS), default=16, help=BITS_HELP)
    p.add_argument("--hd-num", type=int, default=None, help="2.5 presets: crop budget (default 18)")
    p.add_argument("--jsonl", default=None, help="append one JSON line per configuration (memory, step time, MFU)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    info = _versions()
    print("# " + " ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    if info["device"] == "cpu" and args.preset.startswith("7b"):
        print("# no GPU visible: the 7b check needs one (use --preset tiny to test the script on a CPU)", flush=True)
        return 2
    results = run_gpu_check(
        args.preset,
        args.length,
        args.steps,
        args.warmup,
        args.images,
        [c.strip() for c in args.configs.split(",") if c.strip()],
        bf16=False if args.no_bf16 else None,
        calibration_seconds=args.calibration_seconds,
        bits=args.bits,
        hd_num=args.hd_num,
    )
    print("# flops: " + next((r["flops_convention"] for r in results if "flops_convention" in r), "n/a"))
    ok = [r for r in results if "error" not in r]
    for r in ok if args.bits == 16 and args.preset == "7b" else []:  # the targets are those of 2.0 LoRA
        if r["activation_checkpointing"] and r.get("mfu") is not None:
            gib = r["peak_gpu_bytes"] / 1024**3
            verdict = "meets" if r["mfu"] >= TARGET_MFU and gib <= TARGET_PEAK_GIB else "misses"
            print(
                f"# target (MFU >= {TARGET_MFU:.0%}, peak <= {TARGET_PEAK_GIB:.0f} GiB with checkpointing): "
                f"{r['config']} {verdict} it (MFU {r['mfu']:.1%}, peak {gib:.2f} GiB)"
            )
    if args.jsonl:
        with open(args.jsonl, "a", encoding="utf-8") as fh:
            for r in results:
                fh.write(json.dumps(memory_record(args.preset, args.length, args.bits, args.hd_num, r, info["device"])) + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"versions": info, "results": results}, fh, indent=2)
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

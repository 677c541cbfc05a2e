"""Data at scale: the preprocessing cache's build time, time to the first training step, and memory.

    python benchmarks/data_scale.py --samples 100000 [--samples 665000] [--baseline] [--out benchmarks/data_scale.jsonl]

For each size, in a temp folder: a data set shaped like the LLaVA-665k mixture (one JSON file;
one image per sample out of 1,000 generated JPEGs of varied aspect ratios, 6 % text-only samples;
1-3 turns of generated text), a tiny model folder (``xcft init-model --preset tiny``, the real
InternLM2 tokenizer from ../shared when present). Then, each as its own process, timed from its
start:

1. ``check_data_cold``: ``xcft check-data`` with an empty cache (reads, tokenizes and stores the set; every image decoded once);
2. ``train_warm``: ``xcft train`` (tiny LoRA, batch 4, 2 loader workers, 2 steps) on the cache that 1 built:
   seconds to the first finished step and the peak process-tree PSS (``/proc/PID/smaps_rollup``
   summed over the process and its children, sampled every 0.1 s);
3. ``check_data_warm``: ``xcft check-data`` again (after train);
4. ``train_cold``: ``xcft train`` with a second empty cache (the build inside training);
5. ``check_data_after_train``: ``xcft check-data`` on the cache that 4 built (images decoded then);
   (``--short``: runs 1-3 only);
6. with ``--baseline``: ``train_no_cache``: ``xcft train --no_data_cache`` (every sample read at startup, nothing kept).

One JSON line per size goes to ``--out`` (and stdout), with the machine's load average before and after.
``cpu_s`` (user + system seconds of the whole process tree) says what a run costs whatever the load:
on an otherwise idle machine a build takes about ``cpu_s / cores`` plus the start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = ROOT.parent / "shared" / "assets" / "internlm2-tokenizer" / "tokenizer.model"
WORDS = [
    "the",
    "a",
    "an",
    "picture",
    "image",
    "shows",
    "man",
    "woman",
    "dog",
    "cat",
    "street",
    "car",
    "tree",
    "building",
    "sky",
    "water",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "small",
    "large",
    "two",
    "three",
    "left",
    "right",
    "front",
    "behind",
    "holding",
    "standing",
    "sitting",
    "near",
    "under",
    "over",
    "with",
    "and",
    "of",
    "in",
    "on",
    "at",
    "what",
    "where",
    "how",
    "many",
    "why",
    "which",
    "color",
    "describe",
    "detail",
    "scene",
    "object",
    "person",
    "people",
    "table",
    "food",
    "plate",
    "sign",
    "text",
    "is",
    "are",
    "there",
    "this",
    "that",
    "it",
    "they",
    "looks",
    "appears",
    "wearing",
    "walking",
    "playing",
    "field",
    "grass",
    "snow",
    "beach",
    "road",
    "train",
    "bus",
]


def generate(folder: Path, samples: int, images: int = 1000, seed: int = 0) -> Path:
    """The LLaVA-665k-shaped set described in the module docstring; returns the JSON file."""
    from PIL import Image

    rng = random.Random(seed)
    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    shapes = [(64, 48), (48, 64), (80, 40), (56, 56), (96, 54), (40, 90)]
    for k in range(images):
        w, h = shapes[k % len(shapes)]
        Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(
            img_dir / f"{k:05d}.jpg", quality=85
        )

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize()

    path = folder / "llava_like.json"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("[\n")
        for i in range(samples):
            turns = []
            for _turn in range(rng.randint(1, 3)):
                turns.append({"from": "human", "value": sentence(5, 18) + "?"})
                turns.append({"from": "gpt", "value": sentence(8, 60) + "."})
            sample: dict = {"id": f"{i:07d}"}
            if rng.random() >= 0.06:
                sample["image"] = f"images/{rng.randrange(images):05d}.jpg"
                turns[0]["value"] = "<ImageHere>\n" + turns[0]["value"]
            sample["conversations"] = turns
            fh.write(("," if i else "") + json.dumps(sample) + "\n")
        fh.write("]\n")
    return path


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry))
    return out


def tree_pss_kb(pid: int) -> int:
    """PSS of ``pid`` and all its descendants (kB), from smaps_rollup."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
        todo.extend(_children(p))
    return total


def run(cmd: list[str], env: dict[str, str], log: Path | None = None, step_log: Path | None = None) -> dict:
    """Run ``cmd``; wall seconds, CPU seconds of its process tree, seconds to the first training step
    (from trainer_log.jsonl), peak tree PSS, and the cache's own build time when it built an entry."""
    t0 = time.time()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak, first_step = 0, None
        while proc.poll() is None:
            peak = max(peak, tree_pss_kb(proc.pid))
            if first_step is None and step_log is not None and step_log.is_file():
                for line in step_log.read_text().splitlines():
                    rec = json.loads(line)
                    if rec.get("event") == "step":
                        first_step = rec["time"] - t0
                        break
            time.sleep(0.1)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    result = {
        "rc": proc.returncode,
        "wall_s": round(time.time() - t0, 2),
        "cpu_s": round(cpu, 1),
        "peak_pss_mb": round(peak / 1024, 1),
    }
    if log is not None:
        built = re.search(r"read in ([0-9.]+) s, stored", log.read_text())
        result["build_s"] = float(built.group(1)) if built else None
    if step_log is not None:
        result["first_step_s"] = None if first_step is None else round(first_step, 2)
    if proc.returncode != 0 and log is not None:
        print(log.read_text()[-3000:], file=sys.stderr)
    return result


def bench(samples: int, baseline: bool, keep: Path | None, short: bool = False) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"xcft-scale-{samples}-", dir=keep))
    xcft = [sys.executable, "-m", "xcft"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    t = time.time()
    data = generate(work / "data", samples)
    gen_s = time.time() - t
    model = work / "model"
    init = [*xcft, "init-model", str(model), "--preset", "tiny"]
    if SHARED_TOKENIZER.is_file():
        init += ["--tokenizer", str(SHARED_TOKENIZER)]
    subprocess.run(init, env=env, check=True, stdout=subprocess.DEVNULL)
    load_before = os.getloadavg()
    out: dict = {
        "benchmark": "data_scale",
        "samples": samples,
        "data_mb": round(data.stat().st_size / 2**20, 1),
        "generate_s": round(gen_s, 1),
        "tokenizer": "internlm2" if SHARED_TOKENIZER.is_file() else "built",
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    def check(cache: Path, name: str) -> dict:
        return run(
            [*xcft, "check-data", str(data), "--model", str(model), "--format", "json"],
            {**env, "XCFT_DATA_CACHE": str(cache)},
            work / f"{name}.log",
        )

    def train(cache: Path, name: str, *extra: str) -> dict:
        o = work / f"out-{name}"
        cmd = [
            *xcft, "train", "--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(o),
            "--use_lora", "true", "--lora_r", "4", "--per_device_train_batch_size", "4", "--max_steps", "2",
            "--dataloader_num_workers", "2", "--save_strategy", "no", "--report_to", "none", *extra,
        ]  # fmt: skip
        return run(cmd, {**env, "XCFT_DATA_CACHE": str(cache)}, work / f"{name}.log", step_log=o / "trainer_log.jsonl")

    out["check_data_cold"] = check(work / "cache-a", "check_data_cold")
    out["train_warm"] = train(work / "cache-a", "train_warm")
    out["check_data_warm"] = check(work / "cache-a", "check_data_warm")
    if short:
        baseline = False
    else:
        out["train_cold"] = train(work / "cache-b", "train_cold")
        out["check_data_after_train"] = check(work / "cache-b", "check_data_after_train")
    if baseline:
        out["train_no_cache"] = train(work / "cache-c", "train_no_cache", "--no_data_cache")
        if out["train_no_cache"].get("first_step_s") and out["train_warm"].get("first_step_s"):
            out["first_step_speedup_vs_no_cache"] = round(
                out["train_no_cache"]["first_step_s"] / out["train_warm"]["first_step_s"], 1
            )
    out["loadavg_before"] = [round(x, 2) for x in load_before]
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    out["work"] = str(work)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, action="append", help="data set size (repeatable; default 100000)")
    ap.add_argument("--baseline", action="store_true", help="also time training without the cache")
    ap.add_argument("--short", action="store_true", help="only runs 1-3 (cold check-data, warm train, check-data after it)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("data_scale.jsonl"))
    ap.add_argument("--workdir", type=Path, default=None, help="folder for the generated sets (default: the temp folder)")
    args = ap.parse_args()
    for n in args.samples or [100000]:
        result = bench(n, args.baseline, args.workdir, args.short)
        line = json.dumps(result)
        print(line, flush=True)
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How the web UI's Data tab copes with a 100,000-sample data.txt (measured, printed as JSON lines).

    python benchmarks/web_100k.py [--samples 100000] [--images 1000] [--views 20]

Builds, in a temp folder: a model folder holding only what check-data reads (config.json with
img_size 490 / max_length 4096 and the real InternLM2 tokenizer from ../shared when present, else
a small one built on the spot), four JSON files of equal size (text-only multi-turn, one image
without placeholder, one image with placeholder, two images) drawing on a pool of generated JPEGs,
and a data.txt. Then it starts ``xcft web`` and, in headless Chromium, times
  * the summary: click Check -> the summary is shown (one check-data pass over everything);
  * the sample view: enter an index and press Show -> that sample is shown, for random indexes;
  * the first look-up by id (builds the id table) and one by index after it.
The pass is also timed in-process (library only) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_TOKENIZER = ROOT.parent / "shared" / "assets" / "internlm2-tokenizer" / "tokenizer.model"
WORDS = [
    "the",
    "a",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "square",
    "circle",
    "image",
    "picture",
    "left",
    "right",
    "top",
    "bottom",
    "shows",
    "there",
    "is",
    "what",
    "which",
    "how",
    "many",
    "colour",
    "shape",
    "object",
    "scene",
    "person",
    "dog",
    "cat",
    "car",
    "tree",
    "house",
    "sky",
    "water",
    "road",
]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def build(root: Path, samples: int, n_images: int) -> tuple[Path, Path]:
    from PIL import Image, ImageDraw

    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"img_size": 490, "max_length": 4096}))
    if REAL_TOKENIZER.is_file():
        shutil.copyfile(REAL_TOKENIZER, model / "tokenizer.model")
    else:
        from xcft.data.spm_builder import build_tokenizer

        shutil.copyfile(build_tokenizer(root / "tok", vocab_size=1000), model / "tokenizer.model")
    rng = random.Random(0)
    img_dir = root / "data" / "images"
    img_dir.mkdir(parents=True)
    for i in range(n_images):
        img = Image.new("RGB", (640, 480), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.randrange(600), rng.randrange(440)
            draw.rectangle(
                [x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)], fill=tuple(rng.randrange(256) for _ in range(3))
            )
        img.save(img_dir / f"{i}.jpg", quality=85)
    per_file = samples // 4
    kinds = ("text", "one_image_prepended", "one_image", "two_images")
    lines = []
    for kind in kinds:
        out = []
        for k in range(per_file):
            turns = []
            for _ in range(rng.randint(1, 3)):
                turns += [
                    {"from": "human", "value": _sentence(rng, rng.randint(5, 30))},
                    {"from": "gpt", "value": _sentence(rng, rng.randint(10, 80))},
                ]
            sample = {"id": f"{kind}-{k}", "conversations": turns}
            if kind != "text":
                n = 2 if kind == "two_images" else 1
                sample["image"] = [f"images/{rng.randrange(n_images)}.jpg" for _ in range(n)]
                if kind != "one_image_prepended":
                    turns[0]["value"] = "<ImageHere>" * n + turns[0]["value"]
            out.append(sample)
        (root / "data" / f"{kind}.json").write_text(json.dumps(out))
        lines.append(f"{kind}.json {per_file / 1000}")
    data_txt = root / "data" / "data.txt"
    data_txt.write_text("\n".join(lines) + "\n")
    return data_txt, model


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--views", type=int, default=20)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    root = Path(tempfile.mkdtemp(prefix="xcft-web-100k-"))
    env = dict(
        os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False"
    )
    server = None
    try:
        t = time.perf_counter()
        data_txt, model = build(root, args.samples, args.images)
        print(
            json.dumps(
                {
                    "what": "generated",
                    "samples": args.samples,
                    "distinct_images": args.images,
                    "tokenizer": "internlm2" if REAL_TOKENIZER.is_file() else "small",
                    "seconds": round(time.perf_counter() - t, 1),
                }
            )
        )

        from xcft.commands.web.data_view import build_index

        t, c = time.perf_counter(), time.process_time()
        index = build_index(str(data_txt), str(model), None, None)
        print(
            json.dumps(
                {
                    "what": "library pass (build_index, in-process)",
                    "samples": index.total,
                    "seconds": round(time.perf_counter() - t, 2),
                    "cpu_seconds": round(time.process_time() - c, 2),
                    "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg(),
                }
            )
        )
        del index

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}/"
        server = subprocess.Popen(
            [sys.executable, "-m", "xcft.cli", "web", "--port", str(port), "--workdir", str(root / "work")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(600):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.locator("#data-path textarea").fill(str(data_txt))
            page.locator("#data-model textarea").fill(str(model))
            t, c = time.perf_counter(), _cpu_seconds(server.pid)
            page.click("#data-check")
            page.wait_for_selector("#data-status [data-samples]", timeout=600_000)
            summary_s = time.perf_counter() - t
            print(
                json.dumps(
                    {
                        "what": "page: summary (Check -> summary shown)",
                        "seconds": round(summary_s, 2),
                        "server_cpu_seconds": round(_cpu_seconds(server.pid) - c, 2),
                        "status": page.inner_text("#data-status")[:200],
                        "loadavg": os.getloadavg(),
                    }
                )
            )
            rng = random.Random(1)
            times = []
            for idx in rng.sample(range(args.samples), args.views):
                page.locator("#sample-index input").fill(str(idx))
                t = time.perf_counter()
                page.click("#sample-show")
                page.wait_for_selector(f'#sample-view .xcft-sample[data-index="{idx}"]')
                times.append(time.perf_counter() - t)
            print(
                json.dumps(
                    {
                        "what": "page: sample view (Show -> sample shown)",
                        "views": len(times),
                        "median_s": round(statistics.median(times), 3),
                        "max_s": round(max(times), 3),
                    }
                )
            )
            page.locator("#sample-id textarea").fill("two_images-24999")
            t = time.perf_counter()
            page.click("#sample-show")
            page.wait_for_selector(f'#sample-view .xcft-sample[data-index="{args.samples - 1}"]')
            print(
                json.dumps(
                    {"what": "page: first look-up by id (builds the id table)", "seconds": round(time.perf_counter() - t, 3)}
                )
            )
            browser.close()
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

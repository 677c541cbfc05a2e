"""Shared pytest fixtures.

Two kinds of fixtures live here:

* Built on the spot (no outside files): a SentencePiece tokenizer from ``xcft.data.spm_builder``,
  tiny model folders saved with xcft's own save path, a small data set in the official layout
  (``data.txt`` + JSON files + PIL images) and a builder of random batch-contract items. Every
  test that does not compare against official reference numbers uses only these, so it runs on
  a plain checkout.
* The read-only reference material in ``../shared`` (official checkpoint with recorded outputs,
  the real tokenizer, the official example data). Only parity tests and tests of the official
  example data use it; they skip with one clear reason when it is absent. ``XCFT_SHARED_DIR``
  points elsewhere (``XCFT_SHARED_DIR=/nonexistent`` shows what runs without it).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Keep every test single-threaded on BLAS/OpenMP: the CI box has 2 cores and several
# torch tests run in one process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("XCFT_SHARED_DIR") or PROJECT_ROOT.parent / "shared")

#: Shape of the default tiny model folder: 56-px images (4 x 4 patches -> 16 slots per image),
#: 160-token samples and the 1000-piece built tokenizer keep a training step well under a second.
TINY_IMG_SIZE = 56
TINY_MAX_LENGTH = 160
TINY_VOCAB = 1000
#: ``xcft train`` flags of every quick test run: CPU, no progress bar, no reporting, a fixed seed.
CPU_TRAIN_FLAGS = ("--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none", "--seed", "3")


@pytest.fixture(scope="session", autouse=True)
def data_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Every test (and the processes it starts) keeps the preprocessing cache in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("data-cache")
        mp.setenv("XCFT_DATA_CACHE", str(path))
        yield path


# ---------------------------------------------------------------------- ../shared (parity only)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (the ../shared reference folder is absent)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared``: reference docs, fixtures and assets (read-only)."""
    return _need(SHARED_DIR, "shared reference folder")


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The tiny official-format checkpoint with recorded official outputs."""
    return _need(SHARED_DIR / "fixtures" / "ixc2_vl_tiny_public", "ixc2_vl_tiny_public fixture")


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    """The official finetuning example data (data.txt + JSON + images)."""
    return _need(SHARED_DIR / "assets" / "official-examples", "official example data")


@pytest.fixture(scope="session")
def real_tokenizer() -> Path:
    """Path of the real InternLM2 ``tokenizer.model``."""
    return _need(SHARED_DIR / "assets" / "internlm2-tokenizer" / "tokenizer.model", "real InternLM2 tokenizer")


@pytest.fixture(scope="session")
def fixture_2d5_dir() -> Path:
    """The tiny official InternLM-XComposer-2.5 checkpoint with recorded official outputs."""
    return _need(SHARED_DIR / "fixtures" / "ixc2d5_tiny_public", "ixc2d5_tiny_public fixture")


# ---------------------------------------------------------------------- built on the spot


@pytest.fixture(scope="session")
def built_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a 1000-piece InternLM2-convention ``tokenizer.model`` built by xcft (about a second)."""
    from xcft.data.spm_builder import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("built-tokenizer"), vocab_size=TINY_VOCAB)


@pytest.fixture(scope="session")
def tok(built_tokenizer: Path):
    """An ``InternLM2Tokenizer`` over the built tokenizer."""
    from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

    return InternLM2Tokenizer.from_model_file(built_tokenizer)


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., Any]:
    """``tiny_model(preset="tiny", **overrides)``: a fresh randomly initialised model of a tiny preset, in eval mode.

    Defaults: the built tokenizer's vocabulary (1000), seed 0, Partial-LoRA dropout 0 (so two
    forwards agree); ``overrides`` are :func:`xcft.model.presets.build_model` arguments
    (``img_size``, ``vocab_size``, ``seed``, ``max_length``, any config field).
    """
    from xcft.model.presets import build_model

    def make(preset: str = "tiny", **overrides: Any) -> Any:
        return build_model(preset, **{"vocab_size": TINY_VOCAB, "seed": 0, "plora_dropout": 0.0, **overrides})

    return make


@pytest.fixture(scope="session")
def train_argv() -> Callable[..., list[str]]:
    """``train_argv(base, data, out, *extra)``: an ``xcft train`` argument list for a quick CPU run.

    The model, data and output folder, then CPU, no progress bar, no reporting and seed 3, then ``extra``
    (later flags win).
    """

    def make(base: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *extra: str) -> list[str]:
        return [
            "--model_name_or_path",
            str(base),
            "--data_path",
            str(data),
            "--output_dir",
            str(out),
            *CPU_TRAIN_FLAGS,
            *extra,
        ]

    return make


@pytest.fixture(scope="session")
def tiny_folder(
    tmp_path_factory: pytest.TempPathFactory, built_tokenizer: Path, tiny_model: Callable[..., Any]
) -> Callable[..., Path]:
    """``tiny_folder(img_size=56, max_length=160, seed=0)``: a saved tiny model folder, built once per argument set.

    The folder is what ``xcft init-model`` writes (weights, config, self-contained code, the built
    tokenizer). Partial-LoRA dropout is 0: multi-process runs draw dropout masks per rank, so their
    losses would only match a 1-process run approximately (LoRA dropout still exercises RNG state).
    Treat the folders as read-only; copy one before changing it.
    """
    from xcft.model.loading import save_pretrained
    from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

    built: dict[tuple[int, int, int], Path] = {}

    def make(img_size: int = TINY_IMG_SIZE, max_length: int = TINY_MAX_LENGTH, seed: int = 0) -> Path:
        key = (img_size, max_length, seed)
        if key not in built:
            model = tiny_model(img_size=img_size, seed=seed, max_length=max_length)
            tokenizer = InternLM2Tokenizer.from_model_file(built_tokenizer)
            out = tmp_path_factory.mktemp("tiny-model") / f"tiny-{img_size}-{max_length}-{seed}"
            built[key] = save_pretrained(model, tokenizer, out)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_base(tiny_folder: Callable[..., Path]) -> Path:
    """The default tiny model folder (img_size 56, max_length 160, 1000-piece tokenizer)."""
    return tiny_folder()


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int], mark: tuple[int, int, int]) -> str:
    """A plain picture with a filled rectangle: different colours and aspect ratios, saved by PIL."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, colour)
    w, h = size
    ImageDraw.Draw(img).rectangle([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=mark)
    img.save(path)
    return f"data/images/{path.name}"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``data.txt`` of a small mixture in the official layout, like the official examples.

    Three JSON files under ``data/`` (text only: 2 samples drawn 20 times; one image per sample:
    2 drawn 10 times; two images per sample: 2 drawn 10 times) = 40 samples per epoch, images in
    ``data/images/`` referenced relative to the data.txt folder. Some answers are longer than 160 tokens, so the
    tiny folder's max_length truncates them.
    """
    root = tmp_path_factory.mktemp("tiny-data")
    images = root / "data" / "images"
    images.mkdir(parents=True)
    red = _image(images / "red.png", (200, 30, 30), (64, 48), (250, 250, 250))
    blue = _image(images / "blue.jpg", (30, 30, 200), (40, 80), (0, 0, 0))
    green = _image(images / "green.png", (30, 180, 30), (90, 90), (250, 250, 0))
    grey = _image(images / "grey.jpeg", (120, 120, 120), (120, 60), (255, 0, 255))
    long_answer = " ".join(["The sun rises in the east and the river moves slowly to the sea."] * 12)

    def turn(user: str, answer: str) -> list[dict[str, str]]:
        return [{"from": "human", "value": user}, {"from": "bot", "value": answer}]

    files = {
        "text.json": [
            {"id": 0, "conversations": turn("Can you describe a long day by the river?", long_answer)},
            {
                "id": 1,
                "conversations": turn("What is two plus three?", "Two plus three is five.")
                + turn("And three plus four?", "Seven."),
            },
        ],
        "single.json": [
            {"id": 0, "image": [red], "conversations": turn("<ImageHere>What colour is the picture?", "It is red.")},
            {"id": 1, "image": [blue], "conversations": turn("Describe this image. <ImageHere>", long_answer)},
        ],
        "multi.json": [
            {
                "id": 0,
                "image": [green, grey],
                "conversations": turn(
                    "Image1: <ImageHere>; Image2: <ImageHere>. Are they the same colour?", "No, green and grey."
                )
                + turn("Which one is larger?", "The first one."),
            },
            {
                "id": 1,
                "image": [grey, red],
                "conversations": turn(
                    "Image1: <ImageHere>; Image2: <ImageHere>. What do you see?", "A grey picture and a red one."
                ),
            },
        ],
    }
    for name, samples in files.items():
        (root / "data" / name).write_text(json.dumps(samples, indent=1), encoding="utf-8")
    txt = root / "data.txt"
    txt.write_text("data/text.json 0.02\ndata/single.json 0.01\ndata/multi.json 0.01\n", encoding="utf-8")
    return txt


@pytest.fixture(scope="session")
def noise_image() -> Callable[[Path, tuple[int, int], int], str]:
    """``noise_image(path, (width, height), seed)``: save an RGB noise picture, return its path (a string)."""
    import numpy as np
    from PIL import Image

    def make(path: Path, size: tuple[int, int], seed: int) -> str:
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(path)
        return str(path)

    return make


@pytest.fixture(scope="session")
def tiny25_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``xcft init-model --preset tiny-2.5``: an InternLM-XComposer-2.5 folder, 224 px views, a built tokenizer."""
    from xcft.cli import main

    out = tmp_path_factory.mktemp("tiny25") / "tiny25"
    assert main(["init-model", str(out), "--preset", "tiny-2.5", "--seed", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def hd_data(tmp_path_factory: pytest.TempPathFactory, noise_image: Callable[..., str]) -> Path:
    """2.5 training data: one-image (no placeholder), two-image (Image1/Image2) and text-only samples, varied image sizes."""
    root = tmp_path_factory.mktemp("hd-data")
    wide = noise_image(root / "wide.png", (300, 200), 0)  # 2x2 at hd 4 with 224 px views
    small = noise_image(root / "small.png", (100, 60), 1)  # 1x1
    tall = noise_image(root / "tall.png", (90, 400), 2)  # tall: columns along the height

    def qa(q: str, a: str) -> list[dict[str, str]]:
        return [{"from": "user", "value": q}, {"from": "assistant", "value": a}]

    samples = [
        {"id": "one", "image": wide, "conversations": qa("What is in the picture?", "Coloured noise.")},
        {
            "id": "two",
            "image": [small, tall],
            "conversations": qa("Image1 <ImageHere>; Image2 <ImageHere>; Which is taller?", "Image2."),
        },
        {"id": "text", "conversations": qa("Say hello.", "Hello there.")},
        {"id": "three", "image": [tall], "conversations": qa("<ImageHere> Is it tall?", "Yes, it is tall.")},
    ]
    path = root / "data.json"
    path.write_text(json.dumps(samples))
    return path


@pytest.fixture(scope="session")
def random_item() -> Callable[..., dict]:
    """``random_item(model, gen, n_text=12, images=1, prompt_divisor=2)``: a random item in the batch contract.

    BOS and text, then per image a block of slots followed by text; the first 1/prompt_divisor of
    the positions is prompt (no labels), image slots never have labels (docs/ARCHITECTURE.md).
    """
    import torch

    def make(model, gen: torch.Generator, n_text: int = 12, images: int = 1, prompt_divisor: int = 2) -> dict:
        slots = model.image_tokens
        high = min(290, model.config.vocab_size)
        ids = [1, *torch.randint(3, high, (n_text,), generator=gen).tolist()]
        mask = [False] * len(ids)
        for _ in range(images):
            ids += [2] * slots
            mask += [True] * slots
            more = torch.randint(3, high, (n_text,), generator=gen).tolist()
            ids += more
            mask += [False] * len(more)
        ids_t = torch.tensor(ids)
        labels = ids_t.clone()
        labels[: len(ids) // prompt_divisor] = -100
        labels[torch.tensor(mask)] = -100
        size = model.config.img_size
        return {
            "input_ids": ids_t,
            "labels": labels,
            "image_mask": torch.tensor(mask),
            "pixel_values": torch.randn(images, 3, size, size, generator=gen),
        }

    return make


# ---------------------------------------------------------------------- child processes, run outputs


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for child processes: one thread, offline, shared DeepSpeed op cache, src on the path."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "xcft" / "torch_extensions")),
        PYTHONPATH=str(PROJECT_ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(scope="session")
def run_fresh_python(subprocess_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """``run_fresh_python(code)``: run code in a fresh interpreter whose path does NOT include xcft's sources."""
    import subprocess

    cwd = tmp_path_factory.mktemp("fresh-python")

    def run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
        env = dict(subprocess_env, PYTHONPATH="", HF_MODULES_CACHE=str(cwd / "hf_modules"))
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)

    return run


_AUTOPEFT_VS_MERGED = """
import json, sys, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM
adapter, merged = sys.argv[1], sys.argv[2]
a = AutoPeftModelForCausalLM.from_pretrained(adapter, device_map="auto", trust_remote_code=True).eval()
m = AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True).eval()
b = AutoModelForCausalLM.from_pretrained(a.peft_config["default"].base_model_name_or_path, trust_remote_code=True).eval()
ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
with torch.no_grad():
    la, lm, lb = a(input_ids=ids).logits, m(input_ids=ids).logits, b(input_ids=ids).logits
print("RESULT", json.dumps({
    "to_merged": (la - lm).abs().max().item(),
    "to_base": (la - lb).abs().max().item(),
    "quantized": any("bitsandbytes" in type(mod).__module__ for mod in a.modules()),
    "xcft_imported": any(k == "xcft" or k.startswith("xcft.") for k in sys.modules),
}))
"""


@pytest.fixture(scope="session")
def autopeft_vs_merged(subprocess_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """``autopeft_vs_merged(adapter, merged)``: the seed's AutoPeftModelForCausalLM snippet in a fresh process
    without xcft, against the merged folder and the base: max |logit| differences and what was imported."""
    import json
    import subprocess

    cwd = tmp_path_factory.mktemp("autopeft")

    def check(adapter: Path, merged: Path) -> dict:
        env = dict(subprocess_env, PYTHONPATH="", HF_MODULES_CACHE=str(cwd / "hf_modules"))
        args = [sys.executable, "-c", _AUTOPEFT_VS_MERGED, str(adapter), str(merged)]
        r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.split("RESULT", 1)[1])

    return check


@pytest.fixture(scope="session")
def read_losses() -> Callable[[Path], dict[int, float]]:
    """``read_losses(output_dir)``: step -> logged training loss, from the trainer_state.json a run left."""

    from xcft.run_files import TRAINER_STATE_NAME

    def read(output_dir: Path) -> dict[int, float]:
        state = json.loads((Path(output_dir) / TRAINER_STATE_NAME).read_text())
        return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}

    return read


@pytest.fixture(scope="session")
def torchrun() -> Callable[..., list[str]]:
    """``torchrun(*args, nproc=2)``: the command line of ``xcft ARGS`` under torch.distributed.run on a free local port."""
    import socket

    def command(*args: str, nproc: int = 2) -> list[str]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(port),
            "-m",
            "xcft.cli",
            *args,
        ]

    return command


@pytest.fixture
def wait_status() -> Callable[..., Any]:
    """``wait_status(runs, run_id, until, timeout=60)``: poll a web run manager's status until ``until(status)``."""
    import time

    def wait(runs: Any, run_id: str, until: Callable[[Any], bool], timeout: float = 60) -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = runs.status(run_id)
            if until(st):
                return st
            time.sleep(0.05)
        raise AssertionError(f"run {run_id} stayed {st.state}: {st.message}\n{runs.log_tail(run_id)}")

    return wait

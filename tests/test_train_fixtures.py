"""Shared helpers for the tests/test_train_*.py files: a tiny base model folder and small data sets.

Built once per pytest process (cached on disk under the pytest temp root). Holds no tests itself.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
EXAMPLES = SHARED / "assets" / "official-examples"
IMG_SIZE = 56  # 4 x 4 patches -> 16 slots per image: fast on CPU
MAX_LENGTH = 160


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: one thread, offline, shared DeepSpeed op cache, src on the path."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "xcft" / "torch_extensions")
        ),
        PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""),
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


@functools.lru_cache(maxsize=None)
def workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="xcft-train-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def tiny_base() -> Path:
    """A self-contained tiny model folder (img_size 56, 1000-token tokenizer, max_length 160)."""
    from xcft.data.spm_builder import build_tokenizer
    from xcft.model.loading import save_pretrained
    from xcft.model.presets import build_model
    from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

    root = workdir()
    tok = build_tokenizer(root / "tok", vocab_size=1000)
    # No Partial-LoRA dropout: multi-process runs draw dropout masks per rank, so their losses would
    # only match a 1-process run approximately. (LoRA dropout still exercises RNG state on resume.)
    model = build_model("tiny", img_size=IMG_SIZE, vocab_size=1000, seed=0, max_length=MAX_LENGTH, plora_dropout=0.0)
    tokenizer = InternLM2Tokenizer.from_model_file(tok)
    return save_pretrained(model, tokenizer, root / "base")


@functools.lru_cache(maxsize=None)
def small_fixed_data() -> Path:
    """Four short samples (two with an example image) in one JSON file: a set a tiny model can fit."""
    root = workdir() / "fixed"
    root.mkdir(parents=True, exist_ok=True)
    images = EXAMPLES / "data" / "images"
    samples = [
        {"id": "a", "image": [str(images / "panda.jpeg")],
         "conversations": [{"from": "user", "value": "<ImageHere>What animal is this?"},
                           {"from": "assistant", "value": "A panda."}]},
        {"id": "b", "conversations": [{"from": "user", "value": "Say hello."},
                                      {"from": "assistant", "value": "Hello there, friend."}]},
        {"id": "c", "image": [str(images / "Bk1GhqA1RhyCKaOWwxKT_1.jpg")],
         "conversations": [{"from": "user", "value": "<ImageHere>Is this a poster?"},
                           {"from": "assistant", "value": "Yes, a film poster."}]},
        {"id": "d", "conversations": [{"from": "user", "value": "Count to three."},
                                      {"from": "assistant", "value": "One, two, three."}]},
    ]
    path = root / "fixed.json"
    path.write_text(json.dumps(samples))
    return path


def read_losses(output_dir: Path) -> dict[int, float]:
    """step -> logged training loss, from the trainer_state.json the run left."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def run_fresh_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose path does NOT include xcft's sources."""
    env = subprocess_env()
    env["PYTHONPATH"] = ""
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir())


def copytree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst

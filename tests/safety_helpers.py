"""Helpers for the safety tests: a tiny model folder and data built on the spot, the CLI in a subprocess,
hashes of the user's files. Holds no tests itself."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG_SIZE = 56  # 16 slots per image: fast on a CPU


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def xcft(
    *args: object, cwd: Path | None = None, timeout: int = 300, prefix: list[str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m xcft ARGS`` in a fresh process (``prefix`` runs it under another program, e.g. unshare)."""
    cmd = [*(prefix or []), sys.executable, "-m", "xcft", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=cwd)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line of a failed command; asserts exit 1 and no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file and folder under ``folders`` -> sha256 of its bytes ("dir" for folders)."""
    out: dict[str, str] = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_dir():
                out[str(path)] = "dir"
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[str(path)] = "special"
        out[str(folder)] = "dir"
    return out


def build_base(folder: Path, *, vocab_size: int = 1000, img_size: int = IMG_SIZE, **overrides) -> Path:
    """A tiny self-contained model folder written by xcft's own builders."""
    from xcft.data.spm_builder import build_tokenizer
    from xcft.model.loading import save_pretrained
    from xcft.model.presets import build_model
    from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

    tok = InternLM2Tokenizer.from_model_file(build_tokenizer(folder.parent / f"{folder.name}-tok", vocab_size=1000))
    model = build_model("tiny", img_size=img_size, vocab_size=vocab_size, seed=0, max_length=160, plora_dropout=0.0, **overrides)
    return save_pretrained(model, tok, folder)


def build_data(folder: Path, n: int = 4) -> Path:
    """``n`` one-image samples (PIL images) in one JSON file; returns the file."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    colours = [(200, 20, 20), (20, 200, 20), (20, 20, 200), (200, 200, 20)]
    samples = []
    for i in range(n):
        Image.new("RGB", (40, 30), colours[i % 4]).save(folder / f"img{i}.png")
        samples.append(
            {
                "id": f"s{i}",
                "image": f"img{i}.png",
                "conversations": [
                    {"from": "user", "value": "<ImageHere>What colour is this?"},
                    {"from": "assistant", "value": ["Red.", "Green.", "Blue.", "Yellow."][i % 4]},
                ],
            }
        )
    path = folder / "train.json"
    path.write_text(json.dumps(samples))
    return path


TRAIN_FLAGS = [
    "--use_lora",
    "true",
    "--lora_r",
    "4",
    "--lora_alpha",
    "8",
    "--per_device_train_batch_size",
    "2",
    "--use_cpu",
    "true",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--seed",
    "1",
    "--dataloader_num_workers",
    "0",
]


def train_args(base: Path, data: Path, out: Path, *extra: object) -> list[str]:
    return [
        "train",
        "--model_name_or_path",
        str(base),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        *TRAIN_FLAGS,
        *map(str, extra),
    ]

"""``xcft bench train`` / ``xcft bench data`` and the GPU check script, on tiny inputs (CPU, seconds).

Benchmarks print figures; these tests check that the figures are there and consistent (token and
sample counts, padding), never how fast anything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xcft.cli import main

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"seconds_per_step", "samples_per_s", "tokens_per_s", "padding_fraction", "peak_rss_bytes", "calibration_gflops"}
QUICK = ["--steps", "1", "--warmup", "1"]


def run_json(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def test_bench_train_synthetic_json(capsys, monkeypatch):
    monkeypatch.setattr("xcft.commands.bench.train.calibration_gflops", lambda *a, **k: 100.0)
    r = run_json(
        capsys, ["bench", "train", "--preset", "tiny", "--synthetic", "300", "--batch-size", "2", *QUICK, "--format", "json"]
    )
    assert r.keys() >= REQUIRED
    assert r["samples_per_step"] == 2 and r["tokens_per_step"] == 600
    assert r["padding_fraction"] == 0.0
    assert r["seconds_per_step"] > 0 and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0
    assert r["calibration_gflops"] == 100.0 and r["supervised_head"] is True
    assert r["model_flops_per_step"] > 0 and "mfu" not in r  # CPU: no MFU
    assert r["cpu_reuse_memory"] is True  # xcft train's CPU default


def test_bench_train_packing_counts_samples_not_rows(capsys, monkeypatch):
    monkeypatch.setattr("xcft.commands.bench.train.calibration_gflops", lambda *a, **k: 100.0)
    r = run_json(
        capsys,
        [
            "bench",
            "train",
            "--preset",
            "tiny",
            "--synthetic",
            "300",
            "--packing",
            "--max-length",
            "900",
            "--no-cpu-reuse-memory",
            *QUICK,
            "--format",
            "json",
        ],
    )
    assert r["cpu_reuse_memory"] is False
    # one row of 900 positions per step holds three 300-token samples, no padding
    assert r["samples_per_step"] == 3 and r["tokens_per_step"] == 900 and r["padding_fraction"] == 0.0


def test_bench_train_real_data_text_output(capsys, monkeypatch, fixture_dir, examples_dir):
    """The xcft train path on a real model folder and the official examples (text samples, batch 2)."""
    monkeypatch.setattr("xcft.commands.bench.train.calibration_gflops", lambda *a, **k: 100.0)
    assert (
        main(
            [
                "bench",
                "train",
                "--model",
                str(fixture_dir),
                "--data",
                str(examples_dir / "data.txt"),
                "--source",
                "only_text",
                "--batch-size",
                "2",
                *QUICK,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for label in ("seconds/step", "samples/s", "tokens/s", "padding fraction", "peak RSS", "calibration"):
        assert label in out
    assert "2.0 samples/step" in out
    # the two text samples are 533 and 512 tokens: 21 padding positions of 1066
    assert "padding fraction  0.0197" in out


def test_bench_train_model_folder_and_data_text_output(capsys, monkeypatch, tiny_base, tiny_data, tok):
    """The same path on a tiny folder and a mixture built in tmp: padding from the two text samples' lengths."""
    from xcft.data import build_dataset

    monkeypatch.setattr("xcft.commands.bench.train.calibration_gflops", lambda *a, **k: 100.0)
    assert (
        main(
            [
                "bench",
                "train",
                "--model",
                str(tiny_base),
                "--data",
                str(tiny_data),
                "--source",
                "text",
                "--batch-size",
                "2",
                *QUICK,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for label in ("seconds/step", "samples/s", "tokens/s", "padding fraction", "peak RSS", "calibration"):
        assert label in out
    assert "2.0 samples/step" in out
    lengths = build_dataset(tiny_data.parent / "data" / "text.json", tok, 56, 160).lengths
    assert len(lengths) == 2 and min(lengths) < max(lengths) == 160
    assert f"padding fraction  {1 - sum(lengths) / (2 * max(lengths)):.4f}" in out


def test_bench_train_rejects_bad_options(capsys):
    assert main(["bench", "train", "--preset", "tiny", "--data", "x.json"]) == 1
    assert "--synthetic" in capsys.readouterr().err


def test_bench_data_json_and_photo(capsys, monkeypatch, tiny_data):
    import xcft.commands.bench.data as bd

    monkeypatch.setattr(bd, "calibration_gflops", lambda *a, **k: 100.0)
    real = bd.images_per_second
    monkeypatch.setattr(bd, "images_per_second", lambda *a, **k: real(*a, **{**k, "min_seconds": 0.05, "min_images": 3}))
    r = run_json(
        capsys, ["bench", "data", "--data", str(tiny_data), "--img-size", "224", "--photo", "1600x1200", "--format", "json"]
    )
    assert r["images_per_s"] > 0 and r["distinct_images"] == 4 and r["calibration_gflops"] == 100.0
    ph = r["photo"]
    assert ph["exact_images_per_s"] > 0 and ph["fast_jpeg_images_per_s"] > 0
    assert 0 < ph["mean_abs_diff"] < 0.05  # fast JPEG: close, but not bit-exact


def test_lookup_normalisation_is_bit_equal():
    from xcft.model.image_processing_xcomposer2 import normalize, normalize_reference

    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgb[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]
    assert normalize(rgb).tobytes() == normalize_reference(rgb).tobytes()


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu_with_the_tiny_preset(tmp_path):
    """benchmarks/gpu_check.sh end to end with XCFT_GPU_CHECK_PRESET=tiny: four configurations, then the two
    QLoRA memory lines (tiny and tiny-2.5 stand in for 7b and 7b-2.5), no failure."""
    env = {
        **os.environ,
        "XCFT_GPU_CHECK_PRESET": "tiny",
        "XCFT_GPU_CHECK_LENGTH": "600",
        "XCFT_GPU_CHECK_STEPS": "1",
        "XCFT_GPU_CHECK_JSON": str(tmp_path / "r.json"),
        "XCFT_GPU_CHECK_JSONL": str(tmp_path / "m.jsonl"),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)  # the script must find src/ itself
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--warmup", "1", "--calibration-seconds", "0.02"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("ac-unpacked", "ac-packed", "noac-unpacked", "noac-packed"):
        assert name in proc.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    results = {r["config"]: r for r in data["results"]}
    assert not any("error" in r for r in results.values())
    assert results["ac-unpacked"]["activation_checkpointing_active"] is True
    assert results["noac-packed"]["activation_checkpointing_active"] is False
    assert results["ac-packed"]["samples_per_step"] == 2 and results["ac-unpacked"]["samples_per_step"] == 1
    assert all(r["use_lora"] and r["tokens_per_step"] == 600 for r in results.values())
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["preset"], r["mode"], r["bits"], r["hd_num"]) for r in lines] == [
        ("tiny", "qlora", 4, None),
        ("tiny-2.5", "qlora", 4, 4),
    ]
    assert lines[1]["image_grid"] == [4, 1] and all("error" not in r and r["seconds_per_step"] > 0 for r in lines)


def test_cpu_check_script_is_valid_and_names_only_known_runs():
    """benchmarks/cpu_check.sh (the CPU figures of RESULTS.md): bash syntax, every default run defined."""
    import re
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    defined = set(re.findall(r"^  \[([a-z0-9-]+)\]=", text, flags=re.M))
    order = re.search(r'ORDER="\$\{XCFT_CPU_CHECK_RUNS:-([^}]*)\}"', text).group(1).split()
    assert order and set(order) <= defined, set(order) - defined

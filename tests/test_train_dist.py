"""Multi-process training on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3 with torchrun --nproc_per_node 2.

Each run's logged losses must equal a 1-process run with the same global batch (no world-size
scaling of the loss), and its output must load. DeepSpeed compiles its CPU communication op on
first use (~100 s, cached in .cache/torch_extensions).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from xcft.commands.train import train_command

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

RUN = ["--seed", "11", "--max_steps", "3", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def runs(tiny_base, tiny_data, subprocess_env, read_losses, torchrun, train_argv):
    """``runs.torchrun(out, *flags)`` (2 processes, batch 1 each) and ``runs.single(out, *flags)`` (1 process,
    batch 2: the same global batch, returns its losses), both on the tiny folder and mixture."""

    def argv(out, *extra):
        return train_argv(tiny_base, tiny_data, out, *RUN, *extra)

    def distributed(out, *extra, timeout=600):
        cmd = [
            *torchrun(),
            "train",
            *argv(out, "--per_device_train_batch_size", "1", *extra),
        ]
        r = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
        return r

    def single(out, *extra):
        assert train_command(argv(out, "--per_device_train_batch_size", "2", *extra)) == 0
        return read_losses(out)

    return SimpleNamespace(torchrun=distributed, single=single)


def _assert_same_losses(got, expected, rel):
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=rel), (step, got, expected)


def test_ddp_two_processes_equal_one_process(runs, read_losses, tmp_path):
    out, cache = tmp_path / "ddp", tmp_path / "cache"
    r = runs.torchrun(
        out, "--ddp_backend", "gloo", "--save_strategy", "no", "--fix_sampler", "false", "--data_cache_dir", str(cache)
    )
    # one rank builds each file's entry while the other waits, then both map it
    entries = [e for e in cache.iterdir() if e.is_dir()]
    assert len(entries) == 3 and r.stderr.count(", stored as ") == 3, r.stderr[-3000:]
    expected = runs.single(tmp_path / "ddp_ref", "--save_strategy", "no", "--fix_sampler", "false")
    _assert_same_losses(read_losses(out), expected, rel=1e-5)
    assert (out / "model.safetensors").is_file() and (out / "modeling_xcomposer2.py").is_file()


def test_deepspeed_zero2_lora_two_processes(runs, read_losses, tiny_base, tmp_path):
    pytest.importorskip("deepspeed")
    import xcft

    out = tmp_path / "z2"
    # fix_sampler false: the projector is trained inside the adapter; text-only and image batches
    # meet on the two ranks, which needs the vision-aligned batches.
    args = ["--use_lora", "--lora_r", "4", "--lora_dropout", "0", "--fix_sampler", "false", "--save_steps", "2"]
    runs.torchrun(out, "--deepspeed", str(ROOT / "configs" / "ds_zero2.json"), *args)
    expected = runs.single(tmp_path / "z2_ref", *args)
    _assert_same_losses(read_losses(out), expected, rel=1e-4)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(tiny_base.resolve())
    ckpt = out / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file()
    # no full model weights in an intermediate LoRA checkpoint (DeepSpeed states exclude frozen weights)
    base_bytes = (tiny_base / "model.safetensors").stat().st_size
    assert not list(ckpt.glob("model*.safetensors"))
    assert all(p.stat().st_size < base_bytes / 2 for p in ckpt.rglob("*") if p.is_file())
    model, _ = xcft.load_pretrained(str(out), dtype=torch.float32, device="cpu")
    assert model(input_ids=torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 1000)


def test_deepspeed_zero3_full_two_processes_saves_consolidated_weights(runs, read_losses, tiny_base, tmp_path):
    pytest.importorskip("deepspeed")
    import xcft

    out = tmp_path / "z3"
    args = ["--fix_vit", "false", "--save_strategy", "no"]
    runs.torchrun(out, "--deepspeed", str(ROOT / "configs" / "ds_zero3.json"), *args)
    expected = runs.single(tmp_path / "z3_ref", *args)
    _assert_same_losses(read_losses(out), expected, rel=1e-4)
    saved = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_base / "model.safetensors"))
    assert saved.keys() == base.keys()
    for k in base:
        assert saved[k].shape == base[k].shape, k  # consolidated, not ZeRO-3 shards
    assert any(not torch.equal(saved[k], base[k]) for k in base if k.startswith("vit."))  # fix_vit false trained it
    model, _ = xcft.load_pretrained(str(out), dtype=torch.float32, device="cpu")
    assert model(input_ids=torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 1000)


# --------------------------------------------------------------------------- InternLM-XComposer-2.5 under ZeRO-3


@pytest.fixture(scope="module")
def tiny25_no_dropout(tmp_path_factory, tiny25_base: Path, tiny_model) -> Path:
    """tiny-2.5 without Partial-LoRA dropout, so several ranks reproduce a one-process run exactly."""
    from xcft.model.loading import load_tokenizer, save_pretrained

    model = tiny_model("tiny-2.5", seed=1)
    return save_pretrained(model, load_tokenizer(tiny25_base), tmp_path_factory.mktemp("tiny25") / "tiny25_nodrop")


@pytest.mark.slow
def test_zero3_two_processes_with_text_only_ranks_equals_one_process(
    hd_data, tiny25_no_dropout, tmp_path, read_losses, subprocess_env, torchrun, train_argv
):
    """ZeRO-3 gathers the tower's shards on every rank: a rank whose batch is text gets a blank 1x1 image."""
    pytest.importorskip("deepspeed")
    import subprocess

    hd_flags = ["--given_num", "false", "--hd_num", "4", "--max_length", "1024", "--max_steps", "3", "--learning_rate", "1e-3"]
    hd_flags += ["--fix_vit", "false", "--save_strategy", "no"]
    out, ref = tmp_path / "z3_25", tmp_path / "z3_25_ref"
    cmd = [
        *torchrun(),
        "train",
        *train_argv(tiny25_no_dropout, hd_data, out, *hd_flags, "--per_device_train_batch_size", "1"),
        "--deepspeed",
        str(ROOT / "configs" / "ds_zero3.json"),
    ]
    r = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=900, cwd=str(ROOT))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    assert "one blank image" in r.stderr + r.stdout
    assert train_command(train_argv(tiny25_no_dropout, hd_data, ref, *hd_flags, "--per_device_train_batch_size", "2")) == 0
    got, expected = read_losses(out), read_losses(ref)
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)

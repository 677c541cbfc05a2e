"""FSDP wrapping of our layers (torch fully_shard on CPU, as configs/fsdp.json names them) and xcft chat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FSDP_SCRIPT = r"""
import json, os, sys, tempfile
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from xcft.model.loading import load_pretrained

base, config_path = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
wrap = set(json.load(open(config_path))["transformer_layer_cls_to_wrap"])

def batch():
    torch.manual_seed(0)
    ids = torch.randint(3, 900, (2, 40))
    image_mask = torch.zeros(2, 40, dtype=torch.bool)
    image_mask[0, 5:21] = True          # one 56-px image = 16 slots
    ids[image_mask] = 2
    labels = ids.clone(); labels[image_mask] = -100; labels[:, :3] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, image_mask=image_mask,
                pixel_values=torch.randn(1, 3, 56, 56), image_counts=torch.tensor([1, 0]))

ref, _ = load_pretrained(base, dtype=torch.float32, device="cpu")
ref.train().requires_grad_(True)
ref.vit.clip.post_layernorm.requires_grad_(False)
loss_ref = ref(**batch()).loss
loss_ref.backward()
grads_ref = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}

model, _ = load_pretrained(base, dtype=torch.float32, device="cpu")
model.train().requires_grad_(True)
model.vit.clip.post_layernorm.requires_grad_(False)
units = [m for m in model.modules() if type(m).__name__ in wrap]
kinds = sorted({type(m).__name__ for m in units})
for m in units:
    fully_shard(m)
fully_shard(model)
loss = model(**batch()).loss
loss.backward()
worst = 0.0
for n, p in model.named_parameters():
    if n in grads_ref:
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        worst = max(worst, (g - grads_ref[n]).abs().max().item())
print("RESULT", json.dumps({"units": len(units), "kinds": kinds, "loss": loss.item(), "loss_ref": loss_ref.item(), "grad_diff": worst}))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fully_shard_wraps_decoder_and_clip_layers_and_matches_unsharded(tmp_path, tiny_base, subprocess_env):
    script = tmp_path / "fsdp_check.py"
    script.write_text(FSDP_SCRIPT)
    r = subprocess.run(
        [sys.executable, str(script), str(tiny_base), str(ROOT / "configs" / "fsdp.json")],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    assert res["kinds"] == ["CLIPEncoderLayer", "XComposer2DecoderLayer"]
    assert res["units"] == 2 + 2  # tiny preset: 2 decoder layers, 2 CLIP layers
    assert res["loss"] == pytest.approx(res["loss_ref"], rel=1e-6)
    assert res["grad_diff"] < 1e-5


@pytest.fixture(scope="module")
def picture(tiny_data):
    return tiny_data.parent / "data" / "images" / "blue.jpg"


def test_chat_one_query_with_image(picture, tiny_base, capsys):
    from xcft.commands.chat import chat_command

    assert (
        chat_command(
            model_dir=str(tiny_base),
            images=[str(picture)],
            query="What is this?",
            max_new_tokens=5,
            system=None,
            device="cpu",
            greedy=True,
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.endswith("\n")


def test_chat_query_placeholder_count_mismatch_is_an_error(picture, tiny_base):
    from xcft.commands.chat import chat_command
    from xcft.errors import XcftError

    with pytest.raises(XcftError, match="placeholder"):
        chat_command(
            model_dir=str(tiny_base),
            images=[str(picture)],
            query="<ImageHere><ImageHere>two?",
            max_new_tokens=2,
            system="",
            device="cpu",
            greedy=True,
        )
    with pytest.raises(XcftError, match="not found"):
        chat_command(
            model_dir=str(tiny_base), images=["/no/such.jpg"], query="x", max_new_tokens=2, system=None, device="cpu", greedy=True
        )


def test_chat_interactive_keeps_history_and_streams(picture, tiny_base, monkeypatch, capsys):
    from xcft.commands.chat import chat_command
    from xcft.model.modeling_xcomposer2 import XComposer2ForCausalLM

    seen = []
    original = XComposer2ForCausalLM.chat

    def spy(self, tokenizer, query, images=None, history=None, **kw):
        seen.append((query, list(history or []), kw.get("streamer") is not None, len(images or [])))
        return original(self, tokenizer, query, images=images, history=history, **kw)

    monkeypatch.setattr(XComposer2ForCausalLM, "chat", spy)
    answers = iter(["Describe it.", "And the colours?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert (
        chat_command(
            model_dir=str(tiny_base), images=[str(picture)], query=None, max_new_tokens=4, system=None, device="cpu", greedy=True
        )
        == 0
    )
    assert len(seen) == 2
    first, second = seen
    assert first[0] == "Describe it." and first[1] == [] and first[2] and first[3] == 1
    assert second[0] == "And the colours?" and second[1][0][0] == "<ImageHere>Describe it." and second[2]
    assert "assistant> " in capsys.readouterr().out


@pytest.mark.slow
def test_chat_cli_on_lora_adapter(tmp_path, tiny_base, tiny_data, subprocess_env, train_argv):
    """`xcft chat --model ADAPTER --query` in a real process (the CLI wiring, adapter loading)."""
    from xcft.commands.train import train_command

    out = tmp_path / "lora"
    argv = train_argv(tiny_base, tiny_data, out, "--max_steps", "1", "--use_lora", "--lora_r", "2", "--save_strategy", "no")
    assert train_command(argv) == 0
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "xcft.cli",
            "chat",
            "--model",
            str(out),
            "--query",
            "Hi",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        ],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.endswith("\n")

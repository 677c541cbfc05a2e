"""Loading and saving: configs, weight formats, position-table resizing, self-contained folders.

Everything runs on a tiny model folder saved by xcft (490-px images, 1000-piece tokenizer); only
reading the official config and converting the official checkpoint use ../shared.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

PROMPT = [1, 150, 67, 328, 202]
POS_KEY = "vit.vision_tower.vision_model.embeddings.position_embedding.weight"


@pytest.fixture(scope="module")
def model_dir(tiny_folder) -> Path:
    """A tiny folder at 490 px: the 35 x 35 patch grid of the released model."""
    return tiny_folder(img_size=490, max_length=4096)


@pytest.fixture(scope="module")
def loaded(model_dir: Path):
    from xcft.model.loading import load_pretrained

    return load_pretrained(model_dir, dtype="float32", device="cpu")


def logits_of(model, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def copy_config_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "vision_config.json", "tokenizer.model"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


# ------------------------------------------------------------------ config


def test_official_config_is_read(fixture_dir, caplog):
    from xcft.model.configuration_xcomposer2 import XComposer2Config

    cfg = XComposer2Config.from_pretrained(fixture_dir)
    assert cfg.model_type == "xcomposer2" and cfg.hidden_size == 32 and cfg.num_key_value_heads == 2
    assert cfg.rope_parameters["rope_theta"] == 1000000
    assert cfg.vision_config.hidden_size == 48  # from vision_config.json
    assert cfg.vision_config.image_size == 490 and cfg.image_tokens == 1225
    assert cfg.max_length == 4096 and cfg.plora_r == 256
    assert not getattr(cfg, "auto_map", None)  # official remote-code map dropped


def test_vision_config_precedence_and_defaults(model_dir, tmp_path, caplog):
    from xcft.model.configuration_xcomposer2 import XComposer2Config

    raw = json.loads((model_dir / "config.json").read_text())
    vision = raw.pop("vision_config")
    raw.pop("auto_map")
    # 1. no vision_config anywhere -> CLIP ViT-L/14-336; no max_length -> our default, logged
    d1 = tmp_path / "plain"
    d1.mkdir()
    (d1 / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "max_length"}))
    with caplog.at_level("INFO"):
        cfg = XComposer2Config.from_pretrained(d1)
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers, cfg.vision_config.patch_size) == (1024, 24, 14)
    assert cfg.vision_config.hidden_act == "quick_gelu"
    assert cfg.max_length == 4096 and "max_length" in caplog.text
    # 2. a vision_config.json next to a config.json without one is read (the official layout)
    d2 = tmp_path / "file"
    d2.mkdir()
    (d2 / "config.json").write_text(json.dumps(raw))
    (d2 / "vision_config.json").write_text(json.dumps(vision))
    assert XComposer2Config.from_pretrained(d2).vision_config.hidden_size == vision["hidden_size"] == 32
    # 3. vision_config inside config.json wins over vision_config.json
    (d2 / "config.json").write_text(json.dumps(dict(raw, vision_config=dict(vision, hidden_size=64))))
    assert XComposer2Config.from_pretrained(d2).vision_config.hidden_size == 64


def test_not_an_xcomposer_config_is_a_user_error(tmp_path):
    from xcft.errors import XcftError
    from xcft.model.loading import load_pretrained

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(XcftError, match="not an InternLM-XComposer2 model"):
        load_pretrained(tmp_path, device="cpu")


# ------------------------------------------------------------------ weights


def test_sharded_bin_loads_like_safetensors(model_dir, loaded, tmp_path):
    """A .bin checkpoint split over two shards with an index (read with weights_only=True)."""
    from safetensors.torch import load_file

    from xcft.model.loading import load_pretrained

    state = load_file(str(model_dir / "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    shards = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    out = tmp_path / "bin"
    copy_config_files(model_dir, out)
    weight_map = {}
    for fname, keys in shards.items():
        torch.save({k: state[k] for k in keys}, out / fname)
        weight_map.update({k: fname for k in keys})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model, tok = load_pretrained(out, dtype="float32", device="cpu")
    assert torch.equal(logits_of(model), logits_of(loaded[0]))
    assert tok.vocab_size == 1000


def test_missing_or_unexpected_tensors_are_reported(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from xcft.errors import XcftError
    from xcft.model.loading import load_pretrained

    state = load_file(str(model_dir / "model.safetensors"))
    state.pop("model.norm.weight")
    state["model.extra.weight"] = torch.zeros(2)
    out = tmp_path / "broken"
    copy_config_files(model_dir, out)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(XcftError, match=r"1 missing tensors \['model.norm.weight'\], 1 unexpected"):
        load_pretrained(out, device="cpu")


def test_plora_rank_is_read_from_the_weights(model_dir, tmp_path):
    """A checkpoint with rank-8 Partial LoRA (config.json says nothing) loads with r = alpha = 8."""
    from safetensors.torch import load_file, save_file

    from xcft.model.loading import load_pretrained

    state = load_file(str(model_dir / "model.safetensors"))
    for k in list(state):
        if k.endswith("Plora_A.weight"):
            state[k] = state[k][:8].clone()
        elif k.endswith("Plora_B.weight"):
            state[k] = state[k][:, :8].clone()
    out = tmp_path / "r8"
    copy_config_files(model_dir, out)
    raw = json.loads((out / "config.json").read_text())
    del raw["plora_r"], raw["plora_alpha"]  # like the official config.json
    (out / "config.json").write_text(json.dumps(raw))
    save_file(state, str(out / "model.safetensors"))
    model, _ = load_pretrained(out, dtype="float32", device="cpu")
    wqkv = model.model.layers[0].attention.wqkv
    assert model.config.plora_r == 8 and wqkv.lora_r == 8 and wqkv.lora_scaling == 1.0
    assert tuple(wqkv.Plora_A.weight.shape) == (8, model.config.hidden_size)


def test_577_row_position_table_is_interpolated(model_dir, tmp_path):
    """A plain CLIP-336 table (24x24 + class row) is bicubically resized to the 35x35 grid; a
    table already at the model's grid loads as is."""
    from safetensors.torch import load_file, save_file

    from xcft.model.loading import load_pretrained, resize_position_table

    state = load_file(str(model_dir / "model.safetensors"))
    dim = state[POS_KEY].shape[1]
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(577, dim, generator=gen).to(torch.bfloat16)
    state[POS_KEY] = table
    out = tmp_path / "clip336"
    copy_config_files(model_dir, out)
    save_file(state, str(out / "model.safetensors"))
    model, _ = load_pretrained(out, dtype="float32", device="cpu")
    got = model.vit.clip.embeddings.position_embedding.weight
    assert tuple(got.shape) == (1226, dim)
    assert model.vit.clip.embeddings.position_ids.shape[-1] == 1226
    # reference: grid rows are row-major (y, x); class row first and untouched
    grid = table[1:].float().reshape(24, 24, dim).permute(2, 0, 1)[None]
    expect = F.interpolate(grid, size=(35, 35), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(-1, dim)
    assert torch.equal(got[0], table[0].float())
    torch.testing.assert_close(got[1:], expect.to(torch.bfloat16).float(), rtol=0, atol=0)
    # corners of a smooth ramp stay at the corners (catches transposed / flattened-wrong grids)
    ramp = torch.zeros(577, 2)
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    ramp[1:, 0], ramp[1:, 1] = yy.flatten(), xx.flatten()
    resized = resize_position_table(ramp, 35)[1:].reshape(35, 35, 2)
    assert resized[0, -1, 1] > 22 and resized[0, -1, 0] < 1 and resized[-1, 0, 0] > 22
    # already-resized tables are left alone, and the model still runs on images
    assert resize_position_table(got, 35) is got
    with torch.no_grad():
        feats = model.vit(torch.zeros(1, 3, 490, 490))
    assert tuple(feats.shape) == (1, 1225, dim)


# ------------------------------------------------------------------ saving


@pytest.mark.slow
def test_save_then_fresh_process_loads_with_trust_remote_code(loaded, tmp_path):
    """save_pretrained -> a Python process without xcft loads the folder through the Auto classes."""
    from xcft.model.loading import SELF_CONTAINED_FILES, load_pretrained, save_pretrained

    model, tok = loaded
    out = save_pretrained(model, tok, tmp_path / "saved")
    files = set(os.listdir(out))
    assert set(SELF_CONTAINED_FILES) <= files and {"config.json", "model.safetensors", "tokenizer.model"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_xcomposer2.XComposer2ForCausalLM"
    assert cfg["architectures"] == ["XComposer2ForCausalLM"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == set(model.state_dict())

    ref = logits_of(model)
    torch.save(ref, tmp_path / "ref.pt")
    # our own loader reads our folder too
    again, _ = load_pretrained(out, dtype="float32", device="cpu")
    assert torch.equal(logits_of(again), ref)

    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
leaked = sorted(k for k in sys.modules if k == "xcft" or k.startswith("xcft."))
assert not leaked, leaked
with torch.no_grad():
    logits = model(input_ids=torch.tensor([{PROMPT}])).logits
ref = torch.load({str(tmp_path / "ref.pt")!r})
assert torch.equal(logits, ref), (logits - ref).abs().max()
assert tok.encode_text("Good morning, world") == {tok.encode_text("Good morning, world")}
print("FRESH_OK", type(model).__name__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "FRESH_OK XComposer2ForCausalLM" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_save_refuses_non_empty_output(loaded, tmp_path):
    from xcft.errors import XcftError
    from xcft.model.loading import save_pretrained

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(XcftError, match="xcft did not write"):
        save_pretrained(*loaded, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_convert_command(model_dir, loaded, tmp_path, capsys):
    """An official-layout folder (config, bf16 weights, tokenizer; no code files) becomes self-contained."""
    from safetensors.torch import load_file, save_file

    from xcft.cli import main
    from xcft.model.loading import SELF_CONTAINED_FILES, load_pretrained

    src = tmp_path / "official"
    src.mkdir()
    raw = json.loads((model_dir / "config.json").read_text())
    raw.pop("auto_map")
    raw["dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(raw))
    shutil.copyfile(model_dir / "tokenizer.model", src / "tokenizer.model")
    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    save_file(state, str(src / "model.safetensors"))
    assert main(["convert", str(src), str(tmp_path / "conv")]) == 0
    assert "converted" in capsys.readouterr().out
    assert set(SELF_CONTAINED_FILES) <= set(os.listdir(tmp_path / "conv"))
    model, _ = load_pretrained(tmp_path / "conv", dtype="float32", device="cpu")
    stored = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert stored["dtype"] == "bfloat16"  # the source weights' dtype is kept
    ref, _ = load_pretrained(src, dtype="float32", device="cpu")
    assert torch.equal(logits_of(model), logits_of(ref))
    assert not torch.equal(logits_of(model), logits_of(loaded[0]))  # bf16 rounding really happened


def test_convert_official_checkpoint(fixture_dir, tmp_path, capsys):
    from xcft.cli import main
    from xcft.model.loading import load_pretrained

    assert main(["convert", str(fixture_dir), str(tmp_path / "conv")]) == 0
    assert "converted" in capsys.readouterr().out
    model, _ = load_pretrained(tmp_path / "conv", dtype="float32", device="cpu")
    assert model.config.dtype == torch.float32
    stored = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert stored["dtype"] == "bfloat16"  # the official weights' dtype is kept
    official, _ = load_pretrained(fixture_dir, dtype="float32", device="cpu")
    assert torch.equal(logits_of(model), logits_of(official))


def test_auto_classes_are_registered(loaded, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    import xcft.model.loading  # noqa: F401  (registers the Auto classes)
    from xcft.model.loading import save_pretrained

    out = save_pretrained(*loaded, tmp_path / "auto")
    assert type(AutoConfig.from_pretrained(out)).__name__ == "XComposer2Config"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__module__ == "xcft.model.modeling_xcomposer2"
    assert torch.equal(logits_of(model.eval()), logits_of(loaded[0]))

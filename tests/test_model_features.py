"""Model features on tiny models (2.0 preset; 2.5 from a config): checkpointing, attention backends, packing,
DDP-friendly gradients, dtypes, presets and init-model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from xcft.cli import main
from xcft.data.dataset import DataCollator
from xcft.errors import XcftError
from xcft.model.configuration_xcomposer2 import XComposer2Config
from xcft.model.modeling_xcomposer2 import XComposer2ForCausalLM, dynamic_ntk_base, segment_lengths
from xcft.model.presets import build_model
from xcft.train.setup import SEPARATOR_NAMES

torch.set_num_threads(1)


TINY = {"vocab_size": 300, "seed": 1, "plora_dropout": 0.05}  # the preset default


def collate(items):

    return DataCollator(pad_token_id=2)(items)


def grads(model, batch):
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_grads(random_item, tiny_model):
    model = tiny_model(**TINY)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    gen = torch.Generator().manual_seed(0)
    batch = collate([random_item(model, gen), random_item(model, gen, n_text=5, images=0)])
    ref = grads(model, batch)
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    names = {type(m).__name__ for m in layers}
    assert names == {"XComposer2DecoderLayer", "CLIPEncoderLayer"}, names
    assert len(layers) == model.config.num_hidden_layers + model.config.vision_config.num_hidden_layers
    got = grads(model, batch)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_every_trainable_parameter_gets_a_gradient_even_without_images(random_item, tiny_model):
    """DDP without find_unused_parameters needs a gradient for every Partial-LoRA weight on every rank;
    post_layernorm (unused by the features) is also kept in the graph when images are present."""
    model = tiny_model(**TINY)
    model.train()
    gen = torch.Generator().manual_seed(0)
    text_only = collate([random_item(model, gen, images=0)])
    text_only["pixel_values"] = None
    got = grads(model, text_only)
    lora = [n for n, _ in model.named_parameters() if "Plora" in n]
    assert lora and all(n in got for n in lora)
    assert all(float(got[n].abs().sum()) == 0.0 for n in lora)  # zero-weighted: no effect on the update
    with_image = collate([random_item(model, gen)])
    got = grads(model, with_image)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in got]
    assert missing == []


def test_eager_and_sdpa_agree(random_item, tiny_model):
    gen = torch.Generator().manual_seed(0)
    model = tiny_model(**TINY)
    batch = collate([random_item(model, gen), random_item(model, gen, n_text=3, images=0)])
    with torch.no_grad():
        sdpa = model(**batch).logits
        model.config._attn_implementation = "eager"
        eager = model(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(eager[mask], sdpa[mask], rtol=1e-4, atol=1e-5)


def test_packed_rows_equal_separate_rows(random_item, tiny_model):
    """Packing hook: two samples in one row with restarting position_ids (and no attention mask)
    give the same per-sample losses as the two samples apart (block-diagonal causal mask)."""
    model = tiny_model(**TINY)
    gen = torch.Generator().manual_seed(0)
    a, b = random_item(model, gen), random_item(model, gen, n_text=7, images=0)
    with torch.no_grad():
        sa, na = model.sample_losses(**collate([a]))
        sb, nb = model.sample_losses(**collate([b]))
        packed = {
            "input_ids": torch.cat([a["input_ids"], b["input_ids"]])[None],
            "labels": torch.cat([a["labels"], b["labels"]])[None],
            "image_mask": torch.cat([a["image_mask"], b["image_mask"]])[None],
            "pixel_values": a["pixel_values"],
            "position_ids": torch.cat([torch.arange(len(a["input_ids"])), torch.arange(len(b["input_ids"]))])[None],
        }
        sp, n_p = model.sample_losses(**packed)
    assert n_p.item() == na.item() + nb.item()
    assert abs(sp.item() - (sa.item() + sb.item())) < 1e-4 * abs(sp.item())


def test_bf16_forward_and_backward(random_item, tiny_model):
    model = tiny_model(**TINY, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    model.train()
    gen = torch.Generator().manual_seed(0)
    batch = collate([random_item(model, gen)])
    loss = model(**batch).loss
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.vision_proj[0].weight.grad is not None


def test_presets_shapes():

    small = build_model("small", device="meta")
    c = small.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (
        512,
        4,
        8,
        4,
        1408,
    )
    assert (c.vision_config.hidden_size, c.vision_config.num_hidden_layers, c.vision_config.intermediate_size) == (256, 4, 1024)
    assert c.vocab_size == 92544 and c.plora_r == 256 and c.image_tokens == 1225
    assert tuple(small.vision_proj[0].weight.shape) == (512, 256) and tuple(small.vision_proj[2].weight.shape) == (512, 512)
    assert small.vit.clip.embeddings.position_embedding.weight.shape[0] == 1226
    assert build_model("small", img_size=224, device="meta").config.image_tokens == 256
    big = build_model("7b", device="meta")
    assert big.dtype == torch.bfloat16 and big.model.layers[0].attention.wqkv.weight.is_meta
    assert 8.5e9 < sum(p.numel() for p in big.parameters()) < 8.8e9


def test_init_model_command_writes_a_loadable_folder(tmp_path, capsys):
    from xcft.model.loading import load_pretrained

    assert main(["init-model", str(tmp_path / "tiny"), "--preset", "tiny", "--seed", "3"]) == 0
    assert "preset tiny" in capsys.readouterr().out
    model, tok = load_pretrained(tmp_path / "tiny", device="cpu")
    cfg = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert cfg["img_size"] == 224 and cfg["vocab_size"] == tok.vocab_size == model.config.vocab_size
    assert tok.turn_end_id < tok.vocab_size
    response, _ = model.chat(tok, "What colour is it?", images=[torch.zeros(3, 224, 224)], max_new_tokens=4)
    assert isinstance(response, str)


def test_init_model_with_a_given_tokenizer(tmp_path):
    """--tokenizer is copied as is and sets the vocabulary (600 pieces here, not the built-in 1000)."""
    from xcft.commands.init_model import init_model_command
    from xcft.data.spm_builder import build_tokenizer

    given = build_tokenizer(tmp_path / "tok", vocab_size=600)
    assert init_model_command(str(tmp_path / "t"), preset="tiny", img_size=490, tokenizer=str(given), seed=0) == 0
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["vocab_size"] == 600 and cfg["img_size"] == 490
    assert (tmp_path / "t" / "tokenizer.model").read_bytes() == given.read_bytes()


def test_image_count_mismatch_is_rejected(random_item, tiny_model):
    model = tiny_model(**TINY)
    item = random_item(model, torch.Generator().manual_seed(0))
    batch = {k: v[None] if k != "pixel_values" else torch.cat([v, v]) for k, v in item.items()}
    with pytest.raises(ValueError, match=f"image_mask marks {model.image_tokens} slots"):
        model(**batch)


def test_peft_lora_wraps_the_partial_lora_linears_and_merges(random_item, tiny_model):
    """The official LoRA targets (attention.wqkv ... feed_forward.w3) wrap our PLoRA linears;
    Partial LoRA still sees the image positions, and merging keeps the logits."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model(**TINY)
    gen = torch.Generator().manual_seed(0)
    batch = collate([random_item(model, gen), random_item(model, gen, images=0)])
    targets = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    wrapped = [n for n, m in peft_model.named_modules() if type(m).__module__.startswith("peft") and n.endswith(("wqkv", "w2"))]
    assert len(wrapped) == 2 * model.config.num_hidden_layers
    for name, p in peft_model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.02, generator=gen)
    peft_model.train()
    peft_model(**batch).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if ".lora_" in n and p.requires_grad)
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(**batch).logits
        merged = peft_model.merge_and_unload()
        after = merged(**batch).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert type(merged).__name__ == "XComposer2ForCausalLM"


# --------------------------------------------------------------------------- a tiny InternLM-XComposer-2.5 model built from a config (separators and Partial LoRA made non-trivial)


def hd_config(**overrides) -> XComposer2Config:
    """A 2.5 model small enough for CPU tests: 56 px views (4 x 4 patches, 2 x 2 merged tokens)."""
    values = dict(
        family="2.5",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        img_size=56,
        plora_r=8,
        plora_alpha=8.0,
        plora_dropout=0.0,
        max_length=512,
        rope_scaling={"type": "dynamic", "factor": 2.0},
        max_position_embeddings=4096,
        vision_config={
            "hidden_size": 24,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "patch_size": 14,
        },
    )
    values.update(overrides)
    return XComposer2Config(**values)


def hd_model(seed: int = 0, **overrides) -> XComposer2ForCausalLM:
    torch.manual_seed(seed)
    model = XComposer2ForCausalLM(hd_config(**overrides))
    with torch.no_grad():  # separators start at zero (official init); make them matter
        model.plora_glb_GN.normal_()
        model.plora_sub_GN.normal_()
        for name, p in model.named_parameters():
            if "Plora_B" in name:
                p.normal_(std=0.2)
    return model.eval()


def hd_sample(model, gen: torch.Generator, grids: list[tuple[int, int]], n_text: int = 6) -> dict:
    """One sample: BOS, then per image its slots followed by text; the second half of the text is supervised."""
    cfg = model.config
    ids, mask = [1], [False]
    views = []
    for h, w in grids:
        n = cfg.hd_image_tokens(h, w)
        ids += [2] * n
        mask += [True] * n
        views.append(torch.randn(1 + h * w, 3, cfg.img_size, cfg.img_size, generator=gen))
        more = torch.randint(3, cfg.vocab_size, (n_text,), generator=gen).tolist()
        ids += more
        mask += [False] * n_text
    ids += torch.randint(3, cfg.vocab_size, (n_text,), generator=gen).tolist()
    mask += [False] * n_text
    ids_t = torch.tensor(ids)
    labels = ids_t.clone()
    labels[: len(ids) // 2] = -100
    labels[torch.tensor(mask)] = -100
    return {"input_ids": ids_t, "labels": labels, "image_mask": torch.tensor(mask), "views": views, "grids": grids}


def collate_hd(samples: list[dict]) -> dict:
    width = max(len(s["input_ids"]) for s in samples)

    def pad(key: str, fill) -> torch.Tensor:
        return torch.stack([F.pad(s[key], (0, width - len(s[key])), value=fill) for s in samples])

    batch = {
        "input_ids": pad("input_ids", 2),
        "labels": pad("labels", -100),
        "image_mask": pad("image_mask", False),
        "attention_mask": torch.stack(
            [F.pad(torch.ones(len(s["input_ids"]), dtype=torch.long), (0, width - len(s["input_ids"]))) for s in samples]
        ),
        "image_counts": torch.tensor([len(s["grids"]) for s in samples]),
    }
    views = [v for s in samples for v in s["views"]]
    if views:
        batch["pixel_values"] = torch.cat(views)
        batch["image_grids"] = torch.tensor([g for s in samples for g in s["grids"]], dtype=torch.long).reshape(-1, 2)
    return batch


def test_tiny_batch_mixed_grids_and_text_row():
    """3 rows: two images (1x2, 2x1), text only, one 1x1 image. One tower call for all 9 views;
    forward/backward; the batch loss is the supervised-token-weighted mean of the rows' losses."""
    model = hd_model()
    gen = torch.Generator().manual_seed(1)
    samples = [hd_sample(model, gen, [(1, 2), (2, 1)]), hd_sample(model, gen, [], n_text=20), hd_sample(model, gen, [(1, 1)])]
    batch = collate_hd(samples)
    assert batch["pixel_values"].shape[0] == 3 + 3 + 2

    calls = []
    hook = model.vit.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    model.train()
    out = model(**batch)
    hook.remove()
    assert calls == [8]
    out.loss.backward()
    for name in (
        "plora_glb_GN",
        "plora_sub_GN",
        "vision_proj.0.weight",
        "model.layers.0.attention.wqkv.Plora_A.weight",
        "vit.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.eval()

    losses, counts = [], []
    for s in samples:
        single = collate_hd([s])
        with torch.no_grad():
            losses.append(model(**single).loss.item())
        counts.append(int((s["labels"][1:] != -100).sum()))
    weighted = sum(loss * c for loss, c in zip(losses, counts)) / sum(counts)
    assert out.loss.item() == pytest.approx(weighted, rel=1e-5)
    with torch.no_grad():
        sums, n = model.sample_losses(**batch)
    assert n.tolist() == counts
    for got, want in zip((sums / n).tolist(), losses):
        assert got == pytest.approx(want, rel=1e-5)


def test_tiny_packed_row_equals_unpacked():
    """Two samples in one row, positions restarting and no attention mask, as the packing path sends them."""
    model = hd_model(seed=2)
    gen = torch.Generator().manual_seed(3)
    a, b = hd_sample(model, gen, [(1, 2)]), hd_sample(model, gen, [(2, 2)])
    b["labels"][0] = -100
    packed = {
        "input_ids": torch.cat([a["input_ids"], b["input_ids"]])[None],
        "labels": torch.cat([a["labels"], b["labels"]])[None],
        "image_mask": torch.cat([a["image_mask"], b["image_mask"]])[None],
        "position_ids": torch.cat([torch.arange(len(a["input_ids"])), torch.arange(len(b["input_ids"]))])[None],
        "pixel_values": torch.cat(a["views"] + b["views"]),
        "image_grids": torch.tensor(a["grids"] + b["grids"]),
        "image_counts": torch.tensor([2]),
    }
    with torch.no_grad():
        sums, counts = model.sample_losses(**packed)
        alone = [model.sample_losses(**collate_hd([s])) for s in (a, b)]
    assert counts.item() == sum(c.item() for _, c in alone)
    assert sums.item() == pytest.approx(sum(s.item() for s, _ in alone), rel=1e-5)


def test_2_0_model_rejects_grids_and_2_5_needs_even_grid():
    cfg = hd_config(family="2.0", img_size=28)
    model = XComposer2ForCausalLM(cfg).eval()
    assert not hasattr(model, "plora_glb_GN") and model.vision_proj[0].in_features == 24
    ids = torch.full((1, 5 + cfg.image_tokens), 3)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 1 : 1 + cfg.image_tokens] = True
    with pytest.raises(ValueError, match=r"only for 2\.5"):
        model(input_ids=ids, image_mask=mask, pixel_values=torch.zeros(1, 3, 28, 28), image_grids=torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="must be even"):
        hd_config(img_size=42)


def test_segment_lengths():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    valid = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    assert segment_lengths(pos, valid).tolist() == [[3, 3, 3, 2, 2, 4, 4, 4, 4], [6] * 9]


def test_dynamic_ntk_is_official_and_stateless():
    """Above max_position_embeddings the base grows as the official formula; a shorter call later
    is unaffected (the official code would keep the enlarged base); padding and packing do not
    change a sequence's own length."""
    model = hd_model(seed=4, max_position_embeddings=16, vocab_size=64)
    rope = model.model.rotary_emb
    x = torch.zeros(1, 1)
    dim, theta = model.config.head_dim, model.config.rope_parameters["rope_theta"]

    long_pos = torch.arange(40)[None]
    cos, _ = rope(x, long_pos, total_len=40)
    base = dynamic_ntk_base(theta, dim, 2.0, 16, 40)
    assert base == theta * ((2.0 * 40 / 16) - 1.0) ** (dim / (dim - 2))
    inv = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    want = torch.cat([long_pos[0, :, None].float() * inv] * 2, dim=-1).cos()
    assert torch.equal(cos[0], want)

    short_pos = torch.arange(10)[None]
    fresh = rope(x, short_pos, total_len=10)[0]
    inv0 = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
    assert torch.equal(fresh[0], torch.cat([short_pos[0, :, None].float() * inv0] * 2, dim=-1).cos())

    gen = torch.Generator().manual_seed(5)
    a = torch.randint(3, 64, (1, 30), generator=gen)
    b = torch.randint(3, 64, (1, 20), generator=gen)
    with torch.no_grad():
        a_alone = model(input_ids=a).logits
        after_long = model(input_ids=b).logits
        b_fresh = hd_model(seed=4, max_position_embeddings=16, vocab_size=64)(input_ids=b).logits
        padded = model(
            input_ids=torch.cat([a, torch.cat([b, torch.full((1, 10), 2)], 1)]),
            attention_mask=torch.cat([torch.ones(1, 30), torch.cat([torch.ones(1, 20), torch.zeros(1, 10)], 1)]).long(),
        ).logits
        packed = model(
            input_ids=torch.cat([a, b], 1), position_ids=torch.cat([torch.arange(30), torch.arange(20)])[None], use_cache=False
        ).logits  # packed rows are read from position_ids without a cache
    assert torch.equal(after_long, b_fresh)
    assert (padded[0] - a_alone[0]).abs().max() < 1e-5 and (padded[1, :20] - after_long[0]).abs().max() < 1e-5
    assert (packed[0, :30] - a_alone[0]).abs().max() < 1e-5 and (packed[0, 30:] - after_long[0]).abs().max() < 1e-5


def test_hd_chat_images_use_the_inference_transform():

    from xcft.model.image_processing_xcomposer2 import hd_crop_grid

    model = hd_model(seed=6)
    wide, tall = Image.new("RGB", (200, 60), (10, 20, 30)), Image.new("RGB", (40, 150), (200, 100, 0))
    pv, grids = model.hd_chat_images([wide])
    assert grids.tolist() == [list(hd_crop_grid(200, 60, 24, inference=True, view_size=56))] == [[2, 4]]
    assert pv.shape == (1 + 8, 3, 56, 56)
    pv, grids = model.hd_chat_images([wide, tall])
    assert grids.tolist() == [list(hd_crop_grid(*im.size, 6, inference=True, view_size=56)) for im in (wide, tall)]
    assert pv.shape[0] == sum(1 + h * w for h, w in grids.tolist())
    with torch.no_grad():  # the result is a valid model input
        n = sum(model.config.hd_image_tokens(h, w) for h, w in grids.tolist())
        ids = torch.full((1, n + 3), 5)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, 1 : 1 + n] = True
        assert model(input_ids=ids, image_mask=mask, pixel_values=pv, image_grids=grids).logits.shape == (1, n + 3, 300)


def test_image_contract_is_checked():
    model = hd_model()
    gen = torch.Generator().manual_seed(4)
    batch = collate_hd([hd_sample(model, gen, [(1, 2)]), hd_sample(model, gen, [(1, 1)])])
    assert batch["pixel_values"].shape[0] == 3 + 2
    bad = dict(batch, image_grids=torch.tensor([[1, 1], [1, 1]]))
    with pytest.raises(ValueError, match="holds 5 views but image_grids"):
        model(**bad)
    bad = dict(batch, image_counts=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="add up to 1 but the batch has 2 images"):
        model(**bad)
    bad = {k: v for k, v in batch.items() if k != "image_grids"}
    with pytest.raises(ValueError, match="needs image_grids"):
        model(**bad)


def test_save_and_reload_keeps_the_family(tmp_path: Path):
    from xcft.model.loading import load_model, save_pretrained

    model = hd_model(seed=5)
    out = save_pretrained(model, None, tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert (config["family"], config["img_size"]) == ("2.5", 56)
    again = load_model(out, dtype="float32", device="cpu")
    assert again.config.hd and again.config.rope_parameters["rope_type"] == "dynamic"
    batch = collate_hd([hd_sample(model, torch.Generator().manual_seed(6), [(2, 1)])])
    batch.pop("labels")
    with torch.no_grad():
        a = model(**batch).logits
        b = again(**batch).logits
    assert torch.equal(a, b)


def _copy_folder(src: Path, dst: Path, drop: tuple[str, ...] = (), config_update: dict | None = None) -> Path:

    dst.mkdir()
    for name in ("vision_config.json", "tokenizer.model"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    config = json.loads((src / "config.json").read_text())
    config.update(config_update or {})
    (dst / "config.json").write_text(json.dumps(config))
    state = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if k not in drop}
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_load_without_post_layernorm_and_inconsistent_folders(tmp_path: Path):
    from xcft.model.loading import load_model, save_pretrained

    source = save_pretrained(hd_model(), None, tmp_path / "tiny")
    post_ln = ("vit.vision_tower.vision_model.post_layernorm.weight", "vit.vision_tower.vision_model.post_layernorm.bias")
    folder = _copy_folder(source, tmp_path / "no_post_ln", drop=post_ln)
    model_hd = load_model(folder, dtype="float32", device="cpu")
    assert model_hd.config.family == "2.5"
    assert torch.equal(model_hd.state_dict()[post_ln[0]], torch.ones(24))

    folder = _copy_folder(source, tmp_path / "one_separator", drop=("plora_sub_GN",))
    with pytest.raises(XcftError, match="plora_glb_GN but not its partner"):
        load_model(folder, dtype="float32", device="cpu")
    folder = _copy_folder(source, tmp_path / "declared_2_0", config_update={"family": "2.0"})
    with pytest.raises(XcftError, match=r"config.json says family '2\.0' but the weights are 2\.5"):
        load_model(folder, dtype="float32", device="cpu")


def test_init_model_tiny_25_preset_is_a_2_5_folder(tiny25_base):
    config = json.loads((tiny25_base / "config.json").read_text())
    assert config["family"] == "2.5" and config["img_size"] == 224
    keys = load_file(str(tiny25_base / "model.safetensors")).keys()
    assert set(SEPARATOR_NAMES) <= set(keys)

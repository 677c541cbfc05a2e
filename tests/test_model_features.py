"""Training features on the tiny preset: checkpointing, attention backends, packing hook,
DDP-friendly gradients, dtypes, presets and init-model."""

from __future__ import annotations

import json

import pytest
import torch

torch.set_num_threads(1)


TINY = {"vocab_size": 300, "seed": 1, "plora_dropout": 0.05}  # the preset default


def collate(items):
    from xcft.data.dataset import DataCollator

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
    from xcft.model.presets import build_model

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
    from xcft.cli import main
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

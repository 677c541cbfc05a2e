"""Supervised-only LM head: in training the output projection and cross-entropy run only where a
label is set, and the loss and gradients equal the full computation. Tiny preset, CPU."""

from __future__ import annotations

import torch

from xcft.data.dataset import DataCollator
from xcft.model.modeling_xcomposer2 import causal_lm_loss

torch.set_num_threads(1)


def build():
    from xcft.model.presets import build_model

    return build_model("tiny", vocab_size=300, seed=7, plora_dropout=0.0)


def batch_of(model):
    gen = torch.Generator().manual_seed(1)
    T = model.image_tokens
    items = []
    for n_text, images in ((11, 1), (30, 0), (4, 2)):
        ids = [1] + torch.randint(3, 290, (n_text,), generator=gen).tolist()
        mask = [False] * len(ids)
        for _ in range(images):
            ids += [2] * T + torch.randint(3, 290, (n_text,), generator=gen).tolist()
            mask += [True] * T + [False] * n_text
        ids_t = torch.tensor(ids)
        labels = ids_t.clone()
        labels[: len(ids) // 2] = -100
        labels[torch.tensor(mask)] = -100
        items.append({
            "input_ids": ids_t,
            "labels": labels,
            "image_mask": torch.tensor(mask),
            "pixel_values": torch.randn(images, 3, model.config.img_size, model.config.img_size, generator=gen),
        })
    return DataCollator(pad_token_id=2)(items)


def _full_loss(model, batch, num_items=None):
    """The reference: full logits at every position, then causal_lm_loss."""
    args = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**args).logits
    return causal_lm_loss(logits, batch["labels"], num_items)


def test_supervised_head_loss_and_grads_equal_full_head():
    model = build()
    model.train()
    batch = batch_of(model)
    results = []
    for supervised_only in (False, True):
        model.config.supervised_logits_only = supervised_only
        model.zero_grad()
        loss = model(**batch).loss if supervised_only else _full_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, g_full), (sup, g_sup) = results
    assert abs(sup.item() - full.item()) <= 1e-6 * abs(full.item())
    assert g_full.keys() == g_sup.keys()
    for name in g_full:
        torch.testing.assert_close(g_sup[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)
    # with the Trainer's num_items_in_batch (sum / count over the whole accumulated step)
    with torch.no_grad():
        model.config.supervised_logits_only = True
        a = model(**batch, num_items_in_batch=torch.tensor(100)).loss
        b = _full_loss(model, batch, torch.tensor(100))
    assert abs(a.item() - b.item()) <= 1e-6 * abs(b.item())


def test_supervised_head_only_projects_supervised_rows():
    """The [rows, vocab] tensor has one row per supervised target, not one per position."""
    model = build()
    model.train()
    model.config.supervised_logits_only = True
    batch = batch_of(model)
    seen = []
    hook = model.output.register_forward_hook(lambda m, inp, out: seen.append(tuple(out.shape)))
    try:
        out = model(**batch)
    finally:
        hook.remove()
    targets = int((batch["labels"][:, 1:] != -100).sum())
    positions = batch["input_ids"].numel()
    assert seen == [(targets, model.config.vocab_size)]
    assert targets < positions / 3
    assert out.logits is None
    # eval mode keeps the full logits (generation, eval)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)

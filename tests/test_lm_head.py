"""Supervised-only LM head: in training the output projection and cross-entropy run only where a
label is set, and the loss and gradients equal the full computation. Tiny preset, CPU."""

from __future__ import annotations

import torch

from xcft.data.dataset import DataCollator
from xcft.model.modeling_xcomposer2 import OutputHead, causal_lm_loss

torch.set_num_threads(1)


TINY = {"vocab_size": 300, "seed": 7}


def batch_of(model):
    gen = torch.Generator().manual_seed(1)
    T = model.image_tokens
    items = []
    for n_text, images in ((11, 1), (30, 0), (4, 2)):
        ids = [1, *torch.randint(3, 290, (n_text,), generator=gen).tolist()]
        mask = [False] * len(ids)
        for _ in range(images):
            ids += [2] * T + torch.randint(3, 290, (n_text,), generator=gen).tolist()
            mask += [True] * T + [False] * n_text
        ids_t = torch.tensor(ids)
        labels = ids_t.clone()
        labels[: len(ids) // 2] = -100
        labels[torch.tensor(mask)] = -100
        items.append(
            {
                "input_ids": ids_t,
                "labels": labels,
                "image_mask": torch.tensor(mask),
                "pixel_values": torch.randn(images, 3, model.config.img_size, model.config.img_size, generator=gen),
            }
        )
    return DataCollator(pad_token_id=2)(items)


def _full_loss(model, batch, num_items=None):
    """The reference: full logits at every position, then causal_lm_loss."""
    args = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**args).logits
    return causal_lm_loss(logits, batch["labels"], num_items)


def test_supervised_head_loss_and_grads_equal_full_head(tiny_model):
    model = tiny_model(**TINY)
    model.train()
    batch = batch_of(model)
    results = []
    for supervised_only in (False, True):
        model.zero_grad()
        loss = model(**batch, supervised_logits_only=True).loss if supervised_only else _full_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, g_full), (sup, g_sup) = results
    assert abs(sup.item() - full.item()) <= 1e-6 * abs(full.item())
    assert g_full.keys() == g_sup.keys()
    for name in g_full:
        torch.testing.assert_close(g_sup[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)
    # with the Trainer's num_items_in_batch (sum / count over the whole accumulated step)
    with torch.no_grad():
        a = model(**batch, num_items_in_batch=torch.tensor(100), supervised_logits_only=True).loss
        b = _full_loss(model, batch, torch.tensor(100))
    assert abs(a.item() - b.item()) <= 1e-6 * abs(b.item())


def test_supervised_head_only_projects_supervised_rows(tiny_model):
    """The head sees one row per supervised target, not one per position, and keeps no
    [rows, vocab] tensor for backward (the gradients are formed chunk by chunk in the forward)."""
    model = tiny_model(**TINY)
    model.train()
    batch = batch_of(model)
    seen = []
    hook = model.output.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    saved = []
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = model(**batch, supervised_logits_only=True)
    finally:
        hook.remove()
    targets = int((batch["labels"][:, 1:] != -100).sum())
    positions = batch["input_ids"].numel()
    assert seen == [(targets, model.config.hidden_size)]
    assert targets < positions / 3
    assert out.logits is None
    assert saved and not any(
        model.config.vocab_size in shape and len(shape) == 2 and shape[0] != model.config.vocab_size for shape in saved
    ), saved
    # eval mode keeps the full logits (generation, eval)
    model.eval()
    with torch.no_grad():
        logits = model(**batch, supervised_logits_only=True).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)


def _head_loss_and_grads(head, hidden, targets, *, autocast=False):
    x = hidden.clone().requires_grad_()
    head.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if isinstance(head, OutputHead):
            loss = head(x, targets) / targets.numel()
        else:
            loss = torch.nn.functional.cross_entropy(head(x).float(), targets)
    loss.backward()
    return loss.detach(), x.grad, None if head.weight.grad is None else head.weight.grad.clone()


def test_chunked_training_head_equals_plain_head():
    """Any chunk size gives the plain head's loss (1e-6) and gradients, trained or frozen, fp32 or bf16 autocast."""
    torch.manual_seed(0)
    fused = OutputHead(16, 97, bias=False)
    plain = torch.nn.Linear(16, 97, bias=False)
    plain.weight.data.copy_(fused.weight.data)
    hidden, targets = torch.randn(23, 16), torch.randint(0, 97, (23,))
    ref_loss, ref_gx, ref_gw = _head_loss_and_grads(plain, hidden, targets)
    for chunk in (1, 5, 23, 1024):
        fused.chunk_rows = chunk
        loss, gx, gw = _head_loss_and_grads(fused, hidden, targets)
        assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item(), chunk
        torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-7)
    # frozen head (LoRA runs): no weight gradient is formed
    fused.weight.requires_grad_(False)
    plain.weight.requires_grad_(False)
    loss, gx, gw = _head_loss_and_grads(fused, hidden, targets)
    assert gw is None and fused.weight.grad is None
    torch.testing.assert_close(gx, _head_loss_and_grads(plain, hidden, targets)[1], rtol=1e-5, atol=1e-7)
    # bf16 autocast: bf16 matmuls like the plain head, float32 softmax
    fused.weight.requires_grad_(True)
    plain.weight.requires_grad_(True)
    fused.chunk_rows = 5
    ref = _head_loss_and_grads(plain, hidden, targets, autocast=True)
    got = _head_loss_and_grads(fused, hidden, targets, autocast=True)
    assert abs(got[0].item() - ref[0].item()) <= 1e-3 * ref[0].item()
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[1], ref[1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[2], ref[2], rtol=2e-2, atol=2e-3)


def test_replaced_head_falls_back_to_plain_loss(tiny_model):
    """A head that is not OutputHead (peft targeting 'output', resized embeddings) still trains, same loss."""
    model = tiny_model(**TINY)
    model.train()
    batch = batch_of(model)
    with torch.no_grad():
        fused = model(**batch, supervised_logits_only=True).loss
    plain = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    plain.weight = model.output.weight
    model.output = plain
    with torch.no_grad():
        replaced = model(**batch, supervised_logits_only=True).loss
    assert abs(replaced.item() - fused.item()) <= 1e-6 * fused.item()

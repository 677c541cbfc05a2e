"""Packing: plan, packed items, collator, exactness (loss = unpacked loss; samples never see each other),
and the length-grouped sampler. Tiny preset, CPU, a few seconds."""

from __future__ import annotations

import random
from typing import ClassVar

import pytest
import torch

from xcft.data.dataset import DataCollator
from xcft.data.packing import (
    LengthGroupedSampler,
    PackedDataset,
    PackingCollator,
    concat_items,
    count_samples,
    make_collator,
    pack_indices,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tiny_model):
    # PLoRA dropout 0 (the factory's default): train mode is then deterministic, so train-mode losses can be compared.
    return tiny_model(vocab_size=300, seed=3)


@pytest.fixture(scope="module")
def samples(model, random_item):
    gen = torch.Generator().manual_seed(0)
    return [
        random_item(model, gen, 9, 1, prompt_divisor=3),
        random_item(model, gen, 14, 0, prompt_divisor=3),
        random_item(model, gen, 5, 2, prompt_divisor=3),
        random_item(model, gen, 21, 0, prompt_divisor=3),
    ]


def packed_batch(samples, rows):
    return PackingCollator(pad_token_id=2)([concat_items([samples[i] for i in row]) for row in rows])


# --------------------------------------------------------------------------- plan


def test_pack_indices_covers_every_sample_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 600) for _ in range(300)] + [1000, 1500]
    packs = pack_indices(lengths, 1000, window=8)
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(len(lengths)))
    for p in packs:
        assert sum(lengths[i] for i in p) <= 1000 or len(p) == 1
    assert [1500 in [lengths[i] for i in p] for p in packs].count(True) == 1
    # tight: close to the lower bound of rows
    assert len(packs) <= 1.1 * sum(lengths) / 1000 + 3


def test_pack_indices_keeps_small_packs_in_order():
    packs = pack_indices([3, 3, 3, 9, 2], 10)
    assert sum(len(p) for p in packs) == 5
    assert packs == sorted(packs, key=lambda p: p[0])
    assert all(p == sorted(p) for p in packs)


# --------------------------------------------------------------------------- items and collator


def test_concat_and_collate_layout(model, samples):
    a, b, c = samples[0], samples[1], samples[2]
    batch = packed_batch(samples, [[0, 1], [2]])
    assert "attention_mask" not in batch
    la, lb, lc = (len(s["input_ids"]) for s in (a, b, c))
    assert batch["input_ids"].shape == (2, max(la + lb, lc))
    pos = batch["position_ids"]
    assert pos[0, :la].tolist() == list(range(la))
    assert pos[0, la : la + lb].tolist() == list(range(lb))
    # first label of each sample is never a target
    assert batch["labels"][0, 0] == -100 and batch["labels"][0, la] == -100
    assert torch.equal(batch["image_mask"][0, : la + lb], torch.cat([a["image_mask"], b["image_mask"]]))
    # pixels in row-major order: a's image, then c's two
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"], c["pixel_values"]]))
    assert batch["image_counts"].tolist() == [1, 2]
    assert int(batch["image_mask"].sum()) == 3 * model.image_tokens
    # padding: its own segment, no label, pad id
    width = batch["input_ids"].shape[1]
    short = 0 if la + lb < lc else 1
    used = la + lb if short == 0 else lc
    assert pos[short, used:].tolist() == list(range(width - used))
    assert (batch["labels"][short, used:] == -100).all()
    assert count_samples(concat_items([a, b])) == 2
    assert isinstance(make_collator(2, packing=True), PackingCollator)
    assert isinstance(make_collator(2), DataCollator)


def test_packed_dataset_over_an_epoch_draw():
    class Base:
        def __init__(self):
            self.epoch = 0
            self.sizes = {0: [5, 7, 3, 9, 2, 8], 1: [4, 4, 4, 4, 4, 4]}

        @property
        def lengths(self):
            return self.sizes[self.epoch]

        def set_epoch(self, e):
            self.epoch = e

        def __len__(self):
            return 6

        def __getitem__(self, i):
            n = self.lengths[i]
            return {
                "input_ids": torch.full((n,), 10 + i),
                "labels": torch.full((n,), 10 + i),
                "image_mask": torch.zeros(n, dtype=torch.bool),
                "pixel_values": torch.zeros(0, 3, 4, 4),
            }

    ds = PackedDataset(Base(), 12)
    assert sum(ds.lengths) == 34 and max(ds.lengths) <= 12
    seen = sorted(int(t) for p in range(len(ds)) for t in ds[p]["input_ids"].unique())
    assert seen == list(range(10, 16))
    assert ds.num_samples == 6
    ds.set_epoch(1)
    assert ds.lengths == [12, 12]
    assert sum(count_samples(ds[p]) for p in range(len(ds))) == 6


# --------------------------------------------------------------------------- exactness


def _loss(model, batch, **kw):
    # use_cache=False: in eval mode the model would otherwise build a KV cache, and transformers only
    # reads packed position_ids as sample boundaries when there is no cache (training never has one).
    return model(**batch, use_cache=False, **kw).loss


@pytest.mark.parametrize("train_mode", [False, True])
def test_packed_loss_equals_unpacked_loss(model, samples, train_mode):
    """Same samples, packed (two rows) vs padded one per row: same mean loss (1e-5), also with num_items_in_batch."""
    unpacked = DataCollator(pad_token_id=2)(samples)
    packed = packed_batch(samples, [[0, 1], [2, 3]])
    model.train(train_mode)
    try:
        with torch.no_grad():
            lu = _loss(model, unpacked, supervised_logits_only=train_mode)
            lp = _loss(model, packed, supervised_logits_only=train_mode)
            lu2 = _loss(model, unpacked, num_items_in_batch=torch.tensor(37), supervised_logits_only=train_mode)
            lp2 = _loss(model, packed, num_items_in_batch=torch.tensor(37), supervised_logits_only=train_mode)
    finally:
        model.eval()
    assert abs(lp.item() - lu.item()) <= 1e-5 * abs(lu.item())
    assert abs(lp2.item() - lu2.item()) <= 1e-5 * abs(lu2.item())


def test_packed_gradients_equal_unpacked_gradients(model, samples):
    unpacked = DataCollator(pad_token_id=2)(samples)
    packed = packed_batch(samples, [[0, 1, 2, 3]])
    model.train()
    grads = []
    try:
        for batch in (unpacked, packed):
            model.zero_grad()
            model(**batch, supervised_logits_only=True).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        model.zero_grad()
        model.eval()
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_perturbing_one_sample_leaves_the_others_unchanged(model, samples):
    """Block-diagonal attention: new tokens and pixels in sample 1 change only sample 1's logits."""
    rows = [[0, 1, 2]]
    base = packed_batch(samples, rows)
    changed = [dict(s) for s in samples]
    gen = torch.Generator().manual_seed(99)
    changed[1]["input_ids"] = torch.randint(3, 290, changed[1]["input_ids"].shape, generator=gen)
    changed[0] = dict(samples[0])  # and sample 2's image: must not leak into 0 or 1
    changed[2]["pixel_values"] = torch.randn(changed[2]["pixel_values"].shape, generator=gen)
    pert = packed_batch(changed, rows)
    with torch.no_grad():
        out_base = model(**base, use_cache=False).logits[0]
        out_pert = model(**pert, use_cache=False).logits[0]
    la, lb = len(samples[0]["input_ids"]), len(samples[1]["input_ids"])
    lc = len(samples[2]["input_ids"])
    torch.testing.assert_close(out_pert[:la], out_base[:la], rtol=0, atol=1e-6)  # sample 0: untouched
    assert (out_pert[la : la + lb] - out_base[la : la + lb]).abs().max() > 1e-3  # sample 1: did change
    # sample 2 (after the changed sample): identical before its image, different after it
    first_img = int(samples[2]["image_mask"].nonzero()[0])
    s2 = la + lb
    torch.testing.assert_close(out_pert[s2 : s2 + first_img], out_base[s2 : s2 + first_img], rtol=0, atol=1e-6)
    assert (out_pert[s2 + first_img : s2 + lc] - out_base[s2 + first_img : s2 + lc]).abs().max() > 1e-4
    # and sample 0 packed equals sample 0 alone
    with torch.no_grad():
        alone = model(**DataCollator(pad_token_id=2)([samples[0]])).logits[0]
    torch.testing.assert_close(out_base[:la], alone, rtol=1e-5, atol=1e-5)


def test_partial_lora_follows_every_packed_image(model, samples):
    """Zeroing Plora_B removes the image branch: logits change exactly at and after image slots of each sample."""
    batch = packed_batch(samples, [[1, 0, 2]])
    with torch.no_grad():
        with_plora = model(**batch, use_cache=False).logits[0]
        saved = {n: p.clone() for n, p in model.named_parameters() if "Plora_B" in n}
        try:
            for n, p in model.named_parameters():
                if "Plora_B" in n:
                    p.zero_()
            without = model(**batch, use_cache=False).logits[0]
        finally:
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    lb, la = len(samples[1]["input_ids"]), len(samples[0]["input_ids"])
    # sample 1 (text only) unaffected; sample 0 and 2 change from their first image on
    torch.testing.assert_close(with_plora[:lb], without[:lb], rtol=0, atol=1e-6)
    for start, s in ((lb, samples[0]), (lb + la, samples[2])):
        first = int(s["image_mask"].nonzero()[0])
        n = len(s["input_ids"])
        torch.testing.assert_close(with_plora[start : start + first], without[start : start + first], rtol=0, atol=1e-6)
        assert (with_plora[start + first : start + n] - without[start + first : start + n]).abs().max() > 1e-4


# --------------------------------------------------------------------------- length grouping


def test_length_grouped_sampler():
    rng = random.Random(1)

    class DS:
        epoch = 0
        lengths: ClassVar[list[int]] = [rng.randint(1, 1000) for _ in range(200)]

        def __len__(self):
            return 200

    ds = DS()
    sampler = LengthGroupedSampler(ds, batch_size=4, seed=5, mega_batch_mult=10)
    order = list(sampler)
    assert sorted(order) == list(range(200))
    assert order == list(LengthGroupedSampler(ds, batch_size=4, seed=5, mega_batch_mult=10))
    # the first batch holds the longest sample
    assert max(ds.lengths) in [ds.lengths[i] for i in order[:4]]

    # grouped: far less padding than a random order
    def padding(o):
        return sum(
            4 * max(ds.lengths[i] for i in o[k : k + 4]) - sum(ds.lengths[i] for i in o[k : k + 4]) for k in range(0, 200, 4)
        )

    rand = list(range(200))
    random.Random(0).shuffle(rand)
    assert padding(order) < 0.5 * padding(rand)
    sampler.set_epoch(1)
    assert list(sampler) != order

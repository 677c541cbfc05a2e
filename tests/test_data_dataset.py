"""Dataset over the epoch's draw and the collator (batch contract)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xcft.data import DataCollator, build_dataset
from xcft.data.encode import IGNORE_INDEX
from xcft.errors import DataError


def test_official_examples_load_as_they_are(tok, examples_dir: Path) -> None:
    ds = build_dataset(examples_dir / "data.txt", tok, 490, 4096)
    assert len(ds) == 20 + 10 + 10
    counts = np.bincount(ds.draw[:, 0], minlength=3)
    assert counts.tolist() == [20, 10, 10]
    item = next(ds[i] for i in range(len(ds)) if int(ds.draw[i, 0]) == 1)  # single-image file
    assert item["pixel_values"].shape == (1, 3, 490, 490)
    assert int(item["image_mask"].sum()) == 1225
    assert (item["input_ids"][item["image_mask"]] == tok.pad_token_id).all()
    assert (item["labels"][item["image_mask"]] == IGNORE_INDEX).all()
    assert item["image_mask"][4] and not item["image_mask"][3]  # image at the start of the first user turn


def test_getitem_honours_index_and_set_epoch(tok, tiny_data: Path) -> None:
    ds = build_dataset(tiny_data, tok, 56, 160, seed=1)
    draw0 = ds.draw.copy()
    for i in (0, 17, 39):
        conv, enc = ds.encode(i)
        assert conv == ds.files[int(draw0[i, 0])].conversations[int(draw0[i, 1])]
        assert ds[i]["input_ids"].shape[0] == len(enc) == ds.lengths[i]
    ds.set_epoch(1)
    assert len(ds) == 40 and not np.array_equal(ds.draw, draw0)
    ds.set_epoch(0)
    assert np.array_equal(ds.draw, draw0)
    other = build_dataset(tiny_data, tok, 56, 160, seed=1)
    assert np.array_equal(other.draw, draw0)  # every rank computes the same draw
    with pytest.raises(IndexError):
        ds[40]


def test_collator_mixed_batch(tok, tmp_path: Path) -> None:
    for name, color in (("r.png", (255, 0, 0)), ("g.png", (0, 255, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (30, 20), color).save(tmp_path / name)
    samples = [
        {"id": "t1", "conversations": [{"from": "user", "value": "hello"}, {"from": "assistant", "value": "hi"}]},
        {
            "id": "i2",
            "image": ["r.png", "g.png"],
            "conversations": [
                {"from": "user", "value": "<ImageHere> vs <ImageHere>"},
                {"from": "assistant", "value": "red, green"},
            ],
        },
        {
            "id": "t3",
            "conversations": [
                {"from": "user", "value": "a longer question here"},
                {"from": "assistant", "value": "and an answer"},
            ],
        },
        {
            "id": "i4",
            "image": "b.png",
            "conversations": [{"from": "user", "value": "colour?"}, {"from": "assistant", "value": "blue"}],
        },
    ]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(samples))
    ds = build_dataset(f, tok, 28, 512)  # a single JSON file: every sample once
    assert len(ds) == 4
    by_id = {ds.conversation(i).id: ds[i] for i in range(4)}
    items = [by_id[k] for k in ("t1", "i2", "t3", "i4")]
    batch = DataCollator(tok.pad_token_id)(items)
    lengths = [len(x["input_ids"]) for x in items]
    B, L = 4, max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (B, L)
    assert batch["image_mask"].dtype == torch.bool and batch["image_mask"].shape == (B, L)
    assert batch["pixel_values"].shape == (3, 3, 28, 28)
    assert batch["image_counts"].tolist() == [0, 2, 0, 1]
    assert int(batch["image_mask"].sum()) == 3 * 4
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for b, n in enumerate(lengths):
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
    # images in row order: red, green (row 1), blue (row 3); red channel max for the first
    red = batch["pixel_values"][0].mean(dim=(1, 2))
    blue = batch["pixel_values"][2].mean(dim=(1, 2))
    assert red.argmax() == 0 and blue.argmax() == 2
    text_only = DataCollator(tok.pad_token_id)([items[0], items[2]])
    assert text_only["pixel_values"] is None and text_only["image_counts"].tolist() == [0, 0]


def test_samples_without_supervision_skipped_with_count(tok, tmp_path: Path, caplog) -> None:
    long_q = "word " * 200
    samples = [
        {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]},
        {"conversations": [{"from": "user", "value": long_q}, {"from": "assistant", "value": "a"}]},
    ]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(s) for s in samples))
    with caplog.at_level("WARNING"):
        ds = build_dataset(f, tok, 28, 64)
    assert len(ds) == 1 and ds.num_skipped == 1
    assert "1 sample(s) skipped" in caplog.text


def test_build_raises_on_bad_data(tok, tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"conversations": [{"from": "narrator", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
    with pytest.raises(DataError, match="unknown role"):
        build_dataset(f, tok, 28, 64)


def test_undecodable_image_raises_data_error(tok, tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    f = tmp_path / "d.json"
    f.write_text(
        json.dumps(
            [{"image": "bad.jpg", "conversations": [{"from": "user", "value": "<ImageHere>"}, {"from": "gpt", "value": "a"}]}]
        )
    )
    ds = build_dataset(f, tok, 28, 512)
    with pytest.raises(DataError, match="cannot decode image"):
        ds[0]


def test_dataloader_workers_and_pickling(tok, tiny_data: Path) -> None:
    import pickle

    from torch.utils.data import DataLoader

    ds = build_dataset(tiny_data, tok, 56, 160)
    clone = pickle.loads(pickle.dumps(ds))  # what a spawn-started worker receives
    assert torch.equal(clone[5]["input_ids"], ds[5]["input_ids"])
    loader = DataLoader(ds, batch_size=8, num_workers=1, collate_fn=DataCollator(tok.pad_token_id))
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == 40
    assert sum(int(b["image_counts"].sum()) for b in batches) == int(sum(len(ds.conversation(i).images) for i in range(len(ds))))

"""Dataset over the epoch's draw and the collator (batch contract); 2.5 items and losses against the official reference run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xcft.data import DataCollator, build_dataset
from xcft.data.dataset import XComposerDataset, read_data
from xcft.data.encode import IGNORE_INDEX, ImageSpec
from xcft.data.packing import PackingCollator, concat_items
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


# --------------------------------------------------------------------------- InternLM-XComposer-2.5 items and losses against the official reference run (ixc2d5_tiny_public)


LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def cases_hd(fixture_2d5_dir: Path) -> dict[str, dict]:
    data = json.loads((fixture_2d5_dir / "cases.json").read_text())
    return {c["name"].split("_")[0]: c for c in data["cases"]}


@pytest.fixture(scope="module")
def model_and_tokenizer(fixture_2d5_dir: Path):
    from xcft.model.loading import load_pretrained

    model, tok = load_pretrained(fixture_2d5_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    assert model.config.family == "2.5" and model.config.img_size == 560
    return model.eval(), tok


def _write_case(tmp_path: Path, fixture: Path, case: dict) -> Path:
    samples = []
    for s in case["conversations"]:
        s = dict(s)
        if "image" in s:
            s["image"] = [str(fixture / "images" / name) for name in s["image"]]
        samples.append(s)
    path = tmp_path / f"{case['name']}.json"
    path.write_text(json.dumps(samples))
    return path


def _dataset(tmp_path: Path, fixture: Path, case: dict, tok) -> XComposerDataset:
    """All samples of the case, in file order (one draw of each)."""
    path = _write_case(tmp_path, fixture, case)
    files = read_data(path, tok, 560, case["max_length"], given_num=False, hd_num=case["hd_num"])
    ds = XComposerDataset(files, tok, 560, case["max_length"], hd_num=case["hd_num"])
    ds.draw = torch.tensor([[0, j] for j in range(len(files[0].conversations))]).numpy()
    return ds


def _official(row: dict) -> tuple[list[int], list[int], list[int]]:
    n = row["valid_len"]
    return row["input_ids_image_as_-1"][:n], row["labels"][:n], row["im_mask"][:n]


def _ours(ds: XComposerDataset, i: int) -> tuple[list[int], list[int], list[int]]:
    _, enc = ds.encode(i)
    return enc.input_ids, enc.labels, [int(m) for m in enc.image_mask]


def _bos_to_front(values: list[int], bos_at: int) -> list[int]:
    """The official one-image-no-placeholder row with its BOS (after the image) moved to the front."""
    return [values[bos_at], *values[:bos_at], *values[bos_at + 1 :]]


def _bos_after_image(item: dict, span: int) -> dict:
    """Our item laid out as the official code does it: the image first, then BOS (for its recorded loss)."""
    order = torch.cat([torch.arange(1, 1 + span), torch.tensor([0]), torch.arange(1 + span, item["input_ids"].shape[0])])
    return {
        **item,
        "input_ids": item["input_ids"][order],
        "labels": item["labels"][order],
        "image_mask": item["image_mask"][order],
    }


def _loss(model, batch: dict) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


EXACT = ["p01", "p06", "p07"]


BOS_MOVED = ["p04", "p05", "p08", "p09", "p10", "p12"]


@pytest.mark.parametrize("name", EXACT)
def test_exact_cases_ids_labels_masks_and_loss(name, cases_hd, model_and_tokenizer, fixture_2d5_dir, tmp_path):
    model, tok = model_and_tokenizer
    case = cases_hd[name]
    ds = _dataset(tmp_path, fixture_2d5_dir, case, tok)
    row = case["rows"][0]
    assert _ours(ds, 0) == _official(row)
    item = ds[0]
    if "images" in row:
        assert item["image_grids"].tolist() == [im["crop_grid_hw"] for im in row["images"]]
        assert int(item["image_mask"].sum()) == sum(im["tokens"] for im in row["images"])
    loss = _loss(model, DataCollator(ds.pad_token_id)([item]))
    assert loss == pytest.approx(case["loss"], rel=LOSS_RTOL)


@pytest.mark.parametrize("name", BOS_MOVED)
def test_one_image_without_placeholder_puts_bos_first(name, cases_hd, model_and_tokenizer, fixture_2d5_dir, tmp_path):
    """Deliberate difference: ``<s>``, image, text. Same ids as official with BOS moved to the front;
    the official layout rebuilt from our item reproduces the recorded loss (pixels, grids, labels)."""
    model, tok = model_and_tokenizer
    case = cases_hd[name]
    ds = _dataset(tmp_path, fixture_2d5_dir, case, tok)
    items = []
    for i, row in enumerate(case["rows"]):
        ((start, span),) = row["image_spans_[start,len]"]
        assert start == 0
        ids, labels, mask = _official(row)
        assert ids[span] == tok.bos_token_id
        assert _ours(ds, i) == (_bos_to_front(ids, span), _bos_to_front(labels, span), _bos_to_front(mask, span))
        item = ds[i]
        assert item["image_grids"].tolist() == [row["images"][0]["crop_grid_hw"]]
        items.append(_bos_after_image(item, span))
    loss = _loss(model, DataCollator(ds.pad_token_id)(items))
    assert loss == pytest.approx(case["loss"], rel=LOSS_RTOL)


def test_text_inner_batch_trains_every_sample(cases_hd, model_and_tokenizer, fixture_2d5_dir, tmp_path):
    """Deliberate difference: the official collator trains only the first text of an inner batch; we train both."""
    model, tok = model_and_tokenizer
    case = cases_hd["p03"]
    ds = _dataset(tmp_path, fixture_2d5_dir, case, tok)
    assert len(ds) == 2
    assert _ours(ds, 0) == _official(case["rows"][0])
    assert "image_grids" not in ds[0] or ds[0]["image_grids"].shape == (0, 2)
    collate = DataCollator(ds.pad_token_id)
    assert _loss(model, collate([ds[0]])) == pytest.approx(case["loss"], rel=LOSS_RTOL)
    both = collate([ds[0], ds[1]])
    assert int((both["labels"] != IGNORE_INDEX).sum()) > case["num_target_tokens"]


def test_text_truncated_in_user_turn_masks_by_role(cases_hd, model_and_tokenizer, fixture_2d5_dir, tmp_path):
    """p02: same ids; the official path keeps the ``\\n`` after the last complete answer trained, we do not."""
    _, tok = model_and_tokenizer
    case = cases_hd["p02"]
    ds = _dataset(tmp_path, fixture_2d5_dir, case, tok)
    ids, labels, mask = _official(case["rows"][0])
    o_ids, o_labels, o_mask = _ours(ds, 0)
    assert (o_ids, o_mask) == (ids, mask)
    diff = [k for k, (a, b) in enumerate(zip(o_labels, labels)) if a != b]
    assert len(diff) == 1 and labels[diff[0]] == tok.encode_text("\n")[0] and o_labels[diff[0]] == IGNORE_INDEX
    assert labels[diff[0] - 1] == tok.turn_end_id


def test_truncation_never_splits_an_image(cases_hd, model_and_tokenizer, fixture_2d5_dir, tmp_path):
    """p11: the official run cuts inside the image at 600; we end the sample before the image."""
    _, tok = model_and_tokenizer
    case = cases_hd["p11"]
    ds = _dataset(tmp_path, fixture_2d5_dir, case, tok)
    ids, labels, _ = _official(case["rows"][0])
    ((start, _),) = case["rows"][0]["image_spans_[start,len]"]
    _, enc = ds.encode(0)
    assert enc.truncated and enc.num_images == 0 and enc.dropped_images == 1 and len(enc) == start
    assert enc.input_ids == ids[:start]
    diff = [k for k, (a, b) in enumerate(zip(enc.labels, labels[:start])) if a != b]
    assert len(diff) == 1 and enc.labels[diff[0]] == IGNORE_INDEX and labels[diff[0] - 1] == tok.turn_end_id
    item = ds[0]
    assert item["pixel_values"].shape[0] == 0 and item["image_grids"].shape == (0, 2)


def test_system_turn_is_a_system_turn(cases_hd, model_and_tokenizer, fixture_2d5_dir, tmp_path):
    """p13: the official path renders ``system`` as an assistant turn and trains by parity; we keep the role
    and train only the answer."""
    _, tok = model_and_tokenizer
    case = cases_hd["p13"]
    ds = _dataset(tmp_path, fixture_2d5_dir, case, tok)
    ids, _, _ = _official(case["rows"][0])
    o_ids, o_labels, _ = _ours(ds, 0)
    system_header = tok.encode_text("system\n")
    assistant_header = tok.encode_text("assistant\n")
    assert o_ids == ids[:2] + system_header + ids[2 + len(assistant_header) :]
    trained = [i for i, lab in zip(o_ids, o_labels) if lab != IGNORE_INDEX]
    assert trained == [*tok.encode_text("Four.[UNUSED_TOKEN_145]"), tok.eos_token_id]


def test_grids_come_from_headers_without_decoding(cases_hd, fixture_2d5_dir, monkeypatch, model_and_tokenizer, tmp_path):
    """Lengths (and so check-data, grouping, packing) need no pixel decode: only the image header is read."""
    import PIL.ImageFile

    _, tok = model_and_tokenizer
    decoded: list[str] = []
    original = PIL.ImageFile.ImageFile.load

    def spy(self):
        decoded.append(getattr(self, "filename", "?"))
        return original(self)

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", spy)
    case = cases_hd["p07"]
    files = read_data(_write_case(tmp_path, fixture_2d5_dir, case), tok, 560, 16384, given_num=False, hd_num=18)
    assert decoded == []
    assert list(files[0].grids) == [[tuple(im["crop_grid_hw"]) for im in case["rows"][0]["images"]]]
    assert files[0].lengths.tolist() == [case["rows"][0]["valid_len"]]


@pytest.mark.parametrize(("hd", "grid"), [(6, (2, 3)), (18, (3, 4)), (1, (1, 1))])
def test_hd_num_changes_grids_and_lengths(cases_hd, model_and_tokenizer, fixture_2d5_dir, tmp_path, hd, grid):
    _, tok = model_and_tokenizer
    case = cases_hd["p08"]  # 1500x1000: 2x3 at hd 6, 3x4 at hd 18, 1x1 at hd 1
    path = _write_case(tmp_path, fixture_2d5_dir, case)
    files = read_data(path, tok, 560, 16384, given_num=False, hd_num=hd)
    assert list(files[0].grids) == [[grid]]
    text_len = case["rows"][0]["valid_len"] - case["rows"][0]["images"][0]["tokens"]
    assert files[0].lengths.tolist() == [text_len + ImageSpec(560, hd).slots(grid)]


def _mixed_items(cases_hd, fixture_2d5_dir, tok, tmp_path) -> list[dict]:
    """Four items: 1x1 + 2x2 images (p07), a 1x4 image (p10 row 1), text (p01), a 1x1 image (p05)."""
    picks = [("p07", 0), ("p10", 1), ("p01", 0), ("p05", 0)]
    return [_dataset(tmp_path, fixture_2d5_dir, cases_hd[n], tok)[i] for n, i in picks]


def _sample_losses(model, batch: dict) -> tuple[list[float], list[int]]:
    """Per row: summed token loss and supervised count (the head runs only where a label is set)."""
    sums, counts = model.sample_losses(**batch)
    return sums.tolist(), counts.tolist()


def test_batched_and_packed_losses_equal_per_sample_losses(cases_hd, model_and_tokenizer, fixture_2d5_dir, tmp_path):
    model, tok = model_and_tokenizer
    items = _mixed_items(cases_hd, fixture_2d5_dir, tok, tmp_path)
    pad = tok.pad_token_id
    collate = DataCollator(pad)
    sums, counts = [], []
    for it in items:
        s, n = _sample_losses(model, collate([it]))
        sums += s
        counts += n
    assert all(n > 0 for n in counts)

    batch = collate(items)
    assert batch["image_grids"].tolist() == [[1, 1], [2, 2], [1, 4], [1, 1]]
    assert batch["image_counts"].tolist() == [2, 1, 0, 1]
    assert batch["pixel_values"].shape[0] == (1 + 1) + (1 + 4) + (1 + 4) + (1 + 1)
    row_sums, row_counts = _sample_losses(model, batch)
    assert row_counts == counts
    for s, ref in zip(row_sums, sums):
        assert s == pytest.approx(ref, rel=LOSS_RTOL)

    packed = PackingCollator(pad)([concat_items(items[:2]), concat_items(items[2:])])
    assert "attention_mask" not in packed
    assert packed["image_grids"].tolist() == [[1, 1], [2, 2], [1, 4], [1, 1]]
    assert packed["image_counts"].tolist() == [3, 1]
    row_sums, row_counts = _sample_losses(model, packed)
    assert row_counts == [counts[0] + counts[1], counts[2] + counts[3]]
    assert sum(row_sums) / sum(row_counts) == pytest.approx(sum(sums) / sum(counts), rel=LOSS_RTOL)
    assert row_sums[0] == pytest.approx(sums[0] + sums[1], rel=LOSS_RTOL)


# --------------------------------------------------------------------------- InternLM-XComposer-2.5: lengths without decoding, unusable images


def test_hd_lengths_and_bad_images(tmp_path, tiny25_base, hd_data, noise_image):
    from xcft.errors import DataError
    from xcft.model.loading import load_tokenizer

    tok = load_tokenizer(tiny25_base)
    ds = build_dataset(hd_data, tok, 224, 1024, given_num=False, hd_num=4)
    for i in range(len(ds)):  # lengths (grouping, packing) are the lengths of the items, without decoding
        assert ds.lengths[i] == ds[i]["input_ids"].shape[0]
        assert int(ds[i]["image_mask"].sum()) == sum(ds.image_spec.slots(g) for g in ds[i]["image_grids"].tolist())
    thin = noise_image(tmp_path / "thin.png", (3000, 1), 5)  # aspect ratio beyond what the HD transform handles
    data = tmp_path / "bad.json"
    data.write_text(
        json.dumps(
            [{"id": "x", "image": thin, "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "ho"}]}]
        )
    )
    with pytest.raises(DataError, match=r"sample 0 \(id 'x'\): image .*thin.png cannot be used: .*too elongated"):
        build_dataset(data, tok, 224, 1024, given_num=False, hd_num=4)

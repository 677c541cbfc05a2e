"""The inputs of a training run (xcft.train.inputs): vision-aligned batches for ZeRO/FSDP."""

from __future__ import annotations

import pytest
import torch

from xcft.data.dataset import DataCollator, build_dataset
from xcft.train.inputs import vision_aligned


def test_vision_aligned_batch_has_a_1x1_blank_image(tiny25_base, hd_data):
    base = tiny25_base
    from xcft.model.loading import load_pretrained

    model, tok = load_pretrained(base, dtype="float32", device="cpu")
    ds = build_dataset(hd_data, tok, 224, 1024, given_num=False, hd_num=4)
    text = next(i for i in range(len(ds)) if ds.conversation(i).id == "text")
    items = [ds[text], ds[text]]
    plain = DataCollator(ds.pad_token_id)(items)
    assert plain["pixel_values"] is None and plain["image_grids"] is None
    aligned = vision_aligned(DataCollator(ds.pad_token_id), model.config, ds.pad_token_id)(items)
    assert aligned["image_grids"].tolist() == [[1, 1]] and aligned["pixel_values"].shape == (2, 3, 224, 224)
    assert int(aligned["image_mask"].sum()) == model.config.hd_image_tokens(1, 1) == 145
    with torch.no_grad():
        a, b = model(**plain).loss, model(**aligned).loss
    assert float(a) == pytest.approx(float(b), rel=1e-6)

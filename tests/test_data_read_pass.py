"""The read pass training and check-data share (xcft.data.read_pass): the same samples, lengths,
skips and draws whichever way it is read, plain per-sample records, every problem collected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from xcft.data.check import load_settings, run_check
from xcft.data.dataset import read_data
from xcft.data.encode import ImageSpec
from xcft.data.read_pass import read_pass
from xcft.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.mark.parametrize("max_length", [160, 40])
def test_check_data_and_training_count_the_same_samples(tiny_data: Path, tiny_base: Path, max_length: int):
    settings = load_settings(tiny_base, None, max_length)
    result = run_check(tiny_data, settings)
    training = read_data(tiny_data, settings.tokenizer, settings.img_size, max_length) if result.ok else None
    if training is None:  # 40 tokens leave a file with nothing to train: both refuse it
        with pytest.raises(DataError, match="no sample of this file keeps a supervised token"):
            read_data(tiny_data, settings.tokenizer, settings.img_size, max_length)
        return
    assert [f.display for f in training] == [r.display for r in result.files]
    for report, fd in zip(result.files, training):
        assert (report.usable, report.drawn_per_epoch, report.skipped) == (len(fd.conversations), fd.draw_count, fd.skipped)
        assert report.lengths == fd.lengths.tolist()


def _sample(i: int, image: str | None, answer: str = "yes") -> dict:
    convs = [{"from": "user", "value": ("<ImageHere>" if image else "") + "Is it red?"}, {"from": "assistant", "value": answer}]
    return {"id": str(i), **({"image": [image]} if image else {}), "conversations": convs}


def test_records_and_problems_are_plain_data(tok, tmp_path: Path):
    Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([_sample(0, "red.png"), _sample(1, "broken.png"), _sample(2, None), {"id": "3"}]))
    spec = ImageSpec(28)
    checked = read_pass(data, tok, spec, 128, decode_images=True)
    (fs,) = checked.files
    assert [(r.index, r.encoded, r.usable) for r in fs.records] == [
        (0, True, True),
        (1, False, False),
        (2, True, True),
        (3, False, False),
    ]
    assert fs.records[0].image_tokens == [spec.slots()] and fs.records[0].length > spec.slots()
    assert fs.records[3].conversation is None and fs.draw_count == 2  # given_num: every usable sample once
    assert sorted(p.index for p in checked.errors) == [1, 3]
    # without decoding, a 2.0 data set's images are not opened (training decodes them per item)
    fast = read_pass(data, tok, spec, 128)
    assert [p.index for p in fast.errors] == [3] and fast.files[0].records[1].usable

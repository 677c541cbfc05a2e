"""The demo's synthetic data: official format, learnable only from pixels, balanced held-out set."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xcft.commands.demo.scoring import chance_levels
from xcft.commands.demo.synthetic import COLOURS, QUESTIONS, SHAPES, draw_shape, generate_dataset, read_heldout
from xcft.train.answer_metrics import first_word


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory):
    return generate_dataset(tmp_path_factory.mktemp("demo-data"), n_single=40, n_compare=10, n_text=8, n_heldout=16, img_size=112)


def test_files_follow_the_official_layout(demo_data) -> None:
    root = demo_data.root
    lines = demo_data.data_txt.read_text().split()
    assert lines == ["shapes.json", "0.04", "compare.json", "0.01", "text.json", "0.008"]  # counts in thousands
    shapes = json.loads((root / "shapes.json").read_text())
    assert len(shapes) == 40
    s = shapes[0]
    assert set(s) == {"id", "image", "conversations"} and len(s["image"]) == 1
    assert [t["from"] for t in s["conversations"]] == ["user", "assistant"]
    assert s["conversations"][0]["value"].startswith("<ImageHere>")
    answers = [x["conversations"][1]["value"] for x in shapes]
    assert set(answers[0::2]) <= set(COLOURS) and set(answers[1::2]) <= set(SHAPES)
    compare = json.loads((root / "compare.json").read_text())
    assert all(len(c["image"]) == 2 and c["conversations"][0]["value"].count("<ImageHere>") == 2 for c in compare)
    assert {c["conversations"][1]["value"] for c in compare} <= {"yes", "no"}
    text = json.loads((root / "text.json").read_text())
    assert all("image" not in t and "<ImageHere>" not in t["conversations"][0]["value"] for t in text)
    for sample in shapes + compare:  # image paths are relative to the folder of data.txt
        for p in sample["image"]:
            assert (root / p).is_file() and not Path(p).is_absolute()


def test_questions_never_reveal_the_answer(demo_data) -> None:
    samples = json.loads((demo_data.root / "shapes.json").read_text())
    questions = {t["value"].replace("<ImageHere>", "") for s in samples for t in s["conversations"][0::2]}
    assert questions == {QUESTIONS["colour"], QUESTIONS["shape"]}


def test_heldout_is_balanced_fresh_and_readable(demo_data) -> None:
    qas = demo_data.heldout
    colour = [q.answer for q in qas if q.kind == "colour"]
    shape = [q.answer for q in qas if q.kind == "shape"]
    assert len(colour) == len(shape) == 16
    assert max(colour.count(c) for c in COLOURS) - min(colour.count(c) for c in COLOURS) <= 1
    assert len(set(shape)) == len(SHAPES)
    train_images = {p for s in json.loads((demo_data.root / "shapes.json").read_text()) for p in s["image"]}
    assert not {Path(p).name for q in qas for p in q.images} & {Path(p).name for p in train_images}
    assert sorted(read_heldout(demo_data.heldout_txt), key=lambda q: q.id) == sorted(qas, key=lambda q: q.id)
    blank = read_heldout(demo_data.heldout_blank)
    assert [q.answer for q in blank] == colour and all(
        np.asarray(Image.open(p)).reshape(-1, 3).std(axis=0).max() == 0 for q in blank for p in q.images
    )
    assert {q.kind for q in qas} == {"colour", "shape", "compare", "text"}


def test_loads_through_the_training_data_path(demo_data, tmp_path: Path) -> None:
    from xcft.data.dataset import build_dataset
    from xcft.data.spm_builder import build_tokenizer
    from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

    tok = InternLM2Tokenizer.from_model_file(build_tokenizer(tmp_path))
    ds = build_dataset(demo_data.data_txt, tok, img_size=112, max_length=512)
    assert len(ds) == 40 + 10 + 8
    kinds = {}
    for i in range(len(ds)):
        kinds.setdefault(ds.conversation(i).images.__len__(), i)
    assert set(kinds) == {0, 1, 2}
    for n_images, i in kinds.items():
        item = ds[i]
        assert item["pixel_values"].shape[0] == n_images
        assert int(item["image_mask"].sum()) == n_images * (112 // 14) ** 2
    supervised = [int(t) for t in ds[kinds[1]]["labels"] if t >= 0]
    # a colour or shape answer is one piece, then the turn end, then EOS
    assert len(supervised) == 3
    assert tok.decode(supervised[0:1]) in set(COLOURS) | set(SHAPES)


def test_drawn_colour_is_where_the_shape_is() -> None:
    rng = random.Random(3)
    for colour in COLOURS:
        img = np.asarray(draw_shape(colour, "square", rng, 112), dtype=np.float32)
        # the square covers the pixels that differ most from the grey background
        grey = np.abs(img - img.mean(axis=2, keepdims=True)).sum(axis=2)
        target = np.array(COLOURS[colour], dtype=np.float32)
        dist = np.abs(img - target).sum(axis=2)
        assert (dist < 60).mean() > 0.1, colour  # a sizeable area has (about) the named colour
        if colour not in ("white", "black"):
            assert grey.max() > 100
    a = np.asarray(draw_shape("red", "circle", random.Random(1), 112))
    b = np.asarray(draw_shape("red", "circle", random.Random(2), 112))
    assert not np.array_equal(a, b)  # jitter: position, size, noise


def test_blank_control_images_carry_no_information(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path, n_single=6, n_compare=0, n_text=0, n_heldout=2, img_size=56, blank_train_images=True)
    arrays = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "images").glob("train_*"))]
    assert len(arrays) == 6 and all(np.array_equal(arrays[0], a) for a in arrays)
    assert np.asarray(Image.open(data.heldout[0].images[0])).std() > 10  # held-out stays real


def test_first_word_and_chance() -> None:
    assert first_word("Red.") == "red"
    assert first_word("  blue circle") == "blue"
    assert first_word("") == ""
    assert first_word("?!") == ""
    assert chance_levels()["colour"] == pytest.approx(1 / len(COLOURS))


def test_shape_fraction_sets_the_share_of_shape_questions(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path, n_single=30, n_compare=0, n_text=0, n_heldout=4, img_size=56, shape_fraction=2 / 3)
    kinds = [s["id"].split("-")[0] for s in json.loads(data.train_files["shapes"].read_text())]
    assert kinds.count("shape") == 20 and kinds.count("colour") == 10
    assert kinds[:3] == ["colour", "shape", "shape"]  # interleaved, not blocked
    with pytest.raises(ValueError, match="shape_fraction"):
        generate_dataset(tmp_path / "bad", n_single=2, n_compare=0, n_text=0, n_heldout=1, shape_fraction=1.5)


def test_ring_and_line_are_drawn_as_named() -> None:
    """ring: hollow centre; square: filled centre; line: empty above and below its stripe."""

    def centre(shape: str) -> np.ndarray:
        img = np.asarray(draw_shape("white", shape, random.Random(3), 112, noise=0.0, jitter=0.0), dtype=np.float32)
        return img[..., 0]

    sq, ring, line = centre("square"), centre("ring"), centre("line")
    assert sq[56, 56] > 200 and ring[56, 56] < 160 and ring[56, 56 - 33] > 200
    assert line[56, 56] > 200 and line[56 - 20, 56] < 160 and sq[56 - 20, 56] > 200

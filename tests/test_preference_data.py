"""Preference data: both record forms, data.txt mixtures, the problems a pair can have, encoding and batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from xcft.data.encode import IGNORE_INDEX, ImageSpec
from xcft.data.pairs import encode_pair, read_pair_file
from xcft.data.preference import PairCollator, PreferenceDataset, read_pair_data
from xcft.errors import DataError


def _write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture()
def pair_dir(tmp_path: Path) -> Path:
    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "red.png")
    Image.new("RGB", (30, 50), (20, 20, 200)).save(tmp_path / "blue.png")
    official = [
        {
            "id": 0,
            "image": "red.png",
            "conversations_a": [{"from": "human", "value": "What colour is it?"}, {"from": "bot", "value": "Red."}],
            "conversations_b": [{"from": "human", "value": "What colour is it?"}, {"from": "bot", "value": "Green."}],
            "turn": 1,
            "language": "en",
            "model_a": "x",
            "model_b": "y",
        },
        {
            "id": 1,
            "image": ["blue.png"],
            "conversations_a": [
                {"from": "human", "value": "<ImageHere>Hi"},
                {"from": "bot", "value": "Hello."},
                {"from": "human", "value": "Colour?"},
                {"from": "bot", "value": "Blue."},
            ],
            "conversations_b": [
                {"from": "human", "value": "<ImageHere>Hi"},
                {"from": "bot", "value": "Hello."},
                {"from": "human", "value": "Colour?"},
                {"from": "bot", "value": "Yellow, I think."},
            ],
        },
    ]
    compact = [
        {"id": "c0", "conversations": [{"from": "user", "value": "Two plus two?"}], "chosen": "Four.", "rejected": "Five."},
        {
            "id": "c1",
            "image": "red.png",
            "conversations": [{"from": "user", "value": "Shape?"}],
            "chosen": "A box.",
            "rejected": "A ball.",
        },
    ]
    _write(tmp_path / "official.json", official)
    (tmp_path / "compact.jsonl").write_text("\n".join(json.dumps(r) for r in compact), encoding="utf-8")
    (tmp_path / "data.txt").write_text("official.json 0.002\ncompact.jsonl 0.001\n", encoding="utf-8")
    return tmp_path


def test_both_forms_read_into_pairs(pair_dir: Path) -> None:
    pairs, problems = read_pair_file(pair_dir / "official.json")
    assert [p.level for p in problems] == ["info"]  # the lone image without placeholder is placed, and said so
    assert [p.id for p in pairs] == ["0", "1"]
    first = pairs[0]
    assert first.chosen.messages[-1].text == "Red." and first.rejected.messages[-1].text == "Green."
    assert first.chosen.messages[:-1] == first.rejected.messages[:-1]
    assert first.images == [pair_dir / "red.png"]
    pairs, problems = read_pair_file(pair_dir / "compact.jsonl")
    assert not [p for p in problems if p.level != "info"]
    assert pairs[0].chosen.messages[-1].role == "assistant" and pairs[0].rejected.messages[-1].text == "Five."


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {
                "conversations_a": [{"from": "human", "value": "A?"}, {"from": "bot", "value": "x"}],
                "conversations_b": [{"from": "human", "value": "B?"}, {"from": "bot", "value": "y"}],
            },
            "prompts of conversations_a and conversations_b differ at turn 0",
        ),
        ({"conversations_a": [{"from": "human", "value": "A?"}, {"from": "bot", "value": "x"}]}, '"conversations_b" is missing'),
        ({"conversations": [{"from": "user", "value": "A?"}], "chosen": "x", "rejected": ""}, "rejected: the answer is empty"),
        (
            {
                "conversations": [{"from": "user", "value": "A?"}, {"from": "assistant", "value": "x"}],
                "chosen": "y",
                "rejected": "z",
            },
            "must end with the user turn",
        ),
        ({"conversations": [{"from": "user", "value": "A?"}], "chosen": 3, "rejected": "z"}, '"chosen" must be the answer text'),
        (
            {
                "conversations_a": [{"from": "human", "value": "A?"}],
                "conversations_b": [{"from": "human", "value": "A?"}],
            },
            "conversations_a: the conversation has no assistant answer",
        ),
    ],
)
def test_pair_problems_are_named(tmp_path: Path, record: dict, message: str) -> None:
    path = _write(tmp_path / "bad.json", [record])
    pairs, problems = read_pair_file(path)
    assert pairs == [None]
    errors = [str(p) for p in problems if p.level == "error"]
    assert any(message in e for e in errors), errors
    assert all(e.startswith(f"{path}: sample 0") for e in errors)


def test_sft_record_in_a_preference_file_is_reported(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mixed.json",
        [
            {"conversations": [{"from": "user", "value": "A?"}], "chosen": "x", "rejected": "y"},
            {"id": "s", "conversations": [{"from": "user", "value": "A?"}, {"from": "assistant", "value": "x"}]},
        ],
    )
    _, problems = read_pair_file(path)
    assert "sample 1 (id 's'): not a preference pair" in str(problems[0])


def test_equal_answers_warn_and_are_skipped(tmp_path: Path, tok) -> None:
    path = _write(
        tmp_path / "eq.json",
        [
            {"conversations": [{"from": "user", "value": "A?"}], "chosen": "same", "rejected": "same"},
            {"conversations": [{"from": "user", "value": "A?"}], "chosen": "yes", "rejected": "no"},
        ],
    )
    _, problems = read_pair_file(path)
    assert [p.level for p in problems] == ["warning"] and "equal" in problems[0].message
    files = read_pair_data(path, tok, 56, 160, given_num=False)
    assert len(files[0].conversations) == 1 and files[0].skipped == 1


def test_answer_cut_away_by_max_length_is_skipped(tmp_path: Path, tok) -> None:
    long_prompt = "word " * 200
    path = _write(
        tmp_path / "long.json",
        [
            {"conversations": [{"from": "user", "value": long_prompt}], "chosen": "yes", "rejected": "no"},
            {"conversations": [{"from": "user", "value": "short"}], "chosen": "yes", "rejected": "no"},
        ],
    )
    files = read_pair_data(path, tok, 56, 60, given_num=False)
    assert files[0].skipped == 1
    with pytest.raises(DataError, match="no pair of this file can be trained"):
        read_pair_data(_write(tmp_path / "only_long.json", [json.loads(path.read_text())[0]]), tok, 56, 60, given_num=False)


def test_only_the_last_answer_is_scored(pair_dir: Path, tok) -> None:
    pairs, _ = read_pair_file(pair_dir / "official.json")
    enc = encode_pair(pairs[1], tok, ImageSpec(56), 400)
    for side, answer in ((enc.chosen, "Blue."), (enc.rejected, "Yellow, I think.")):
        scored = [i for i in side.labels if i != IGNORE_INDEX]
        text = tok.decode(scored, skip_special_tokens=False)
        assert text.startswith(answer) and "Hello" not in text
        assert scored[-1] == tok.eos_token_id
    # the prompt (images included) is the same token for token
    n = len(enc.chosen.input_ids) - len([i for i in enc.chosen.labels if i != IGNORE_INDEX])
    assert enc.chosen.input_ids[:n] == enc.rejected.input_ids[:n]


def test_mixture_dataset_and_collator(pair_dir: Path, tok) -> None:
    files = read_pair_data(pair_dir / "data.txt", tok, 56, 200)
    assert [f.draw_count for f in files] == [2, 1]
    ds = PreferenceDataset(files, tok, 56, 200, seed=0)
    assert len(ds) == 3
    items = [ds[i] for i in range(len(ds))]
    batch = PairCollator(ds.pad_token_id)(items)
    n_img = [int(it["num_images"]) for it in items]
    assert batch["input_ids"].shape[0] == 6
    assert batch["pixel_values"].shape[0] == sum(n_img)  # each pair's images once
    assert batch["image_counts"].tolist() == n_img + n_img
    assert batch["image_index"].tolist() == list(range(sum(n_img))) * 2
    assert int(batch["image_mask"].sum()) == 16 * 2 * sum(n_img)


def test_2d5_pairs_carry_crop_grids(tmp_path: Path, tok) -> None:
    Image.new("RGB", (300, 200), (9, 9, 9)).save(tmp_path / "wide.png")
    path = _write(
        tmp_path / "p.json",
        [{"image": "wide.png", "conversations": [{"from": "user", "value": "What?"}], "chosen": "Dark.", "rejected": "Bright."}],
    )
    files = read_pair_data(path, tok, 224, 8192, given_num=False, hd_num=4)
    ds = PreferenceDataset(files, tok, 224, 8192, hd_num=4)
    item = ds[0]
    assert item["image_grids"].tolist() == [[2, 2]] and item["pixel_values"].shape[0] == 5
    batch = PairCollator(ds.pad_token_id)([item])
    assert batch["image_grids"].tolist() == [[2, 2]]
    assert batch["input_ids"][0, 1] == ds.pad_token_id  # <s>, then the image slots
    assert bool(batch["image_mask"][0, 1]) and bool(batch["image_mask"][1, 1])


def test_check_data_and_inspect_show_pairs(pair_dir: Path, tiny_base: Path, capsys) -> None:
    from xcft.cli import main

    records = json.loads((pair_dir / "official.json").read_text())
    records.append(
        {
            "id": "differs",
            "conversations_a": [{"from": "human", "value": "x"}, {"from": "bot", "value": "a"}],
            "conversations_b": [{"from": "human", "value": "y"}, {"from": "bot", "value": "b"}],
        }
    )
    records.append({"id": "long", "conversations": [{"from": "user", "value": "word " * 400}], "chosen": "a", "rejected": "b"})
    _write(pair_dir / "bad.json", records)
    capsys.readouterr()
    assert main(["check-data", str(pair_dir / "bad.json"), "--model", str(tiny_base)]) == 1
    out = capsys.readouterr().out
    assert "preference pairs (for --stage dpo or rm)" in out
    assert "ERROR " + str(pair_dir / "bad.json") + ": sample 2 (id 'differs'): the prompts of conversations_a" in out
    assert "sample 3 (id 'long'): the chosen answer is empty after truncation to max_length=160" in out
    assert main(["check-data", str(pair_dir / "data.txt"), "--model", str(tiny_base), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["preference"] is True and report["total"]["samples"] == 4
    assert main(["inspect", str(pair_dir / "data.txt"), "--model", str(tiny_base), "--id", "1"]) == 0
    out = capsys.readouterr().out
    assert "preference pair" in out and "«Blue.[UNUSED_TOKEN_145]</s>»" in out and "«Yellow, I think." in out
    assert "«Hello.»" not in out  # the shared earlier answer is prompt, not scored


def test_check_data_reports_pairs_mixed_with_sft_files(pair_dir: Path, tiny_base: Path, capsys) -> None:
    from xcft.cli import main

    _write(pair_dir / "sft.json", [{"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]}])
    (pair_dir / "mixed.txt").write_text("official.json 0.002\nsft.json 0.001\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["check-data", str(pair_dir / "mixed.txt"), "--model", str(tiny_base)]) == 1
    assert "mixes preference pairs (official.json) and SFT conversations (sft.json)" in capsys.readouterr().out

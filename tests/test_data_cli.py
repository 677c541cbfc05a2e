"""check-data, inspect and eval through xcft.cli.main: summaries, one line per problem, exit codes (2.0 and 2.5 models).

The official example data is checked against the official fixture folder (../shared); every
bad-input test uses a tiny model folder built on the spot (490-px images: 1225 slots each).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from xcft.cli import main
from xcft.model.image_processing_xcomposer2 import hd_image_tokens

OK_TURNS = [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_official_examples_check_clean(capsys, examples_dir: Path, fixture_dir: Path) -> None:
    rc, out, err = _run(capsys, "check-data", str(examples_dir / "data.txt"), "--model", str(fixture_dir))
    assert rc == 0, out + err
    assert "data/only_text_example.json" in out and "OK: training can start" in out
    assert "1225 slots per image" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("data/", "total"))}
    assert lines["data/only_text_example.json"][1:4] == ["2", "20", "0"]
    assert lines["data/single_turn_single_image_example.json"][1:4] == ["2", "10", "2"]
    assert lines["total"][1:4] == ["6", "40", "6"]
    assert out.count("NOTE") == 2 and "start of the first user turn" in out
    assert "Traceback" not in err


def test_official_examples_json(capsys, examples_dir: Path, fixture_dir: Path) -> None:
    rc, out, _ = _run(
        capsys,
        "check-data",
        str(examples_dir / "data.txt"),
        "--model",
        str(fixture_dir),
        "--format",
        "json",
        "--max-length",
        "3000",
    )
    obj = json.loads(out)
    assert rc == 0 and obj["ok"] and obj["errors"] == 0 and obj["max_length"] == 3000
    files = {f["file"]: f for f in obj["files"]}
    multi = files["data/multi_turn_multi_images_example.json"]
    assert multi["images"] == 4 and multi["tokens"]["max"] == 3000 and multi["truncated"] == 2
    assert obj["total"]["drawn_per_epoch"] == 40
    assert all(p["level"] == "info" for p in obj["problems"])


def test_file_with_nothing_trainable_is_an_error(capsys, examples_dir: Path, fixture_dir: Path) -> None:
    # at 2048 tokens the two images (2 x 1225 slots) before the first answer leave nothing to train
    rc, out, _ = _run(capsys, "check-data", str(examples_dir / "data.txt"), "--model", str(fixture_dir), "--max-length", "2048")
    assert rc == 1
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "multi_turn_multi_images_example.json line 3" in errors[0]
    assert out.count("WARNING") == 2 and "skipped in training" in out


def test_official_layout_mixture_check_and_inspect(capsys, tiny_data: Path, tiny_base: Path) -> None:
    """The same summary on a mixture built in tmp (16 slots per 56-px image, answers cut at 160 tokens)."""
    rc, out, err = _run(capsys, "check-data", str(tiny_data), "--model", str(tiny_base))
    assert rc == 0, out + err
    assert "OK: training can start" in out and "16 slots per image" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("data/", "total"))}
    assert lines["data/text.json"][1:4] == ["2", "20", "0"]
    assert lines["data/multi.json"][1:4] == ["2", "10", "4"]
    assert lines["total"][1:4] == ["6", "40", "6"]
    rc, out, _ = _run(capsys, "inspect", str(tiny_data), "--model", str(tiny_base), "--index", "4", "--format", "json")
    obj = json.loads(out)
    slots = [i for i, m in enumerate(obj["image_mask"]) if m]
    assert rc == 0 and len(slots) == 2 * 16 and all(obj["input_ids"][i] == -1 for i in slots)
    assert all(obj["labels"][i] == -100 for i in slots) and len(obj["input_ids"]) <= 160


def _write(tmp_path: Path, name: str, content) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, str):
        p.write_text(content, encoding="utf-8")
    else:
        p.write_text(json.dumps(content), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def model_dir(tiny_folder) -> Path:
    return tiny_folder(img_size=490, max_length=4096)


def _check(capsys, path: Path, model_dir: Path) -> tuple[int, str]:
    rc, out, err = _run(capsys, "check-data", str(path), "--model", str(model_dir))
    assert "Traceback" not in out + err
    return rc, out + err


BAD_CASES = {
    "unparsable": ("a.json", b'[{"conversations": [}]', "invalid JSON at line 1 column"),
    "top_level": ("a.json", {"conversations": OK_TURNS}, "single JSON object"),
    "missing_conv": ("a.json", [{"id": 1}], 'missing "conversations"'),
    "empty_conv": ("a.json", [{"conversations": []}], '"conversations" is empty'),
    "unknown_role": (
        "a.json",
        [{"conversations": [{"from": "narrator", "value": "q"}, {"from": "gpt", "value": "a"}]}],
        'unknown role "narrator"',
    ),
    "not_string": ("a.json", [{"conversations": [{"from": "user", "value": 3}, {"from": "gpt", "value": "a"}]}], "not a string"),
    "no_answer": ("a.json", [{"conversations": [{"from": "user", "value": "q"}]}], "no assistant answer"),
    "count_mismatch": (
        "a.json",
        [
            {
                "image": ["i.png"],
                "conversations": [{"from": "user", "value": "<ImageHere><ImageHere>"}, {"from": "gpt", "value": "a"}],
            }
        ],
        '2 "<ImageHere>" placeholder(s) but 1 image(s)',
    ),
    "llava": (
        "a.json",
        [{"image": "i.png", "conversations": [{"from": "user", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}],
        'replace "<image>" with "<ImageHere>"',
    ),
    "missing_image": ("a.json", [{"image": "nope.png", "conversations": OK_TURNS}], "looked in:"),
    "undecodable": ("a.json", [{"image": "broken.png", "conversations": OK_TURNS}], "cannot be decoded"),
    "not_utf8": ("a.json", '[{"id": "caf\u00e9", "conversations": []}]'.encode("latin-1"), "not UTF-8"),
    "empty_file": ("a.json", b"", "file is empty"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_input_kinds(kind: str, capsys, tmp_path: Path, model_dir: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    name, content, expected = BAD_CASES[kind]
    path = _write(tmp_path, name, content)
    rc, text = _check(capsys, path, model_dir)
    assert rc == 1
    assert expected in text
    assert "FAILED" in text
    errors = [line for line in text.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and str(path) in errors[0]


def test_bad_data_txt_line(capsys, tmp_path: Path, model_dir: Path) -> None:
    _write(tmp_path, "a.json", [{"conversations": OK_TURNS}])
    txt = _write(tmp_path, "data.txt", "# mix\na.json 0.001\na.json\nb.json 1\n")
    rc, text = _check(capsys, txt, model_dir)
    assert rc == 1
    errors = [line for line in text.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2
    assert "data.txt line 3" in errors[0] and "data.txt line 4" in errors[1] and "not found" in errors[1]


def test_forty_broken_samples_forty_lines(capsys, tmp_path: Path, model_dir: Path) -> None:
    good = {"conversations": OK_TURNS}
    bad = {"conversations": [{"from": "narrator", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = _write(tmp_path, "many.jsonl", "\n".join(json.dumps(bad if i % 2 else good) for i in range(80)))
    rc, text = _check(capsys, path, model_dir)
    errors = [line for line in text.splitlines() if line.startswith("ERROR")]
    assert rc == 1 and len(errors) == 40
    assert "sample 79 (id '79')" in errors[-1] and "line 80" in errors[-1]


def test_image_relative_to_json_folder_and_skipped_sample(capsys, tmp_path: Path, model_dir: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    Image.new("RGB", (8, 8)).save(sub / "pic.png")
    _write(
        sub,
        "d.json",
        [
            {
                "image": "pic.png",
                "conversations": [{"from": "user", "value": "<ImageHere> what?"}, {"from": "gpt", "value": "x"}],
            },
            {"conversations": OK_TURNS},
        ],
    )
    txt = _write(tmp_path, "data.txt", "sub/d.json 0.004\n")
    rc, out, _ = _run(capsys, "check-data", str(txt), "--model", str(model_dir), "--max-length", "300")
    assert rc == 0 and "OK" in out
    # at 300 tokens the image sample keeps nothing trainable: reported and skipped, not an error
    assert "WARNING" in out and "skipped in training" in out
    assert "1/2" in out


def test_inspect_text_and_json(capsys, examples_dir: Path, fixture_dir: Path) -> None:
    rc, out, _ = _run(capsys, "inspect", str(examples_dir / "data.txt"), "--model", str(fixture_dir), "--index", "2")
    assert rc == 0
    assert "<image 1: 1225 slots>" in out and "«No problem!" in out and "[UNUSED_TOKEN_145]</s>»" in out
    rc, out, _ = _run(
        capsys, "inspect", str(examples_dir / "data.txt"), "--model", str(fixture_dir), "--id", "1", "--format", "json"
    )
    obj = json.loads(out)
    assert rc == 0 and set(obj) == {"input_ids", "labels", "image_mask"}
    assert len(obj["input_ids"]) == len(obj["labels"]) == len(obj["image_mask"])
    assert obj["input_ids"][0] == 1 and -1 not in obj["input_ids"]  # id '1' first found in the text-only file
    rc, out, _ = _run(
        capsys, "inspect", str(examples_dir / "data.txt"), "--model", str(fixture_dir), "--index", "4", "--format", "json"
    )
    obj = json.loads(out)
    slots = [i for i, m in enumerate(obj["image_mask"]) if m]
    assert len(slots) == 2 * 1225 and all(obj["input_ids"][i] == -1 for i in slots)
    assert all(obj["labels"][i] == -100 for i in slots)


def test_inspect_errors(capsys, tmp_path: Path, tiny_data: Path, model_dir: Path) -> None:
    rc, _, err = _run(capsys, "inspect", str(tiny_data), "--model", str(model_dir), "--index", "99")
    assert rc == 1 and "no sample with index 99" in err
    path = _write(tmp_path, "a.json", [{"conversations": OK_TURNS}, {"conversations": [{"from": "x", "value": "q"}]}])
    rc, _, err = _run(capsys, "inspect", str(path), "--model", str(model_dir), "--index", "1")
    assert rc == 1 and 'unknown role "x"' in err
    rc, _, err = _run(capsys, "check-data", str(path), "--model", str(tmp_path))
    assert rc == 1 and "no tokenizer.model" in err


# --------------------------------------------------------------------------- InternLM-XComposer-2.5 models: --hd-num, crop grids, token counts; --hd-num on a 2.0 model


TRAIN_CPU = ["--use_cpu", "true", "--report_to", "none"]


def _image_tokens(examples_dir: Path, name: str, hd_num: int) -> list[int]:
    samples = json.loads((examples_dir / "data" / name).read_text())
    out = []
    for s in samples:
        images = s.get("image", [])
        for im in [images] if isinstance(images, str) else images:
            with Image.open(examples_dir / im) as img:
                out.append(hd_image_tokens(*img.size, hd_num)[1])
    return out


def test_check_data_reports_hd_tokens_and_overlong_samples(capsys, examples_dir: Path, fixture_2d5_dir: Path) -> None:
    data = str(examples_dir / "data.txt")
    rc, out, err = _run(
        capsys, "check-data", data, "--model", str(fixture_2d5_dir), "--format", "json", "--hd-num", "2", "--max-length", "4000"
    )
    obj = json.loads(out)
    assert rc == 0, out + err
    assert obj["family"] == "2.5" and obj["hd_num"] == 2 and obj["img_size"] == 560 and obj["slots_per_image"] is None
    files = {f["file"]: f for f in obj["files"]}
    for name in ("single_turn_single_image_example.json", "multi_turn_multi_images_example.json"):
        tokens = sorted(_image_tokens(examples_dir, name, 2))
        stats = files[f"data/{name}"]["image_tokens"]
        assert (stats["min"], stats["max"]) == (tokens[0], tokens[-1])
    assert files["data/only_text_example.json"]["image_tokens"]["min"] is None
    # the two multi-image samples have 3901 and 4585 tokens: one exceeds 4000
    assert files["data/multi_turn_multi_images_example.json"]["tokens"]["max"] == 4000
    assert files["data/multi_turn_multi_images_example.json"]["over_max_length"] == 1
    assert files["data/single_turn_single_image_example.json"]["over_max_length"] == 0
    assert obj["total"]["over_max_length"] == 1

    rc, out, _ = _run(capsys, "check-data", data, "--model", str(fixture_2d5_dir))
    assert rc == 0 and "hd_num 18" in out and "image tokens min/median/max" in out and "max_length 16384" in out


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["check-data", "{data}", "--model", "{model}", "--hd-num", "6"], "--hd-num"),
        (["inspect", "{data}", "--model", "{model}", "--hd-num", "6", "--index", "0"], "--hd-num"),
        (["eval", "{data}", "--model", "{model}", "--hd-num", "6"], "--hd-num"),
        (
            [
                "train",
                "--model_name_or_path",
                "{model}",
                "--data_path",
                "{data}",
                "--output_dir",
                "{out}",
                "--hd_num",
                "6",
                *TRAIN_CPU,
            ],
            "--hd_num",
        ),
    ],
    ids=["check-data", "inspect", "eval", "train"],
)
def test_hd_num_is_an_error_for_a_2_0_model(capsys, tmp_path, examples_dir: Path, fixture_dir: Path, argv, flag) -> None:
    """One rule in every command: a 2.0 model sees one fixed-size view, so --hd-num is refused, not ignored."""
    values = {"data": str(examples_dir / "data.txt"), "model": str(fixture_dir), "out": str(tmp_path / "out")}
    rc, _, err = _run(capsys, *(a.format(**values) for a in argv))
    assert rc == 1 and f"{flag} 6: " in err and "(2.0) model" in err and f"{flag} applies to 2.5 models only" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_inspect_shows_grids_and_json_fields(capsys, examples_dir: Path, fixture_2d5_dir: Path) -> None:
    data = str(examples_dir / "data.txt")
    rc, out, _ = _run(capsys, "inspect", data, "--model", str(fixture_2d5_dir), "--index", "2")
    assert rc == 0
    panda = _image_tokens(examples_dir, "single_turn_single_image_example.json", 18)[0]
    assert f"<s><image 1: 1×1 crops, {panda} slots>[UNUSED_TOKEN_146]user" in out

    rc, out, _ = _run(
        capsys,
        "inspect",
        data,
        "--model",
        str(fixture_2d5_dir),
        "--index",
        "4",
        "--format",
        "json",
        "--max-length",
        "3000",
        "--hd-num",
        "1",
    )
    obj = json.loads(out)
    assert rc == 0 and set(obj) == {"input_ids", "labels", "image_mask"}
    assert len(obj["input_ids"]) <= 3000 and sum(obj["image_mask"]) == 2 * 841  # hd 1: two 1x1 images
    assert all(i == -1 for i, m in zip(obj["input_ids"], obj["image_mask"]) if m)


def test_eval_loss_equals_the_official_loss(capsys, tmp_path: Path, fixture_2d5_dir: Path) -> None:
    """p06 (no deliberate difference): xcft eval gives the recorded official loss."""
    case = next(c for c in json.loads((fixture_2d5_dir / "cases.json").read_text())["cases"] if c["name"].startswith("p06"))
    sample = dict(
        case["conversations"][0], image=[str(fixture_2d5_dir / "images" / n) for n in case["conversations"][0]["image"]]
    )
    data = tmp_path / "p06.json"
    data.write_text(json.dumps([sample]))
    rc, out, _ = _run(
        capsys,
        "eval",
        str(data),
        "--model",
        str(fixture_2d5_dir),
        "--format",
        "json",
        "--max-length",
        "4000",
        "--hd-num",
        "18",
        "--device",
        "cpu",
    )
    obj = json.loads(out)
    assert rc == 0 and obj["num_samples"] == 1 and obj["max_length"] == 4000
    assert obj["samples"][0]["tokens"] == case["num_target_tokens"]
    assert obj["mean_loss"] == pytest.approx(case["loss"], rel=1e-5)


@pytest.mark.parametrize(("value", "status", "drawn"), [("true", 0, 40), ("false", 1, 0), ("0", 1, 0)])
def test_given_num_takes_true_or_false(capsys, tiny_data: Path, tiny_base: Path, value: str, status: int, drawn: int) -> None:
    """--given-num true: the numbers (0.01, 0.02) are thousands of samples; false: ratios of each file (nothing drawn)."""
    rc, out, _ = _run(capsys, "check-data", str(tiny_data), "--model", str(tiny_base), "--given-num", value, "--format", "json")
    assert rc == status and json.loads(out)["total"]["drawn_per_epoch"] == drawn


def test_given_num_refuses_other_words(capsys, tiny_data: Path, tiny_base: Path) -> None:
    with pytest.raises(SystemExit):
        main(["check-data", str(tiny_data), "--model", str(tiny_base), "--given-num", "maybe"])
    assert "'maybe' is not true or false" in capsys.readouterr().err

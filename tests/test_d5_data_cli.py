"""check-data, inspect and eval with an InternLM-XComposer-2.5 model: --hd-num, crop grids, token counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from xcft.cli import main
from xcft.model.image_processing_xcomposer2 import hd_image_tokens

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TRAIN_CPU = ["--use_cpu", "true", "--report_to", "none"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


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

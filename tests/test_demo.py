"""End-to-end demo (quick variant): it learns, through the vision path, with the real train/merge/chat code.

One quick demo run (module fixture) is shared by the assertions; the control run trains on blank
images and must not learn colours. The numbers are measured by `xcft predict` + `xcft score` on held-out images.
Every test that runs the demo is marked slow (minutes on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xcft.cli import main
from xcft.commands.demo.run import QUICK, run_demo
from xcft.commands.demo.scoring import chance_levels


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory):
    return run_demo(tmp_path_factory.mktemp("demo") / "out", quick=True)


@pytest.mark.slow
def test_quick_demo_learns(quick) -> None:
    r = quick
    assert r.steps == QUICK.steps
    assert r.accuracy_before <= 0.3  # a random model answers (near) nothing right
    assert r.accuracy_after >= r.accuracy_before + 0.4, (r.per_kind_before, r.per_kind_after)
    assert r.per_kind_after["colour"] >= 0.8
    assert r.loss_last < 0.5 * r.loss_first
    assert len(r.losses) == r.steps


@pytest.mark.slow
def test_vision_path_is_what_learned(quick) -> None:
    # the same trained model, every image replaced by a flat CLIP-mean one: colour answers fall to chance
    chance = chance_levels()["colour"]
    assert quick.per_kind_after["colour"] >= chance + 0.5
    assert quick.accuracy_blank_images <= chance + 0.15


@pytest.mark.slow
def test_artifacts_and_fresh_process_answer(quick) -> None:
    out = Path(quick.output_dir)
    assert (out / "loss.png").stat().st_size > 1000
    saved = json.loads((out / "result.json").read_text())
    assert saved["accuracy_after"] == quick.accuracy_after
    assert (Path(quick.base_dir) / "tokenizer.model").is_file()
    assert (Path(quick.adapter_dir) / "adapter_config.json").is_file()
    merged = Path(quick.merged_dir)
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    # `xcft chat` on the merged folder in a new process says what the adapter said in this one
    assert quick.reload_answer == quick.reload_adapter_answer
    assert quick.reload_answer.split()[0] == quick.reload_question["answer"]


@pytest.mark.slow
def test_predict_and_score_on_the_merged_model_reproduce_the_demo_accuracy(quick, tmp_path, capsys) -> None:
    preds = tmp_path / "merged.jsonl"
    assert main(["predict", quick.heldout_txt, "--model", quick.merged_dir, "--output", str(preds), "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["score", str(preds), "--metrics", "first_word", "--format", "json"]) == 0
    scores = json.loads(capsys.readouterr().out)["scores"]
    per_kind = {Path(k).stem.removeprefix("heldout_"): v for k, v in scores.items() if k != "overall"}
    assert {k: v["first_word"] for k, v in per_kind.items()} == pytest.approx(quick.per_kind_after)
    head = [per_kind[k] for k in ("colour", "shape")]
    assert sum(v["first_word_hits"] for v in head) / sum(v["n"] for v in head) == pytest.approx(quick.accuracy_after)
    # the demo's own prediction files compare as xcft score compares them
    assert main(["score", quick.predictions_before, quick.predictions_after, "--metrics", "first_word", "--format", "json"]) == 0
    comparison = json.loads(capsys.readouterr().out)
    assert len(comparison["fixed"]) > len(comparison["broken"])


@pytest.mark.slow
def test_merged_model_answers_xcft_chat_with_no_flags(quick, subprocess_env) -> None:
    """The merged folder records the training layout, so plain `xcft chat` (official sampling) names the colour."""
    import subprocess
    import sys

    merged = Path(quick.merged_dir)
    assert json.loads((merged / "config.json").read_text())["prompt_layout"] == "training"
    data = Path(quick.output_dir) / "data"
    colours = json.loads((data / "heldout_colour.json").read_text())[:3]
    right = 0
    for q in colours:
        argv = ["chat", "--model", str(merged), "--image", str(data / q["image"][0]), "--query", q["conversations"][0]["value"]]
        proc = subprocess.run(
            [sys.executable, "-m", "xcft.cli", *argv], capture_output=True, text=True, env=subprocess_env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        right += proc.stdout.split()[:1] == [q["conversations"][1]["value"]]
    assert right >= 2, right  # sampling, the default: a rare miss is allowed


@pytest.mark.slow
def test_blank_training_images_do_not_learn(tmp_path: Path) -> None:
    """Control: the same run with flat grey training images cannot learn colours (nothing leaks via text)."""
    r = run_demo(tmp_path / "blank", quick=True, blank_train_images=True, merge=False)
    assert r.per_kind_after["colour"] <= chance_levels()["colour"] + 0.2
    assert r.loss_last < r.loss_first  # it did train (the answer format), it just cannot see


@pytest.mark.slow
def test_text_and_json_output(quick, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import xcft.commands.demo.run as run_mod
    from xcft.commands.demo.run import demo_command

    monkeypatch.setattr(run_mod, "run_demo", lambda *a, **k: quick)
    assert demo_command(output="unused", steps=None, quick=True, output_format="json") == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("accuracy_before", "accuracy_after", "train_seconds", "output_dir"):
        assert key in data
    assert data["accuracy_after"] == quick.accuracy_after
    assert demo_command(output="unused", steps=None, quick=True, output_format="text") == 0
    text = capsys.readouterr().out
    assert "held-out accuracy" in text and "->" in text and str(quick.output_dir) in text


def test_cli_parses_demo_flags() -> None:
    from xcft.cli import build_parser

    args = build_parser().parse_args(["demo", "--output", "x", "--steps", "7", "--quick", "--format", "json"])
    assert (args.output, args.steps, args.quick, args.output_format) == ("x", 7, True, "json")


@pytest.mark.slow
def test_quick_demo_on_the_2_5_family(tmp_path: Path) -> None:
    """`xcft demo --family 2.5 --quick`: a tiny 2.5 model (HD views, separators) learns colours through its vision path."""
    r = run_demo(tmp_path / "d25", quick=True, family="2.5")
    saved = json.loads((Path(r.output_dir) / "base" / "config.json").read_text())
    assert saved["family"] == "2.5"
    assert r.per_kind_after["colour"] >= chance_levels()["colour"] + 0.4, r.per_kind_after
    assert r.accuracy_blank_images <= chance_levels()["colour"] + 0.15
    assert r.loss_last < 0.5 * r.loss_first
    assert r.merged_dir and (Path(r.merged_dir) / "config.json").is_file()

"""The run-file contract (xcft.run_files): the checkpoints a reader lists are the ones resume uses,
the trainer log reader follows a growing, resumed or replaced log, and the merge result is data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xcft.output_dir import write_marker
from xcft.run_files import (
    TRAINER_LOG_NAME,
    MergeCheck,
    TrainerProgress,
    complete_checkpoints,
    earlier_results,
    find_last_checkpoint,
    follow_trainer_log,
    read_merge_check,
    resume_requested,
    trainer_log_record,
    write_merge_check,
)
from xcft.train.checkpoints import resolve_resume


def _checkpoint(folder: Path, step: int, *, own: bool = True, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text("{}")
    if own:
        write_marker(path, "train")
    return path


def test_listed_checkpoints_are_exactly_what_resume_continues_from(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    write_marker(out, "train")
    ours = [_checkpoint(out, 2), _checkpoint(out, 10)]
    _checkpoint(out, 12, own=False)  # put there by someone else: complete-looking, but not xcft's
    _checkpoint(out, 11, complete=False)  # still being written (no trainer state yet)
    assert complete_checkpoints(out) == ours
    assert find_last_checkpoint(out) == str(ours[-1]) == resolve_resume("true", out)
    assert earlier_results(out) == ["checkpoint-2", "checkpoint-10", "checkpoint-11"]


def test_no_checkpoint_in_a_missing_or_empty_folder(tmp_path):
    assert complete_checkpoints(tmp_path / "nope") == [] and find_last_checkpoint(tmp_path) is None
    assert resolve_resume("latest", tmp_path) is None


@pytest.mark.parametrize(
    ("value", "wanted"),
    [
        (None, False),
        ("", False),
        ("false", False),
        ("None", False),
        ("0", False),
        ("true", True),
        ("latest", True),
        ("/some/checkpoint-3", True),
    ],
)
def test_resume_requested(value, wanted):
    assert resume_requested(value) is wanted


def _append(folder: Path, text: str) -> None:
    with open(folder / TRAINER_LOG_NAME, "a", encoding="utf-8") as f:
        f.write(text)


def test_trainer_log_is_followed_incrementally(tmp_path):
    _append(tmp_path, trainer_log_record("begin", 0, 10, 0.0, 1.0))
    _append(tmp_path, trainer_log_record("log", 1, 10, 0.1, 2.0, {"loss": 2.5, "eta_s": 9.0, "grad": [1]}))
    _append(tmp_path, '{"event": "log", "step": 2, "loss": 2.')  # half-written: left for the next read
    progress = follow_trainer_log(tmp_path)
    assert (progress.step, progress.max_steps, progress.eta_s, progress.points()) == (1, 10, 9.0, [(1, 2.5)])
    _append(tmp_path, "0}\nnot json\n")
    progress = follow_trainer_log(tmp_path, progress)
    assert progress.points() == [(1, 2.5), (2, 2.0)]


def test_a_resumed_run_redoes_the_steps_after_its_checkpoint(tmp_path):
    lines = [
        trainer_log_record("log", s, 4, None, 0.0, {"loss": float(s), "eval_loss": 9.0 if s == 3 else None}) for s in (1, 2, 3)
    ]
    _append(tmp_path, "".join(lines) + trainer_log_record("begin", 2, 4, None, 0.0))
    progress = follow_trainer_log(tmp_path)
    assert progress.points() == [(1, 1.0), (2, 2.0)] and progress.points("eval_loss") == [] and progress.eta_s is None


def test_a_replaced_log_is_read_from_the_start(tmp_path):
    _append(tmp_path, trainer_log_record("log", 5, 9, None, 0.0, {"loss": 1.0}) * 3)
    progress = follow_trainer_log(tmp_path)
    (tmp_path / TRAINER_LOG_NAME).write_text(trainer_log_record("log", 1, 9, None, 0.0, {"loss": 4.0}))
    assert follow_trainer_log(tmp_path, progress).points() == [(1, 4.0)]
    assert follow_trainer_log(tmp_path / "missing") == TrainerProgress()


def test_merge_check_round_trip_and_unreadable_files(tmp_path):
    check = MergeCheck(1.5e-6, 1e-4, 300, 1, 32, "/a", "/b")
    write_merge_check(tmp_path, check)
    assert read_merge_check(tmp_path) == check and check.ok
    assert json.loads((tmp_path / "merge_check.json").read_text())["ok"] is True
    assert "max abs logit diff merged vs adapter: 1.500e-06 (tolerance 1.0e-04)" in check.line()
    assert not MergeCheck(float("nan"), 1e-4, 3, 1, 3, "a", "b").ok
    (tmp_path / "merge_check.json").write_text("{broken")
    assert read_merge_check(tmp_path) is None and read_merge_check(tmp_path / "nope") is None


def test_pair_metrics_are_followed_and_drawn_below_the_loss(tmp_path):
    from xcft.commands.web.runs import RunStatus
    from xcft.commands.web.train_view import loss_figure
    from xcft.train.plots import metric_points

    records = [
        {"loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.0, "logps/chosen": -9.0},
        {"loss": 0.50, "rewards/accuracies": 1.0, "rewards/margins": 0.4},
        {"eval_loss": 0.45, "eval_rewards/accuracies": 1.0},
    ]
    _append(tmp_path, "".join(trainer_log_record("log", s, 3, None, 0.0, r) for s, r in enumerate(records, 1)))
    progress = follow_trainer_log(tmp_path)
    assert sorted(progress.metrics) == ["eval_rewards/accuracies", "rewards/accuracies", "rewards/margins"]
    assert progress.points("rewards/accuracies") == [(1, 0.5), (2, 1.0)]
    assert progress.points("eval_rewards/accuracies") == [(3, 1.0)]
    history = [dict(r, step=s) for s, r in enumerate(records, 1)]
    assert metric_points(history)["rewards/margins"] == [(1, 0.0), (2, 0.4)]
    status = RunStatus(run_id="r", state="finished", message="", output_dir=str(tmp_path))
    assert len(loss_figure(status).axes) == 1
    status.metrics = {k: progress.points(k) for k in progress.metrics}
    assert len(loss_figure(status).axes) == 2

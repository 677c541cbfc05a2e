"""Per-source losses of a data mixture (model, trainer_log.jsonl, TensorBoard, xcft eval) and progress lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from xcft.commands.train import train_command
from xcft.data.dataset import LOSS_GROUPS, DataCollator, build_dataset
from xcft.data.mixture import load_spec
from xcft.model.loading import load_pretrained
from xcft.run_files import TRAINER_LOG_NAME, follow_trainer_log
from xcft.train.callbacks import LineProgressCallback, LossProgressCallback, progress_callback


@pytest.fixture(scope="module")
def model_and_tok(tiny_base: Path):
    return load_pretrained(tiny_base, dtype="float32", device="cpu")


def test_group_losses_add_up_to_the_loss(model_and_tok, tiny_data: Path) -> None:
    model, tok = model_and_tok
    ds = build_dataset(tiny_data, tok, 56, 160, seed=0)
    batch = DataCollator(ds.pad_token_id)([ds[i] for i in range(6)])
    assert set(batch[LOSS_GROUPS][batch["attention_mask"].bool()].tolist()) <= {0, 1, 2}
    model.eval()
    with torch.no_grad():
        full = model(**batch)
        plain = model(**{k: v for k, v in batch.items() if k != LOSS_GROUPS})
    table = full.group_losses
    assert torch.allclose(full.loss, plain.loss)
    assert torch.allclose(table[:, 0].sum() / table[:, 1].sum(), plain.loss, rtol=1e-5)
    model.train()
    with torch.no_grad():
        head = model(**batch, supervised_logits_only=True)
    model.eval()
    assert torch.allclose(head.loss, plain.loss, rtol=1e-5)
    assert torch.allclose(head.group_losses, table, rtol=1e-4)
    # the counts are each file's supervised targets in the batch
    labels = batch["labels"][:, 1:]
    groups = batch[LOSS_GROUPS][:, 1:]
    for g in range(table.shape[0]):
        assert int(table[g, 1]) == int(((labels != -100) & (groups == g)).sum())


def test_eval_reports_each_file(model_and_tok, tiny_data: Path) -> None:
    from xcft.commands.eval import evaluate

    model, tok = model_and_tok
    result = evaluate(model, tok, str(tiny_data), max_length=160, progress=False)
    names = [s.display for s in load_spec(tiny_data).sources]
    assert [f["file"] for f in result["files"]] == names
    total = sum(f["loss"] * f["tokens"] for f in result["files"]) / sum(f["tokens"] for f in result["files"])
    assert total == pytest.approx(result["mean_loss"], rel=1e-9)


def test_mixture_run_logs_per_source_losses(tiny_base: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    argv = ["--model_name_or_path", str(tiny_base), "--data_path", str(tiny_data), "--output_dir", str(out)]
    argv += ["--use_cpu", "--disable_tqdm", "true", "--seed", "3", "--use_lora", "--lora_r", "4", "--max_steps", "4"]
    argv += ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--eval_split", "0.25"]
    argv += ["--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "no", "--report_to", "tensorboard"]
    assert train_command(argv) == 0
    names = [s.display for s in load_spec(tiny_data).sources]
    logs = [json.loads(line) for line in (out / TRAINER_LOG_NAME).read_text().splitlines()]
    train_logs = [r for r in logs if "loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2, 3, 4]
    for r in train_logs:
        per_file = {k[len("loss/") :]: v for k, v in r.items() if k.startswith("loss/")}
        assert per_file and set(per_file) <= set(names) and all(v > 0 for v in per_file.values())
    eval_logs = [r for r in logs if "eval_loss" in r]
    assert [r["step"] for r in eval_logs] == [2, 4]
    assert all({f"eval_loss/{n}" for n in names} <= r.keys() for r in eval_logs)
    progress = follow_trainer_log(out)
    assert progress.points(f"eval_loss/{names[0]}")[-1][0] == 4
    # TensorBoard: the Trainer's callback files them as train/loss/<file> and eval/loss/<file>
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list((out / "runs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"eval/loss/{n}" for n in names} <= tags
    assert any(t.startswith("train/loss/") for t in tags)


def test_one_file_logs_no_per_source_losses(tiny_base: Path, tmp_path: Path, tiny_data: Path) -> None:
    out = tmp_path / "o"
    data = tmp_path / "one.json"
    turns = [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there."}]
    data.write_text(json.dumps([{"id": k, "conversations": turns} for k in range(4)]))
    argv = ["--model_name_or_path", str(tiny_base), "--data_path", str(data), "--output_dir", str(out)]
    argv += ["--use_cpu", "--disable_tqdm", "true", "--report_to", "none", "--use_lora", "--lora_r", "4"]
    argv += ["--max_steps", "1", "--logging_steps", "1", "--save_strategy", "no"]
    assert train_command(argv) == 0
    logs = [json.loads(line) for line in (out / TRAINER_LOG_NAME).read_text().splitlines()]
    assert any("loss" in r for r in logs) and not any(k.startswith("loss/") for r in logs for k in r)


def test_progress_is_lines_when_not_a_terminal(caplog, monkeypatch) -> None:
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    cb = progress_callback(0.0)
    assert isinstance(cb, LineProgressCallback)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert progress_callback(0.0) is LossProgressCallback
    state = SimpleNamespace(global_step=0, max_steps=10, is_world_process_zero=True)
    caplog.set_level(logging.INFO, logger="xcft.train.callbacks")
    cb.on_train_begin(None, state, None)
    for step in range(1, 4):
        state.global_step = step
        cb.on_log(None, state, None, logs={"loss": 2.0 / step, "learning_rate": 1e-4, "loss/a.json": 1.5, "loss/b.json": 0.5})
        cb.on_step_end(None, state, None)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "\r" not in "".join(lines)
    assert lines[-1].startswith("step 3/10 (30%) | loss 0.6667 | lr 1.00e-04 |")
    assert lines[-1].endswith("per file: a.json 1.5000, b.json 0.5000")
    quiet = LineProgressCallback(3600.0)
    caplog.clear()
    quiet.on_train_begin(None, state, None)
    for _ in range(5):
        quiet.on_step_end(None, state, None)
    assert not caplog.records  # nothing until the interval has passed

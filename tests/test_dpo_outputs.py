"""What a DPO run leaves: TRL's metrics in TensorBoard and trainer_log.jsonl, an adapter the seed's
AutoPeft snippet loads without xcft (equal to ``xcft merge``), and a SIGTERM checkpoint that resumes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from PIL import Image

from xcft.cli import main
from xcft.run_files import EXIT_SIGTERM, TRAINER_LOG_NAME, find_last_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
CPU = ["--use_cpu", "--disable_tqdm", "true", "--seed", "3"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four pairs: two with an image, two text-only (compact form)."""
    root = tmp_path_factory.mktemp("dpo-out-pairs")
    Image.new("RGB", (40, 30), (200, 20, 20)).save(root / "red.png")
    records = [
        {"id": 0, "image": "red.png", "conversations": [{"from": "user", "value": "Colour?"}], "chosen": "Red.", "rejected": "Green."},
        {"id": 1, "image": "red.png", "conversations": [{"from": "user", "value": "Which colour?"}], "chosen": "Red.", "rejected": "Blue, I think."},
        {"id": 2, "conversations": [{"from": "user", "value": "Say yes"}], "chosen": "yes", "rejected": "no, never"},
        {"id": 3, "conversations": [{"from": "user", "value": "Say no"}], "chosen": "no", "rejected": "yes, always"},
    ]  # fmt: skip
    path = root / "pairs.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _lora_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--stage", "dpo", *CPU, "--model_name_or_path", str(base), "--data_path", str(data),
        "--output_dir", str(out), "--use_lora", "true", "--lora_r", "4", "--lora_dropout", "0",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def dpo_run(tiny_base: Path, pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dpo-run") / "out"
    argv = _lora_args(tiny_base, pairs, out, "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no")
    assert main([*argv, "--report_to", "tensorboard"]) == 0
    return out


def test_dpo_metrics_reach_tensorboard_and_trainer_log(dpo_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = [json.loads(line) for line in (dpo_run / TRAINER_LOG_NAME).read_text().splitlines()]
    steps = {r["step"]: r for r in log if "loss" in r}
    assert sorted(steps) == [1, 2, 3]
    events = list((dpo_run / "runs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    scalars: dict[str, dict[int, float]] = {}
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    for name in ("loss", *METRICS):
        tag = f"train/{name}"
        assert tag in scalars, f"{tag} not in TensorBoard (has {sorted(scalars)})"
        assert sorted(scalars[tag]) == [1, 2, 3]
        for step, value in scalars[tag].items():
            assert value == pytest.approx(steps[step][name], rel=1e-5, abs=1e-6), (name, step)
    assert any(abs(steps[s]["rewards/margins"]) > 1e-4 for s in (2, 3)), "the adapter moved"


def test_dpo_adapter_loads_with_autopeft_without_xcft_and_equals_merge(dpo_run: Path, tmp_path: Path, run_fresh_python) -> None:
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(dpo_run), "--output", str(merged)]) == 0
    r = run_fresh_python(f"""
import sys, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM
a = AutoPeftModelForCausalLM.from_pretrained({str(dpo_run)!r}, device_map="auto", trust_remote_code=True).eval()
m = AutoModelForCausalLM.from_pretrained({str(merged)!r}, trust_remote_code=True).eval()
b = AutoModelForCausalLM.from_pretrained(a.peft_config["default"].base_model_name_or_path, trust_remote_code=True).eval()
ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
with torch.no_grad():
    la, lm, lb = a(input_ids=ids).logits, m(input_ids=ids).logits, b(input_ids=ids).logits
print("DIFF", (la - lm).abs().max().item(), (la - lb).abs().max().item(),
      any(k == 'xcft' or k.startswith('xcft.') for k in sys.modules))
""")
    assert r.returncode == 0, r.stderr[-3000:]
    to_merged, to_base, imported = r.stdout.split("DIFF", 1)[1].split()
    assert float(to_merged) < 1e-4, "AutoPeft on the DPO adapter differs from xcft merge"
    assert float(to_base) > 1e-4, "the adapter changed nothing: the comparison would prove nothing"
    assert imported == "False"


@pytest.mark.slow
def test_sigterm_during_dpo_leaves_a_checkpoint_that_resumes(
    tiny_base: Path, pairs: Path, tmp_path: Path, monkeypatch, read_losses
) -> None:
    from xcft.train.trainer import XcftTrainer

    common = ["--max_steps", "4", "--save_steps", "100", "--report_to", "none"]
    whole = tmp_path / "whole"
    assert main(_lora_args(tiny_base, pairs, whole, *common)) == 0
    expected = read_losses(whole)

    original = XcftTrainer.training_step

    def step_then_sigterm(self, *a, **k):
        loss = original(self, *a, **k)
        if self.state.global_step == 1:  # during optimizer step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    run = tmp_path / "run"
    monkeypatch.setattr(XcftTrainer, "training_step", step_then_sigterm)
    assert main(_lora_args(tiny_base, pairs, run, *common)) == EXIT_SIGTERM
    monkeypatch.setattr(XcftTrainer, "training_step", original)
    assert find_last_checkpoint(run) == str(run / "checkpoint-2")
    assert not (run / "adapter_model.safetensors").exists(), "an interrupted run writes no final output"
    assert main([*_lora_args(tiny_base, pairs, run, *common), "--resume_from_checkpoint", "true"]) == 0
    got = read_losses(run)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step
    log = [json.loads(line) for line in (run / TRAINER_LOG_NAME).read_text().splitlines()]
    assert all(n in r for r in log if "loss" in r and r["step"] > 2 for n in METRICS)

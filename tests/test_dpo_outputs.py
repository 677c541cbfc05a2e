"""What a DPO run leaves: TRL's metrics in TensorBoard and trainer_log.jsonl, an adapter the seed's
AutoPeft snippet loads without xcft (equal to ``xcft merge``), and a SIGTERM checkpoint that resumes."""

from __future__ import annotations

import json
import math
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


@pytest.mark.slow
def test_dpo_adapter_loads_with_autopeft_without_xcft_and_equals_merge(dpo_run: Path, tmp_path: Path, autopeft_vs_merged) -> None:
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(dpo_run), "--output", str(merged)]) == 0
    res = autopeft_vs_merged(dpo_run, merged)
    assert res["to_merged"] < 1e-4, "AutoPeft on the DPO adapter differs from xcft merge"
    assert res["to_base"] > 1e-4, "the adapter changed nothing: the comparison would prove nothing"
    assert not res["xcft_imported"]


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


# --------------------------------------------------------------------------- QLoRA DPO


def test_qlora_dpo_gradient_matches_the_dequantized_model_after_a_reference_pass() -> None:
    """The LoRA gradient of a 4-bit DPO step, taken after the reference pass (eval mode, no grad), equals
    the step without that pass and is close to the same model dequantized to full precision.

    bitsandbytes' CPU inference repacking (triggered by such a pass) would route training matmuls
    through a kernel without backward: the gradient through the frozen weights would be dropped
    (about 50 % off on this model) with the warning "an autograd kernel was not registered".
    """
    pytest.importorskip("bitsandbytes")
    import copy
    import warnings

    import bitsandbytes.functional as bnbf
    import torch
    from peft import LoraConfig, get_peft_model

    from xcft.model.presets import build_model
    from xcft.model.quantization import quantize_model
    from xcft.train.dpo import Reference, answer_logps, preference_loss

    full = build_model("tiny", vocab_size=1000, seed=0, plora_dropout=0.0)
    quantized = quantize_model(copy.deepcopy(full), bits=4, compute_dtype=torch.float32, trainable=True)
    for name, module in quantized.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            full.get_submodule(name).weight.data.copy_(bnbf.dequantize_4bit(module.weight.data, state).float())
    targets = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]

    def with_lora(model):
        torch.manual_seed(1)  # the same random adapter (B non-zero: policy != reference) on both
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
        return get_peft_model(model, config)

    ids = torch.randint(5, 900, (4, 12), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pair_key": torch.arange(2)}

    ref = (torch.tensor([-30.0, -31.0]), torch.tensor([-29.0, -32.0]))  # fixed, so only the pass differs

    def lora_grads(policy, reference_pass: bool) -> dict[str, torch.Tensor]:
        policy.train()
        policy.zero_grad()
        if reference_pass:  # what a DPO step does first: the base scored in eval mode without gradients
            Reference("base").logps(policy, batch)
        logps, _ = answer_logps(policy, batch)
        preference_loss(logps[:2], logps[2:], *ref, beta=0.1)[0].mean().backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    policy_q, policy_f = with_lora(quantized), with_lora(full)
    expected = lora_grads(policy_f, True)
    plain = lora_grads(policy_q, False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        after_ref = lora_grads(policy_q, True)
    assert not [w for w in seen if "autograd kernel was not registered" in str(w.message)]
    assert sorted(after_ref) == sorted(plain) == sorted(expected) and len(expected) == 20
    for name in expected:
        torch.testing.assert_close(after_ref[name], plain[name], rtol=1e-5, atol=1e-8)
        # 4-bit no-grad matmuls (the first layer's input needs no gradient) use another kernel: ~2 % apart
        rel = float((after_ref[name] - expected[name]).norm() / expected[name].norm())
        assert rel < 0.05, (name, rel)


def test_qlora_dpo_on_2d5(tmp_path: Path) -> None:
    """--stage dpo --bits 4 on a 2.5 model (HD crops): the reference is the 4-bit base (step 1: log 2)."""
    pytest.importorskip("bitsandbytes")
    model_dir = tmp_path / "tiny25"
    assert main(["init-model", str(model_dir), "--preset", "tiny-2.5", "--seed", "1"]) == 0
    Image.new("RGB", (300, 200), (200, 20, 20)).save(tmp_path / "wide.png")
    records = [
        {"id": k, "image": "wide.png", "conversations": [{"from": "user", "value": q}], "chosen": "Red.", "rejected": "Green."}
        for k, q in enumerate(["Colour?", "Which colour?"])
    ]
    data = tmp_path / "p.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "out"
    argv = _lora_args(model_dir, data, out, "--bits", "4", "--hd_num", "4", "--max_steps", "2", "--report_to", "none")
    assert main([*argv, "--save_strategy", "no"]) == 0
    train = [json.loads(line) for line in (out / TRAINER_LOG_NAME).read_text().splitlines()]
    train = [r for r in train if "loss" in r]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(train[0]["rewards/margins"]) < 1e-4
    assert abs(train[1]["rewards/margins"]) > 1e-5  # the adapter moved away from the 4-bit reference
    assert (out / "adapter_model.safetensors").is_file()

"""DPO under torchrun with DeepSpeed ZeRO-2 / ZeRO-3 on CPU (gloo): the same losses as one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from xcft.commands.train import train_command

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--stage", "dpo", "--seed", "11", "--max_steps", "3", "--learning_rate", "1e-2", "--beta", "0.5"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Image pairs and text-only pairs, so the two ranks meet batches with and without images."""
    root = tmp_path_factory.mktemp("dist-pairs")
    Image.new("RGB", (40, 30), (200, 20, 20)).save(root / "red.png")
    records = [
        {
            "id": k,
            "image": "red.png",
            "conversations": [{"from": "user", "value": f"Colour {k}?"}],
            "chosen": "Red.",
            "rejected": "Blue.",
        }
        for k in range(3)
    ] + [
        {"id": 10 + k, "conversations": [{"from": "user", "value": f"Say yes {k}"}], "chosen": "yes", "rejected": "no way"}
        for k in range(3)
    ]
    path = root / "pairs.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def _run_both(
    tiny_base, pairs, tmp_path, subprocess_env, torchrun, train_argv, config: str, *extra: str
) -> tuple[Path, dict, dict]:
    pytest.importorskip("deepspeed")
    out, ref = tmp_path / "dist", tmp_path / "single"
    argv = train_argv(
        tiny_base, pairs, out, *RUN, "--per_device_train_batch_size", "1", "--deepspeed", str(ROOT / "configs" / config), *extra
    )
    r = subprocess.run(
        [*torchrun(), "train", *argv], env=subprocess_env, capture_output=True, text=True, timeout=900, cwd=str(ROOT)
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    assert train_command(train_argv(tiny_base, pairs, ref, *RUN, "--per_device_train_batch_size", "2", *extra)) == 0
    return out, _losses(out), _losses(ref)


def test_dpo_zero2_lora_two_processes_equal_one_process(tiny_base, pairs, tmp_path, subprocess_env, torchrun, train_argv):
    extra = ["--use_lora", "true", "--lora_r", "4", "--lora_dropout", "0", "--fix_sampler", "false", "--save_strategy", "no"]
    out, got, expected = _run_both(tiny_base, pairs, tmp_path, subprocess_env, torchrun, train_argv, "ds_zero2.json", *extra)
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert any("rewards/accuracies" in r for r in log)
    assert (out / "adapter_model.safetensors").is_file()


def test_dpo_zero3_full_precomputed_reference_two_processes(tiny_base, pairs, tmp_path, subprocess_env, torchrun, train_argv):
    extra = ["--precompute_ref_log_probs", "true", "--save_strategy", "no"]
    out, got, expected = _run_both(tiny_base, pairs, tmp_path, subprocess_env, torchrun, train_argv, "ds_zero3.json", *extra)
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)
    assert (out / "model.safetensors").is_file()


def _rm_both(tmp_path, subprocess_env, torchrun, train_argv, config: str) -> tuple[Path, Path]:
    """A tiny reward model trained 2 steps under torchrun with ``config`` and in one process (same global batch)."""
    from xcft.data.spm_builder import build_tokenizer
    from xcft.model.loading import save_pretrained
    from xcft.model.presets import build_model
    from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

    pytest.importorskip("deepspeed")
    tok = InternLM2Tokenizer.from_model_file(build_tokenizer(tmp_path / "tok", extra_pieces=["[UNUSED_TOKEN_130]"]))
    base = save_pretrained(build_model("tiny", vocab_size=1000, seed=0, plora_dropout=0.0), tok, tmp_path / "base")
    records = [
        {"id": k, "conversations_a": [{"from": "human", "value": f"Q{k}"}, {"from": "bot", "value": "good answer"}],
         "conversations_b": [{"from": "human", "value": f"Q{k}"}, {"from": "bot", "value": "no"}]}
        for k in range(4)
    ]  # fmt: skip
    data = tmp_path / "rm.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    run = ["--stage", "rm", "--seed", "11", "--max_steps", "2", "--learning_rate", "1e-3", "--save_strategy", "no"]
    out, ref = tmp_path / "dist", tmp_path / "single"
    argv = train_argv(base, data, out, *run, "--per_device_train_batch_size", "1", "--deepspeed", str(ROOT / "configs" / config))
    r = subprocess.run(
        [*torchrun(), "train", *argv], env=subprocess_env, capture_output=True, text=True, timeout=900, cwd=str(ROOT)
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    assert train_command(train_argv(base, data, ref, *run, "--per_device_train_batch_size", "2")) == 0
    got, expected = _losses(out), _losses(ref)
    assert sorted(got) == sorted(expected) == [1, 2]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)
    return out, ref


def test_rm_zero2_two_processes_equal_one_process(tmp_path, subprocess_env, torchrun, train_argv):
    """A reward model under ZeRO-2: same losses as one process; the head is saved beside the model."""
    out, _ = _rm_both(tmp_path, subprocess_env, torchrun, train_argv, "ds_zero2.json")
    assert (out / "reward_head.safetensors").is_file() and (out / "model.safetensors").is_file()


def test_rm_zero3_saves_the_gathered_head_and_model(tmp_path, subprocess_env, torchrun, train_argv):
    """Under ZeRO-3 each rank holds a shard of the head: the saved head and model are the whole, trained tensors."""
    from safetensors.torch import load_file

    out, ref = _rm_both(tmp_path, subprocess_env, torchrun, train_argv, "ds_zero3.json")
    head, head_ref = load_file(str(out / "reward_head.safetensors")), load_file(str(ref / "reward_head.safetensors"))
    assert head["v_head.weight"].shape == head_ref["v_head.weight"].shape == (1, 64)
    torch.testing.assert_close(head["v_head.weight"], head_ref["v_head.weight"], rtol=1e-4, atol=1e-6)
    model, model_ref = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert model.keys() == model_ref.keys()
    for key in model_ref:
        torch.testing.assert_close(model[key], model_ref[key], rtol=1e-4, atol=1e-5, msg=key)

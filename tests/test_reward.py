"""Reward models: xcft train --stage rm on the official reward format, xcft reward, the head without xcft."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from xcft.cli import main
from xcft.errors import XcftError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

COMMON = ["--use_cpu", "--disable_tqdm", "true", "--report_to", "none", "--seed", "3", "--save_strategy", "no"]


@pytest.fixture(scope="module")
def rm_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 2.0 folder whose tokenizer has the reward token [UNUSED_TOKEN_130] as one piece (as the real one)."""
    from xcft.data.spm_builder import build_tokenizer
    from xcft.model.loading import save_pretrained
    from xcft.model.presets import build_model
    from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

    root = tmp_path_factory.mktemp("rm-base")
    tok = InternLM2Tokenizer.from_model_file(build_tokenizer(root / "tok", extra_pieces=["[UNUSED_TOKEN_130]"]))
    return save_pretrained(build_model("tiny", vocab_size=1000, seed=0, plora_dropout=0.0), tok, root / "model")


@pytest.fixture(scope="module")
def official_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official reward format: integer ids, human/bot roles, a lone image without placeholder, extra fields."""
    root = tmp_path_factory.mktemp("rm-data")
    Image.new("RGB", (40, 30), (200, 20, 20)).save(root / "red.png")
    records = []
    for k in range(6):
        q = [{"from": "human", "value": f"Question {k}: what colour?"}]
        record = {
            "id": k,
            "conversations_a": [*q, {"from": "bot", "value": "Red, clearly."}],
            "conversations_b": [*q, {"from": "bot", "value": "no"}],
            "turn": 1,
            "language": "en",
            "model_a": "a",
            "model_b": "b",
        }
        if k % 2 == 0:
            record["image"] = "red.png"
        records.append(record)
    path = root / "example.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    (root / "data.txt").write_text("example.json 6\n", encoding="utf-8")
    return root / "data.txt"


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_rm(rm_base: Path, official_pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rm-out") / "rm"
    argv = ["train", "--stage", "rm", *COMMON, "--model_name_or_path", str(rm_base), "--data_path", str(official_pairs)]
    argv += ["--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size", "2", "--learning_rate", "2e-3"]
    argv += ["--given_num", "false"]
    assert main(argv) == 0
    return out


def test_rm_training_logs_accuracy_and_learns(trained_rm: Path) -> None:
    logs = [r for r in _log(trained_rm) if "loss" in r]
    assert all("accuracy" in r and "rewards/margins" in r for r in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    for name in ("reward_head.safetensors", "reward_head.json", "model.safetensors", "config.json"):
        assert (trained_rm / name).is_file()
    meta = json.loads((trained_rm / "reward_head.json").read_text())
    assert meta["reward_token"] == "[UNUSED_TOKEN_130]" and meta["weight_key"] == "v_head.weight"


def test_reward_command_scores_pairs_and_conversations(trained_rm: Path, official_pairs: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["reward", str(official_pairs), "--model", str(trained_rm), "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_pairs"] == 6
    margins = [p["chosen"] - p["rejected"] for p in result["pairs"]]
    assert result["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 6)
    assert result["accuracy"] == 1.0
    # the same chosen conversations as SFT samples get the same rewards
    records = json.loads((official_pairs.parent / "example.json").read_text())
    sft = [{k: v for k, v in r.items() if k in ("id", "image")} | {"conversations": r["conversations_a"]} for r in records]
    (official_pairs.parent / "chosen_sft.json").write_text(json.dumps(sft), encoding="utf-8")
    assert main(["reward", str(official_pairs.parent / "chosen_sft.json"), "--model", str(trained_rm), "--format", "json"]) == 0
    samples = json.loads(capsys.readouterr().out)["samples"]
    for s, p in zip(samples, result["pairs"]):
        assert s["reward"] == pytest.approx(p["chosen"], rel=1e-4, abs=1e-5)
    assert main(["reward", str(official_pairs), "--model", str(trained_rm)]) == 0
    assert "accuracy 1.0000 (6 pairs" in capsys.readouterr().out


@pytest.mark.slow
def test_reward_head_loads_without_xcft(trained_rm: Path, official_pairs: Path, run_fresh_python) -> None:
    """transformers (trust_remote_code) + safetensors alone give the reward xcft reports."""
    from xcft.commands.reward import load_reward_model, score

    model, tok = load_reward_model(str(trained_rm), device="cpu")
    text = official_pairs.parent / "text_only.json"
    records = json.loads((official_pairs.parent / "example.json").read_text())
    text.write_text(json.dumps([{"id": 1, "conversations": records[1]["conversations_a"]}]), encoding="utf-8")
    expected = score(model, tok, str(text))["samples"][0]["reward"]
    from xcft.data.encode import ImageSpec, encode_conversation
    from xcft.data.schema import load_conversations

    conv = load_conversations(text)[0]
    ids = encode_conversation(conv, tok, ImageSpec(56), 159).input_ids
    code = f"""
import json, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
folder = {str(trained_rm)!r}
meta = json.load(open(folder + "/reward_head.json"))
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
head = load_file(folder + "/reward_head.safetensors")[meta["weight_key"]]
ids = torch.tensor([{ids} + [meta["reward_token_id"]]])
with torch.no_grad():
    hidden = model.model(inputs_embeds=model.model.tok_embeddings(ids)).last_hidden_state
print(float(hidden[0, -1] @ head[0]))
"""
    proc = run_fresh_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_rm_lora_adapter_output_is_scored(rm_base: Path, official_pairs: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "rm-lora"
    argv = ["train", "--stage", "rm", *COMMON, "--model_name_or_path", str(rm_base), "--data_path", str(official_pairs)]
    argv += ["--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2", "--use_lora", "true"]
    assert main(argv) == 0
    assert (out / "adapter_config.json").is_file() and (out / "reward_head.safetensors").is_file()
    capsys.readouterr()
    assert main(["reward", str(official_pairs), "--model", str(out), "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert all(math.isfinite(p["chosen"]) for p in result["pairs"])


def test_rm_needs_the_reward_token(tiny_base: Path, official_pairs: Path, tmp_path: Path, capsys) -> None:
    argv = ["train", "--stage", "rm", *COMMON, "--model_name_or_path", str(tiny_base), "--data_path", str(official_pairs)]
    assert main([*argv, "--output_dir", str(tmp_path / "o")]) == 1
    assert "no single piece [UNUSED_TOKEN_130]" in capsys.readouterr().err


def test_reward_on_a_model_without_head_is_an_error(rm_base: Path) -> None:
    from xcft.commands.reward import load_reward_model

    with pytest.raises(XcftError, match=r"no reward_head\.safetensors"):
        load_reward_model(str(rm_base), device="cpu")


def test_reward_model_reads_the_last_real_token() -> None:
    from xcft.model.presets import build_model
    from xcft.train.reward import RewardModel

    lm = build_model("tiny", vocab_size=1000, seed=0)
    rm = RewardModel(lm, lm.config.hidden_size).eval()
    ids = torch.tensor([[1, 5, 6, 7, 0, 0], [1, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        batch = rm(ids, mask)
        alone = rm(ids[:1, :4], mask[:1, :4])
    assert float(batch[0]) == pytest.approx(float(alone[0]), rel=1e-5, abs=1e-6)


def test_rm_on_a_2d5_model_with_hd_images(tmp_path: Path, capsys) -> None:
    """2.5 (HD crops): the official format with a lone image, trained and scored."""
    from xcft.data.spm_builder import build_tokenizer
    from xcft.model.loading import save_pretrained
    from xcft.model.presets import build_model
    from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

    tok = InternLM2Tokenizer.from_model_file(build_tokenizer(tmp_path / "tok", extra_pieces=["[UNUSED_TOKEN_130]"]))
    base = save_pretrained(build_model("tiny-2.5", vocab_size=1000, seed=1), tok, tmp_path / "base25")
    Image.new("RGB", (300, 200), (200, 20, 20)).save(tmp_path / "wide.png")
    q = [{"from": "human", "value": "What colour?"}]
    records = [
        {"id": k, "image": "wide.png", "conversations_a": [*q, {"from": "bot", "value": "Red."}],
         "conversations_b": [*q, {"from": "bot", "value": "Green, I think."}]}
        for k in range(2)
    ]  # fmt: skip
    data = tmp_path / "p.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "rm25"
    argv = ["train", "--stage", "rm", *COMMON, "--model_name_or_path", str(base), "--data_path", str(data)]
    argv += ["--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2", "--hd_num", "4"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["reward", str(data), "--model", str(out), "--hd-num", "4", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_pairs"] == 2 and all(math.isfinite(p["chosen"] - p["rejected"]) for p in result["pairs"])


@pytest.mark.parametrize("lora", [False, True])
def test_rm_resume_continues_like_an_uninterrupted_run(rm_base: Path, official_pairs: Path, tmp_path: Path, lora: bool) -> None:
    """The checkpoint holds the model (or adapter) and the head; a resumed run logs the same steps 3-4."""
    common = ["train", "--stage", "rm", *COMMON[:-2], "--model_name_or_path", str(rm_base), "--data_path", str(official_pairs)]
    common += ["--per_device_train_batch_size", "2", "--learning_rate", "2e-3", "--lr_scheduler_type", "constant"]
    common += ["--save_steps", "2", "--given_num", "false"] + (["--use_lora", "true", "--lora_dropout", "0"] if lora else [])
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main([*common, "--output_dir", str(whole), "--max_steps", "4"]) == 0
    assert main([*common, "--output_dir", str(part), "--max_steps", "2"]) == 0
    assert main([*common, "--output_dir", str(part), "--max_steps", "4", "--resume_from_checkpoint", "true"]) == 0
    full = {r["step"]: r["loss"] for r in _log(whole) if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in _log(part) if "loss" in r}
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5)

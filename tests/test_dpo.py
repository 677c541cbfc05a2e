"""DPO: the loss and every logged metric against hand computation, batching exactness, the reference, the CLI stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from xcft.cli import main
from xcft.data.preference import PairCollator, PreferenceDataset, read_pair_data
from xcft.model.loading import load_pretrained
from xcft.train.dpo import Reference, answer_logps, preference_loss, preference_metrics

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

COMMON = ["--use_cpu", "--disable_tqdm", "true", "--report_to", "none", "--seed", "3", "--save_strategy", "no"]
QUESTIONS = ["What colour is it?", "Which colour do you see?", "Name the colour.", "The colour, please?"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four image pairs (red picture: chosen 'Red.') and two text pairs in the official a/b form."""
    root = tmp_path_factory.mktemp("pairs")
    Image.new("RGB", (40, 30), (200, 20, 20)).save(root / "red.png")
    Image.new("RGB", (30, 40), (20, 20, 200)).save(root / "blue.png")
    records: list[dict] = []
    for k, q in enumerate(QUESTIONS):
        image, right, wrong = ("red.png", "Red.", "It is green.") if k % 2 == 0 else ("blue.png", "Blue.", "Orange, surely.")
        records.append(
            {"id": k, "image": image, "conversations": [{"from": "user", "value": q}], "chosen": right, "rejected": wrong}
        )
    for k in range(2):
        turns = [{"from": "human", "value": f"Say yes {k}"}]
        records.append(
            {
                "id": 10 + k,
                "conversations_a": [*turns, {"from": "bot", "value": "yes"}],
                "conversations_b": [*turns, {"from": "bot", "value": "no, never"}],
            }
        )
    path = root / "pairs.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _batch(model_dir: Path, data: Path, tok, keys: list[int]) -> dict:
    files = read_pair_data(data, tok, 56, 160, given_num=False)
    ds = PreferenceDataset(files, tok, 56, 160)
    return PairCollator(ds.pad_token_id)([ds[i] for i in keys])


# --------------------------------------------------------------------------- the loss, by hand


def test_losses_and_metrics_equal_hand_computation() -> None:
    pc, pr = torch.tensor([-3.0, -10.0, -4.0]), torch.tensor([-5.0, -9.0, -4.5])
    rc, rr = torch.tensor([-4.0, -9.5, -4.0]), torch.tensor([-4.5, -9.0, -4.0])
    nc, nr = torch.tensor([3, 5, 2]), torch.tensor([4, 4, 6])
    beta = 0.5
    for k in range(3):
        z = beta * ((pc[k] - rc[k]) - (pr[k] - rr[k]))
        sig = 1 / (1 + math.exp(-float(z)))
        losses, cr, rj = preference_loss(pc, pr, rc, rr, beta=beta)
        assert float(losses[k]) == pytest.approx(-math.log(sig), rel=1e-6)
        losses, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.2)
        assert float(losses[k]) == pytest.approx(-0.8 * math.log(sig) - 0.2 * math.log(1 - sig), rel=1e-6)
        losses, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")
        assert float(losses[k]) == pytest.approx(max(0.0, 1 - float(z)), abs=1e-6)
        losses, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_counts=nc, rejected_counts=nr)
        ipo = (float(pc[k] - rc[k]) / int(nc[k]) - float(pr[k] - rr[k]) / int(nr[k]) - 1 / (2 * beta)) ** 2
        assert float(losses[k]) == pytest.approx(ipo, rel=1e-6)
    _, cr, rj = preference_loss(pc, pr, rc, rr, beta=beta)
    m = preference_metrics(cr, rj, pc, pr)
    chosen = [beta * float(a - b) for a, b in zip(pc, rc)]
    rejected = [beta * float(a - b) for a, b in zip(pr, rr)]
    assert float(m["rewards/chosen"]) == pytest.approx(sum(chosen) / 3)
    assert float(m["rewards/rejected"]) == pytest.approx(sum(rejected) / 3)
    assert float(m["rewards/accuracies"]) == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 3)
    assert float(m["rewards/margins"]) == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / 3)
    assert float(m["logps/chosen"]) == pytest.approx(float(pc.mean()))
    assert float(m["logps/rejected"]) == pytest.approx(float(pr.mean()))


# --------------------------------------------------------------------------- batching exactness


def test_pair_batch_equals_each_sequence_alone_and_encodes_each_image_once(tiny_base: Path, pairs_file: Path, tok) -> None:
    model, _ = load_pretrained(tiny_base)
    batch = _batch(tiny_base, pairs_file, tok, [0, 4, 1])  # image, text, image: padded together
    views: list[int] = []
    model.vit.register_forward_hook(lambda mod, args, out: views.append(int(args[0].shape[0])))
    with torch.no_grad():
        logps, counts = answer_logps(model, batch)
    assert views == [2]  # two pairs with an image: two images encoded, for four rows
    rows = batch["input_ids"].shape[0]
    for r in range(rows):
        alone = _batch(tiny_base, pairs_file, tok, [[0, 4, 1][r % 3]])
        side = 0 if r < 3 else 1
        one = {
            "input_ids": alone["input_ids"][side : side + 1],
            "attention_mask": alone["attention_mask"][side : side + 1],
            "labels": alone["labels"][side : side + 1],
            "image_mask": alone["image_mask"][side : side + 1],
            "pixel_values": alone["pixel_values"],
        }
        n = int(alone["labels"][side : side + 1, 1:].ne(-100).sum())
        sums, cnt = model.sample_losses(**one)
        assert int(counts[r]) == int(cnt[0]) == n
        assert float(logps[r]) == pytest.approx(-float(sums[0]), rel=1e-5)


def test_packed_pair_batch_equals_the_padded_batch(tiny_base: Path, pairs_file: Path, tok) -> None:
    """--packing: a pair's two sequences in one row (positions restart) give the same log-probs, images encoded once."""
    model, _ = load_pretrained(tiny_base)
    files = read_pair_data(pairs_file, tok, 56, 160, given_num=False)
    ds = PreferenceDataset(files, tok, 56, 160)
    items = [ds[i] for i in (0, 4, 1)]
    padded = PairCollator(ds.pad_token_id)(items)
    packed = PairCollator(ds.pad_token_id, packed=True)(items)
    assert packed["input_ids"].shape[0] == 3 and "attention_mask" not in packed
    views: list[int] = []
    model.vit.register_forward_hook(lambda mod, args, out: views.append(int(args[0].shape[0])))
    with torch.no_grad():
        lp_padded, n_padded = answer_logps(model, padded)
        lp_packed, n_packed = answer_logps(model, packed)
    assert views == [2, 2]  # two image pairs: two images per forward, padded or packed
    assert n_packed.tolist() == n_padded.tolist()
    torch.testing.assert_close(lp_packed, lp_padded, rtol=1e-5, atol=1e-5)


def test_policy_equal_to_reference_gives_log2_and_zero_rewards(tiny_base: Path, pairs_file: Path, tok) -> None:
    from peft import LoraConfig, get_peft_model

    model, _ = load_pretrained(tiny_base)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["attention.wqkv"]))
    policy.train()
    batch = _batch(tiny_base, pairs_file, tok, [0, 1, 4, 5])
    ref_c, ref_r = Reference("base").logps(policy, batch)
    logps, _ = answer_logps(policy, batch)
    losses, cr, rj = preference_loss(logps[:4], logps[4:], ref_c, ref_r, beta=0.1)
    assert torch.allclose(losses, torch.full((4,), math.log(2)), atol=1e-6)
    assert cr.abs().max() < 1e-6 and rj.abs().max() < 1e-6
    assert policy.training  # the reference pass leaves the mode as it was


# --------------------------------------------------------------------------- the CLI stage


def _train(*extra: str) -> int:
    return main(["train", "--stage", "dpo", *COMMON, *extra])


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def _eval_logps(model_dir: Path, data: Path, capsys) -> list[float]:
    capsys.readouterr()
    assert main(["eval", str(data), "--model", str(model_dir), "--format", "json"]) == 0
    return [s["logp"] for s in json.loads(capsys.readouterr().out)["samples"]]


def test_first_loss_with_ref_model_equals_eval_log_probs(tiny_folder, pairs_file: Path, tmp_path: Path, capsys) -> None:
    """The first logged loss from xcft eval's summed answer log-probs of policy and reference, to 1e-5 relative."""
    policy_dir, ref_dir = tiny_folder(seed=0), tiny_folder(seed=5)
    records = json.loads(pairs_file.read_text())[:4]
    sides = {}
    for side in ("chosen", "rejected"):
        sft = [
            {"id": r["id"], "image": r["image"], "conversations": [*r["conversations"], {"from": "assistant", "value": r[side]}]}
            for r in records
        ]
        sides[side] = pairs_file.parent / f"{side}_sft.json"
        sides[side].write_text(json.dumps(sft), encoding="utf-8")
    data = pairs_file.parent / "four.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    lp = {(m, s): _eval_logps(d, sides[s], capsys) for m, d in (("policy", policy_dir), ("ref", ref_dir)) for s in sides}
    # xcft eval on the pair file itself reports the same per-answer log-probs and token counts
    capsys.readouterr()
    assert main(["eval", str(pairs_file), "--model", str(policy_dir), "--format", "json"]) == 0
    pair_eval = json.loads(capsys.readouterr().out)
    for k, p in enumerate(pair_eval["pairs"][:4]):
        assert p["chosen_logp"] == pytest.approx(lp["policy", "chosen"][k], rel=1e-5)
        assert p["rejected_logp"] == pytest.approx(lp["policy", "rejected"][k], rel=1e-5)
    assert pair_eval["preference_accuracy"] == sum(p["margin"] > 0 for p in pair_eval["pairs"]) / len(pair_eval["pairs"])
    beta = 0.3
    expected = 0.0
    for k in range(4):
        z = beta * (
            (lp["policy", "chosen"][k] - lp["ref", "chosen"][k]) - (lp["policy", "rejected"][k] - lp["ref", "rejected"][k])
        )
        expected += -F.logsigmoid(torch.tensor(z, dtype=torch.float64)).item() / 4
    out = tmp_path / "out"
    assert (
        _train(
            "--model_name_or_path",
            str(policy_dir),
            "--ref_model_name_or_path",
            str(ref_dir),
            "--data_path",
            str(data),
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "4",
            "--beta",
            str(beta),
        )
        == 0
    )
    first = next(r for r in _log(out) if "loss" in r)
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(first["loss"] - math.log(2)) > 1e-3  # the two models differ: not the trivial value
    packed = tmp_path / "packed"
    assert (
        _train(
            "--model_name_or_path", str(policy_dir), "--ref_model_name_or_path", str(ref_dir), "--data_path", str(data),
            "--output_dir", str(packed), "--max_steps", "1", "--per_device_train_batch_size", "4", "--beta", str(beta),
            "--packing", "true",
        )
        == 0
    )  # fmt: skip
    assert next(r for r in _log(packed) if "loss" in r)["loss"] == pytest.approx(expected, rel=1e-5)


def test_lora_run_logs_trl_metrics_and_eval(tiny_base: Path, pairs_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    assert (
        _train(
            "--model_name_or_path",
            str(tiny_base),
            "--data_path",
            str(pairs_file),
            "--output_dir",
            str(out),
            "--use_lora",
            "true",
            "--lora_dropout",
            "0",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--eval_split",
            "0.34",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "2",
            "--learning_rate",
            "1e-3",
        )
        == 0
    )
    logs = _log(out)
    train = [r for r in logs if "loss" in r]
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    assert all(n in train[0] for n in names)
    # the first step: policy = reference (fresh adapter, no dropout in the tiny folder): loss log 2, rewards 0
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(train[0]["rewards/chosen"]) < 1e-6 and abs(train[0]["rewards/margins"]) < 1e-6
    evals = [r for r in logs if "eval_loss" in r]
    assert evals and all(f"eval_{n}" in evals[0] for n in names)
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_base.resolve())


def test_full_finetune_precomputed_reference_starts_at_log2(tiny_base: Path, pairs_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "full"
    assert (
        _train(
            "--model_name_or_path",
            str(tiny_base),
            "--data_path",
            str(pairs_file),
            "--output_dir",
            str(out),
            "--precompute_ref_log_probs",
            "true",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "3",
            "--learning_rate",
            "1e-3",
        )
        == 0
    )
    train = [r for r in _log(out) if "loss" in r]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[1]["loss"] < math.log(2)  # the step moved the policy towards the chosen answers
    assert (out / "model.safetensors").is_file()


def test_gradient_accumulation_equals_the_larger_batch(tiny_base: Path, pairs_file: Path, tmp_path: Path) -> None:
    """One step of 4 pairs == one step of 2 x 2 accumulated pairs (plain SGD shows the gradient itself)."""
    results = []
    for batch, accum in ((4, 1), (2, 2)):
        out = tmp_path / f"ga{batch}"
        assert (
            _train(
                "--model_name_or_path",
                str(tiny_base),
                "--data_path",
                str(pairs_file),
                "--output_dir",
                str(out),
                "--max_steps",
                "1",
                "--per_device_train_batch_size",
                str(batch),
                "--gradient_accumulation_steps",
                str(accum),
                "--optim",
                "sgd",
                "--learning_rate",
                "10",
                "--lr_scheduler_type",
                "constant",
                "--save_strategy",
                "no",
                "--dataloader_drop_last",
                "true",
            )
            == 0
        )
        results.append(load_file(str(out / "model.safetensors")))
    base = load_file(str(tiny_base / "model.safetensors"))
    moved = [k for k in base if not torch.equal(base[k], results[0][k])]
    assert moved, "the step changed nothing"
    for k in moved:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny25(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("dpo25") / "tiny25"
    assert main(["init-model", str(model_dir), "--preset", "tiny-2.5", "--seed", "1"]) == 0
    return model_dir


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_2d5_dpo_run(tiny25: Path, tmp_path: Path, mode: str) -> None:
    """2.5 (HD crops): LoRA (reference = adapter off) and full finetune (precomputed reference)."""
    Image.new("RGB", (300, 200), (200, 20, 20)).save(tmp_path / "wide.png")
    records = [
        {"id": k, "image": "wide.png", "conversations": [{"from": "user", "value": q}], "chosen": "Red.", "rejected": "Green."}
        for k, q in enumerate(QUESTIONS[:2])
    ]
    data = tmp_path / "p.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "out25"
    extra = ["--use_lora", "true"] if mode == "lora" else ["--precompute_ref_log_probs", "true"]
    assert (
        _train(
            "--model_name_or_path",
            str(tiny25),
            "--data_path",
            str(data),
            "--output_dir",
            str(out),
            "--hd_num",
            "4",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--learning_rate",
            "1e-3",
            *extra,
        )
        == 0
    )
    train = [r for r in _log(out) if "loss" in r]
    assert "rewards/accuracies" in train[0] and all(math.isfinite(r["loss"]) for r in train)
    # policy = reference at the first step (the tiny-2.5 preset's Partial-LoRA dropout is switched off)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (out / ("adapter_model.safetensors" if mode == "lora" else "model.safetensors")).is_file()


def test_bad_preference_options_are_one_line_errors(tiny_base: Path, pairs_file: Path, tmp_path: Path, capsys) -> None:
    base = ["--model_name_or_path", str(tiny_base), "--data_path", str(pairs_file), "--output_dir", str(tmp_path / "x")]
    assert main(["train", *base, "--stage", "dpo", "--beta", "0"]) == 1
    assert "--beta must be positive" in capsys.readouterr().err
    assert main(["train", *base, "--ref_model_name_or_path", str(tiny_base)]) == 1
    assert "applies to --stage dpo" in capsys.readouterr().err
    assert main(["train", *base, "--stage", "rm", "--packing", "true"]) == 1
    assert "--packing is not available with --stage rm" in capsys.readouterr().err


def test_sft_data_given_to_dpo_names_the_sample(tiny_base: Path, tiny_data: Path, tmp_path: Path, capsys) -> None:
    assert _train("--model_name_or_path", str(tiny_base), "--data_path", str(tiny_data), "--output_dir", str(tmp_path / "y")) == 1
    err = capsys.readouterr().err
    assert "sample 0 (id '0'): not a preference pair" in err


@pytest.mark.slow
def test_dpo_demo_quick_moves_preference_accuracy(tmp_path: Path) -> None:
    """The starting model prefers the wrong colour (below chance); DPO turns the held-out preference around."""
    from xcft.commands.demo.dpo import run_dpo_demo

    result = run_dpo_demo(tmp_path / "demo", quick=True, quiet=True)
    assert result.preference_accuracy_before < 0.5 and result.says_wrong_colour_before > 0.5
    assert result.preference_accuracy_after >= 0.75
    assert result.mean_margin_after > 0 > result.mean_margin_before
    assert result.colour_accuracy_after > result.colour_accuracy_before
    saved = json.loads((tmp_path / "demo" / "result.json").read_text())
    assert saved["preference_accuracy_after"] == result.preference_accuracy_after


def test_qlora_dpo_reference_is_the_quantized_base(tiny_base: Path, pairs_file: Path, tmp_path: Path) -> None:
    """--bits 4 --use_lora: the reference is the 4-bit base with the adapter off (step 1: log 2, rewards 0)."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    assert (
        _train(
            "--model_name_or_path", str(tiny_base), "--data_path", str(pairs_file), "--output_dir", str(out),
            "--use_lora", "true", "--bits", "4", "--lora_dropout", "0", "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
        )
        == 0
    )  # fmt: skip
    train = [r for r in _log(out) if "loss" in r]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(train[0]["rewards/margins"]) < 1e-4
    assert any(abs(r["rewards/margins"]) > 1e-3 for r in train[1:])  # the adapter moved away from the reference
    assert (out / "adapter_model.safetensors").is_file()


def test_dpo_resume_continues_like_an_uninterrupted_run_and_merges(tiny_base: Path, pairs_file: Path, tmp_path: Path) -> None:
    """A LoRA DPO run resumed from its step-2 checkpoint logs the same steps 3-4; its adapter merges."""
    common = [
        "--model_name_or_path", str(tiny_base), "--data_path", str(pairs_file), "--use_lora", "true",
        "--lora_dropout", "0", "--per_device_train_batch_size", "2", "--learning_rate", "5e-3",
        "--lr_scheduler_type", "constant", "--max_steps", "4",
    ]  # fmt: skip
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _train(*common, "--output_dir", str(whole)) == 0
    assert main(["train", "--stage", "dpo", *COMMON[:-2], *common, "--output_dir", str(part), "--save_steps", "2",
                 "--max_steps", "2"]) == 0  # fmt: skip
    assert main(["train", "--stage", "dpo", *COMMON[:-2], *common, "--output_dir", str(part), "--save_steps", "2",
                 "--resume_from_checkpoint", "true"]) == 0  # fmt: skip
    full = {r["step"]: r for r in _log(whole) if "loss" in r}
    resumed = {r["step"]: r for r in _log(part) if "loss" in r}
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5)
        assert resumed[step]["rewards/margins"] == pytest.approx(full[step]["rewards/margins"], rel=1e-4, abs=1e-7)
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(whole), "--output", str(merged)]) == 0
    assert (merged / "model.safetensors").is_file()

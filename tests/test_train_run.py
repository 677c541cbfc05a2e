"""xcft train on tiny models (CPU): full and LoRA runs, freezing, loss decrease, resume, SIGTERM, atomic
checkpoints, eval, saving/loading (fresh processes without xcft), merge."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xcft.cli import main
from xcft.commands.train import train_command
from xcft.errors import XcftError
from xcft.output_dir import own_entries
from xcft.run_files import (
    EXIT_SIGTERM,
    MERGE_CHECK_NAME,
    STAGING_DIR_NAME,
    TRAINER_LOG_NAME,
    find_last_checkpoint,
    read_merge_check,
)
from xcft.train.args import parse_train_args
from xcft.train.setup import SEPARATOR_NAMES


@pytest.fixture(scope="module")
def train(tiny_base, tiny_data, train_argv):
    """``train(out, *flags, data=None)``: ``xcft train`` of the tiny folder on the tiny mixture (or ``data``)."""

    def run(out, *extra, data=None):
        return train_command(train_argv(tiny_base, data or tiny_data, out, *extra))

    return run


@pytest.fixture(scope="module")
def small_fixed_data(tiny_data, tmp_path_factory):
    """Four short samples (two with an image) in one JSON file: a set a tiny model can fit."""
    images = tiny_data.parent / "data" / "images"
    samples = [
        {
            "id": "a",
            "image": [str(images / "red.png")],
            "conversations": [
                {"from": "user", "value": "<ImageHere>What colour is this?"},
                {"from": "assistant", "value": "It is red."},
            ],
        },
        {
            "id": "b",
            "conversations": [{"from": "user", "value": "Say hello."}, {"from": "assistant", "value": "Hello there, friend."}],
        },
        {
            "id": "c",
            "image": [str(images / "green.png")],
            "conversations": [
                {"from": "user", "value": "<ImageHere>Is this a square?"},
                {"from": "assistant", "value": "Yes, a yellow square on green."},
            ],
        },
        {
            "id": "d",
            "conversations": [{"from": "user", "value": "Count to three."}, {"from": "assistant", "value": "One, two, three."}],
        },
    ]
    path = tmp_path_factory.mktemp("fixed") / "fixed.json"
    path.write_text(json.dumps(samples))
    return path


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def full_run(train, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    rc = train(
        out,
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "2",
        "--save_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--fix_vit",
        "true",
        "--fix_sampler",
        "true",
        "--report_to",
        "tensorboard",
    )
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def lora_run(train, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "out"
    rc = train(
        out,
        "--use_lora",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "2",
        "--save_steps",
        "2",
        "--learning_rate",
        "1e-2",
        "--fix_sampler",
        "false",
    )
    assert rc == 0
    return out


def test_full_run_outputs_and_freezing(full_run, tiny_base, read_losses):
    base = _weights(tiny_base)
    after = _weights(full_run)
    assert base.keys() == after.keys()
    frozen = [k for k in base if k.startswith(("vit.", "vision_proj."))]
    trained = [k for k in base if k.startswith(("model.", "output."))]
    assert frozen and trained
    for k in frozen:
        assert torch.equal(base[k], after[k]), f"frozen {k} changed"
    changed = [k for k in trained if not torch.equal(base[k], after[k])]
    # Every decoder tensor gets a gradient except Partial-LoRA of layers whose image outputs reach no label.
    assert len(changed) >= 0.7 * len(trained)
    assert any("Plora_A" in k for k in changed), "full mode trains Partial LoRA"
    for name in ("config.json", "modeling_xcomposer2.py", "tokenizer.model", "train_config.yaml", "loss.png"):
        assert (full_run / name).is_file(), name
    assert list((full_run / "runs").rglob("events.out.tfevents.*")), "TensorBoard log"
    assert json.loads((full_run / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    assert sorted(p.name for p in full_run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (full_run / STAGING_DIR_NAME).exists()
    assert set(read_losses(full_run)) == {1, 2, 3, 4}


@pytest.mark.slow
def test_full_output_loads_without_xcft(full_run, run_fresh_python):
    r = run_fresh_python(f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(full_run)!r}, trust_remote_code=True).eval()
out = m(input_ids=torch.tensor([[1, 20, 30, 40]]))
assert out.logits.shape == (1, 4, 1000), out.logits.shape
print("OK", any(k == 'xcft' or k.startswith('xcft.') for k in sys.modules))
""")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK False" in r.stdout


def test_lora_run_freezes_base_and_saves_adapter(lora_run, tiny_base):
    conf = json.loads((lora_run / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(tiny_base.resolve())
    assert os.path.isabs(conf["base_model_name_or_path"])
    assert (lora_run / "tokenizer.model").is_file()
    assert not (lora_run / "model.safetensors").exists()
    for ckpt in lora_run.glob("checkpoint-*"):
        assert not list(ckpt.glob("model*.safetensors")) and not list(ckpt.glob("pytorch_model*")), ckpt
        assert (ckpt / "adapter_model.safetensors").is_file()
    adapter = load_file(str(lora_run / "adapter_model.safetensors"))
    assert any(".lora_A" in k for k in adapter) and any("vision_proj" in k for k in adapter)
    assert not any("Plora" in k for k in adapter), "Partial-LoRA weights stay frozen in LoRA mode"
    # The base weights, as seen through the adapter, are bit-identical to the base folder.
    from xcft.model.loading import load_adapter_model

    peft_model, _, _ = load_adapter_model(lora_run, dtype=torch.float32, device="cpu")
    base = _weights(tiny_base)
    state = peft_model.get_base_model().state_dict()
    originals = {
        k.replace(".base_layer", "").replace(".original_module", ""): v
        for k, v in state.items()
        if ".lora_" not in k and "modules_to_save" not in k
    }
    assert set(originals) == set(base)
    for k, v in base.items():
        assert torch.equal(originals[k], v), f"frozen base weight {k} changed"
    lora_b = [v for k, v in state.items() if ".lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "LoRA weights were trained"


@pytest.mark.slow
def test_lora_loads_with_autopeft_and_xcft_and_merges(lora_run, capsys, tmp_path, autopeft_vs_merged, tiny_base):
    import xcft
    from xcft.commands.merge import merge_command, probe_batch, probe_logits

    merged = tmp_path / "merged"
    assert merge_command(adapter=str(lora_run), output=str(merged), base=None) == 0
    out = capsys.readouterr().out
    # the result is data in the merged folder (what the web page reads), and the printed line says the same
    check = read_merge_check(merged)
    assert check is not None and check.ok and check.line() in out
    assert check.base == str(tiny_base.resolve()) and check.adapter == str(lora_run.resolve())
    assert MERGE_CHECK_NAME in own_entries(merged)
    # xcft.load_pretrained on the adapter folder == merged folder, on the image probe
    model_a, tok = xcft.load_pretrained(str(lora_run), dtype=torch.float32, device="cpu")
    model_m, _ = xcft.load_pretrained(str(merged), dtype=torch.float32, device="cpu")
    batch = probe_batch(model_m, tok)
    assert (probe_logits(model_a, batch) - probe_logits(model_m, batch)).abs().max() < 1e-4
    res = autopeft_vs_merged(lora_run, merged)
    assert res["to_merged"] < 1e-4 and not res["xcft_imported"]


def test_merge_other_base_and_user_errors(lora_run, tmp_path, tiny_base, tiny_model):
    from xcft.commands.merge import merge_command
    from xcft.model.loading import save_pretrained
    from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

    other = tiny_model(img_size=56, seed=1, max_length=160, plora_dropout=0.05)
    other_dir = save_pretrained(other, InternLM2Tokenizer.from_model_file(tiny_base / "tokenizer.model"), tmp_path / "o")
    # --base overrides the adapter's base: merging onto it is still checked against base + adapter...
    assert merge_command(adapter=str(lora_run), output=str(tmp_path / "m"), base=str(other_dir)) == 0
    # ...while a missing base or a non-adapter folder is a user error.
    with pytest.raises(XcftError, match="not a LoRA adapter folder"):
        merge_command(adapter=str(tiny_base), output=str(tmp_path / "m2"))
    with pytest.raises(XcftError, match="already holds an earlier xcft output"):
        merge_command(adapter=str(lora_run), output=str(tmp_path / "m"))


def test_loss_decreases_on_small_fixed_set(tmp_path, train, small_fixed_data, read_losses):
    out = tmp_path / "fit"
    rc = train(
        out,
        "--max_steps",
        "30",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "3e-3",
        "--save_strategy",
        "no",
        "--lr_scheduler_type",
        "constant",
        data=small_fixed_data,
    )
    assert rc == 0
    losses = read_losses(out)
    first = sum(losses[s] for s in (1, 2, 3)) / 3
    last = sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < 0.6 * first, (first, last)


def test_sigterm_checkpoint_and_resume_equal_uninterrupted(tmp_path, monkeypatch, train, read_losses):
    args = [
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--save_steps",
        "100",
        "--use_lora",
        "--lora_r",
        "4",
        "--lora_dropout",
        "0.1",
    ]
    ref = tmp_path / "ref"
    assert train(ref, *args) == 0
    expected = read_losses(ref)

    from xcft.train.trainer import XcftTrainer

    original = XcftTrainer.training_step

    def step_then_sigterm(self, *a, **k):
        loss = original(self, *a, **k)
        if self.state.global_step == 2:  # during optimizer step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    run = tmp_path / "run"
    monkeypatch.setattr(XcftTrainer, "training_step", step_then_sigterm)
    assert train(run, *args) == EXIT_SIGTERM
    monkeypatch.setattr(XcftTrainer, "training_step", original)
    assert find_last_checkpoint(run) == str(run / "checkpoint-3")
    assert not (run / "adapter_model.safetensors").exists(), "an interrupted run writes no final output"
    assert train(run, *args, "--resume_from_checkpoint", "true") == 0
    got = read_losses(run)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_kill_during_save_leaves_no_checkpoint_to_pick(tmp_path, monkeypatch, train):
    from transformers import Trainer

    out = tmp_path / "k"
    args = ["--max_steps", "4", "--per_device_train_batch_size", "2", "--save_steps", "2", "--use_lora", "--lora_r", "4"]
    original = Trainer._save_optimizer_and_scheduler

    def die_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("killed while saving")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", die_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(out, *args)
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", original)
    assert (out / STAGING_DIR_NAME / "checkpoint-4").is_dir()  # the half-written one
    assert not (out / "checkpoint-4").exists()
    assert find_last_checkpoint(out) == str(out / "checkpoint-2")
    assert train(out, *args, "--resume_from_checkpoint", "true") == 0
    assert not (out / STAGING_DIR_NAME).exists()
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    with pytest.raises(XcftError, match="not a complete checkpoint"):
        train(tmp_path / "x", *args, "--resume_from_checkpoint", str(out))


def test_eval_split_and_eval_data_give_eval_loss(tmp_path, train, small_fixed_data):
    out = tmp_path / "ev"
    rc = train(
        out,
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "2",
        "--eval_split",
        "0.25",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--save_strategy",
        "no",
        "--use_lora",
        "--lora_r",
        "4",
    )
    assert rc == 0
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4] and all(h["eval_loss"] > 0 for h in evals)
    assert (out / "loss.png").stat().st_size > 1000
    out2 = tmp_path / "ev2"
    rc = train(
        out2,
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--eval_data_path",
        str(small_fixed_data),
        "--save_strategy",
        "no",
        "--use_lora",
        "--lora_r",
        "4",
        "--num_train_epochs",
        "1",
    )
    assert rc == 0
    state = json.loads((out2 / "trainer_state.json").read_text())
    assert any("eval_loss" in h for h in state["log_history"])  # eval_strategy defaults to epoch with eval data


def test_eval_metrics_are_logged_beside_the_eval_loss(tmp_path, train, small_fixed_data, capsys):
    out = tmp_path / "em"
    common = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no", "--use_lora", "--lora_r", "4"]
    rc = train(
        out,
        *common,
        "--eval_data_path",
        str(small_fixed_data),
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--eval_metrics",
        "exact,first_word,rouge_l",
        "--eval_generate_samples",
        "3",
        "--eval_max_new_tokens",
        "4",
        "--report_to",
        "tensorboard",
        "--logging_dir",
        str(tmp_path / "tb"),
    )
    assert rc == 0
    state = json.loads((out / "trainer_state.json").read_text())
    [entry] = [h for h in state["log_history"] if "eval_loss" in h]
    assert {"eval_exact", "eval_first_word", "eval_rouge_l"} <= entry.keys()
    assert 0 <= entry["eval_exact"] <= 1 and 0 <= entry["eval_rouge_l"] <= 1
    logged = [json.loads(x) for x in (out / TRAINER_LOG_NAME).read_text().splitlines()]
    assert any("eval_exact" in row.get("values", row) for row in logged)
    assert any((tmp_path / "tb").rglob("events.out.tfevents.*"))
    with pytest.raises(XcftError, match="--eval_metrics needs an eval set"):
        train(tmp_path / "em2", *common, "--eval_metrics", "exact")
    with pytest.raises(XcftError, match="unknown metric 'accuracy'"):
        train(tmp_path / "em3", *common, "--eval_split", "0.25", "--eval_metrics", "accuracy")


def test_epoch_redraw_differs_and_is_seeded(tiny_base, tiny_data):
    from xcft.model.loading import load_config, load_tokenizer
    from xcft.train.inputs import build_datasets

    cfg = parse_train_args(["--model_name_or_path", str(tiny_base), "--data_path", str(tiny_data), "--seed", "5"])
    tok = load_tokenizer(tiny_base)
    ds, _, _ = build_datasets(cfg, tok, load_config(tiny_base))
    ds2, _, _ = build_datasets(cfg, tok, load_config(tiny_base))
    e0 = ds.draw.copy()
    ds.set_epoch(1)
    assert not (ds.draw == e0).all()
    ds2.set_epoch(1)
    assert (ds.draw == ds2.draw).all()


def test_user_errors(tmp_path, train):
    with pytest.raises(XcftError, match="no such folder"):
        train_command(["--model_name_or_path", str(tmp_path / "nope"), "--data_path", "x"])
    with pytest.raises(XcftError, match="img_size"):
        train(tmp_path / "o", "--img_size", "224", "--max_steps", "1")
    with pytest.raises(XcftError, match="lora_target_modules"):
        train(tmp_path / "o2", "--use_lora", "--lora_target_modules", "no_such_module", "--max_steps", "1")


# --------------------------------------------------------------------------- InternLM-XComposer-2.5: generated HD data, the official checkpoint and flags


#: ``xcft train`` on the generated 2.5 data: hd_num 4, batch 2, lr 1e-3, no checkpoints.
HD_FLAGS = ["--given_num", "false", "--hd_num", "4", "--max_length", "1024", "--per_device_train_batch_size", "2"]
HD_FLAGS += ["--learning_rate", "1e-3", "--save_strategy", "no"]


def test_tiny_2_5_trains_with_batch_2(tmp_path, tiny25_base, hd_data, read_losses, train_argv):
    """Generated HD data (three crop grids, two images in one sample, text), batch 2, full finetune incl. the ViT."""
    out = tmp_path / "run"
    rc = train_command(train_argv(tiny25_base, hd_data, out, *HD_FLAGS, "--max_steps", "3", "--fix_vit", "false"))
    assert rc == 0
    losses = read_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    before, after = load_file(str(tiny25_base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name in SEPARATOR_NAMES:
        assert not torch.equal(before[name], after[name]), f"{name} was not trained"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("vit.") and "post_layernorm" not in k)
    assert all(torch.equal(before[k], after[k]) for k in before if "post_layernorm" in k)
    assert json.loads((out / "config.json").read_text())["family"] == "2.5"


@pytest.mark.parametrize("mode", ["--packing", "--group_by_length"])
def test_tiny_2_5_trains_packed_and_length_grouped(tmp_path, mode, tiny25_base, hd_data, read_losses, train_argv):
    out = tmp_path / "run"
    rc = train_command(train_argv(tiny25_base, hd_data, out, *HD_FLAGS, mode, "true", "--max_steps", "2"))
    assert rc == 0
    assert all(math.isfinite(v) for v in read_losses(out).values())


OFFICIAL_FLAGS = [
    "--given_num",
    "True",
    "--hd_num",
    "18",
    "--batch_size",
    "2",
    "--max_length",
    "16384",
    "--resolution",
    "560",
    "--per_device_train_batch_size",
    "1",
    "--gradient_accumulation_steps",
    "1",
    "--learning_rate",
    "1e-5",
    "--weight_decay",
    "0.1",
    "--adam_beta2",
    "0.95",
    "--warmup_ratio",
    "0.01",
    "--lr_scheduler_type",
    "cosine",
    "--gradient_checkpointing",
    "True",
    "--max_steps",
    "2",
    "--save_strategy",
    "no",
]


FRESH_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True).eval()
assert m.config.family == "2.5", m.config.family
with torch.no_grad():
    logits = m(input_ids=torch.tensor([[1, 3716, 505, 6176, 364]])).logits
print("SUM", float(logits.double().sum()), any(k == 'xcft' or k.startswith('xcft.') for k in sys.modules))
"""


def _fresh_logits_sum(path: Path, run_fresh_python) -> float:
    r = run_fresh_python(FRESH_LOAD.format(path=str(path)))
    assert r.returncode == 0, r.stderr[-3000:]
    value, imported = r.stdout.split("SUM", 1)[1].split()
    assert imported == "False"
    return float(value)


def _xcft_logits_sum(path: Path) -> float:
    from xcft.model.loading import load_pretrained

    model, _ = load_pretrained(path, dtype="float32", device="cpu")
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([[1, 3716, 505, 6176, 364]])).logits.double().sum())


@pytest.mark.slow
def test_official_full_finetune_flags(fixture_2d5_dir, examples_dir, tmp_path, read_losses, run_fresh_python, train_argv):
    out = tmp_path / "full"
    rc = train_command(
        train_argv(
            fixture_2d5_dir,
            examples_dir / "data.txt",
            out,
            "--fix_vit",
            "False",
            "--fix_sampler",
            "False",
            "--use_lora",
            "False",
            *OFFICIAL_FLAGS,
        )
    )
    assert rc == 0
    losses = read_losses(out)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    before, after = load_file(str(fixture_2d5_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name in (*SEPARATOR_NAMES, "vision_proj.0.weight", "vit.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"):
        assert not torch.equal(before[name].float(), after[name].float()), f"{name} was not trained"
    assert _fresh_logits_sum(out, run_fresh_python) == pytest.approx(_xcft_logits_sum(out), rel=1e-5)


@pytest.mark.slow
def test_official_lora_flags_and_merge(fixture_2d5_dir, examples_dir, tmp_path, capsys, run_fresh_python, train_argv):
    out = tmp_path / "lora"
    rc = train_command(
        train_argv(
            fixture_2d5_dir,
            examples_dir / "data.txt",
            out,
            "--fix_vit",
            "True",
            "--fix_sampler",
            "False",
            "--use_lora",
            "True",
            "--lora_r",
            "64",
            "--lora_alpha",
            "64",
            "--lora_dropout",
            "0.05",
            *OFFICIAL_FLAGS,
            "--learning_rate",
            "1e-3",
        )
    )
    assert rc == 0
    assert (out / "adapter_model.safetensors").is_file()
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out), "--output", str(merged)]) == 0
    assert "1 image" in capsys.readouterr().out
    assert _fresh_logits_sum(merged, run_fresh_python) == pytest.approx(_xcft_logits_sum(merged), rel=1e-5)
    # the merged weights differ from the base: the adapter was trained
    assert _xcft_logits_sum(merged) != pytest.approx(_xcft_logits_sum(fixture_2d5_dir), rel=1e-7)

"""Training an InternLM-XComposer-2.5 model: the official 2.5 flags, freezing of the separators, HD batches.

The fast tests build what they need (``xcft init-model --preset tiny-2.5``, generated images); the
slow ones train the official tiny 2.5 checkpoint on the official example data with the official
flags, then load the outputs with plain transformers in a fresh process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from xcft.cli import main
from xcft.commands.train import train_command
from xcft.data.dataset import DataCollator, build_dataset
from xcft.errors import XcftError
from xcft.model.configuration_xcomposer2 import XComposer2Config
from xcft.model.presets import build_model
from xcft.train.args import parse_train_args
from xcft.train.datasets import resolve_run_sizes, vision_aligned
from xcft.train.setup import configure_trainable

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

COMMON = ["--use_cpu", "--disable_tqdm", "true", "--report_to", "none", "--seed", "3"]
SEPARATORS = ("plora_glb_GN", "plora_sub_GN")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("d5train")


@pytest.fixture(scope="module")
def tiny25_base(workdir: Path) -> Path:
    """``xcft init-model --preset tiny-2.5``: 224 px views, a 1000-piece tokenizer built on the spot."""
    out = workdir / "tiny25"
    assert main(["init-model", str(out), "--preset", "tiny-2.5", "--seed", "1"]) == 0
    return out


def _image(path: Path, size: tuple[int, int], seed: int) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(path)
    return str(path)


@pytest.fixture(scope="module")
def generated_data(workdir: Path) -> Path:
    """One-image (no placeholder), two-image (Image1/Image2) and text-only samples with varied image sizes."""
    root = workdir / "gen25"
    root.mkdir(parents=True, exist_ok=True)
    wide = _image(root / "wide.png", (300, 200), 0)  # 2x2 at hd 4 with 224 px views
    small = _image(root / "small.png", (100, 60), 1)  # 1x1
    tall = _image(root / "tall.png", (90, 400), 2)  # tall: columns along the height
    qa = lambda q, a: [{"from": "user", "value": q}, {"from": "assistant", "value": a}]  # noqa: E731
    samples = [
        {"id": "one", "image": wide, "conversations": qa("What is in the picture?", "Coloured noise.")},
        {
            "id": "two",
            "image": [small, tall],
            "conversations": qa("Image1 <ImageHere>; Image2 <ImageHere>; Which is taller?", "Image2."),
        },
        {"id": "text", "conversations": qa("Say hello.", "Hello there.")},
        {"id": "three", "image": [tall], "conversations": qa("<ImageHere> Is it tall?", "Yes, it is tall.")},
    ]
    path = root / "data.json"
    path.write_text(json.dumps(samples))
    return path


# --------------------------------------------------------------------------- flags


def test_init_model_tiny_25_preset_is_a_2_5_folder(tiny25_base):
    config = json.loads((tiny25_base / "config.json").read_text())
    assert config["family"] == "2.5" and config["img_size"] == 224
    keys = load_file(str(tiny25_base / "model.safetensors")).keys()
    assert set(SEPARATORS) <= set(keys)


def test_2_5_defaults_hd_num_max_length_and_resolution(tmp_path):
    cfg = parse_train_args(["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path)])
    assert cfg.data.hd_num is None
    config_25 = XComposer2Config(
        family="2.5",
        vision_config={
            "hidden_size": 32,
            "patch_size": 14,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
    )
    assert config_25.max_length == 16384 and config_25.img_size == 560  # no max_length in the config: the official 16384
    assert XComposer2Config().max_length == 4096  # 2.0 unchanged
    sizes = resolve_run_sizes(cfg, config_25)
    assert (sizes.img_size, sizes.max_length, sizes.hd_num) == (560, 16384, 18)

    ok = parse_train_args(
        [
            "--model_name_or_path",
            "m",
            "--data_path",
            "d",
            "--output_dir",
            str(tmp_path),
            "--resolution",
            "560",
            "--hd_num",
            "6",
            "--max_length",
            "8192",
        ]
    )
    sizes = resolve_run_sizes(ok, config_25)
    assert (sizes.img_size, sizes.max_length, sizes.hd_num) == (560, 8192, 6)
    bad = parse_train_args(
        ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path), "--resolution", "490"]
    )
    with pytest.raises(XcftError, match=r"--resolution 490: the model is an InternLM-XComposer-2.5 model whose views .* 560 px"):
        resolve_run_sizes(bad, config_25)
    with pytest.raises(XcftError, match="--hd_num must be at least 1"):
        parse_train_args(["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path), "--hd_num", "0"])
    with pytest.raises(XcftError, match="disagree"):
        parse_train_args(
            [
                "--model_name_or_path",
                "m",
                "--data_path",
                "d",
                "--output_dir",
                str(tmp_path),
                "--resolution",
                "560",
                "--img_size",
                "490",
            ]
        )
    with pytest.raises(XcftError, match=r"--hd_num 6: the model is an InternLM-XComposer2 \(2\.0\) model"):
        resolve_run_sizes(ok, XComposer2Config())  # one rule everywhere: --hd_num on a 2.0 model is an error


def test_separators_train_with_the_projector():
    def trainable(**flags):
        model = build_model("tiny-2.5", vocab_size=1000)
        model = configure_trainable(model, lora=parse_train_args(["--model_name_or_path", "m", "--data_path", "d"]).lora, **flags)
        return {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad and n.endswith(SEPARATORS)}

    assert trainable(use_lora=False, fix_vit=True, fix_sampler=False) == set(SEPARATORS)
    assert trainable(use_lora=False, fix_vit=True, fix_sampler=True) == set()
    assert trainable(use_lora=True, fix_vit=True, fix_sampler=False) == set()  # peft saves modules, not bare parameters


def test_vision_aligned_batch_has_a_1x1_blank_image(tiny25_base, generated_data):
    base = tiny25_base
    from xcft.model.loading import load_pretrained

    model, tok = load_pretrained(base, dtype="float32", device="cpu")
    ds = build_dataset(generated_data, tok, 224, 1024, given_num=False, hd_num=4)
    text = next(i for i in range(len(ds)) if ds.conversation(i).id == "text")
    items = [ds[text], ds[text]]
    plain = DataCollator(ds.pad_token_id)(items)
    assert plain["pixel_values"] is None and plain["image_grids"] is None
    aligned = vision_aligned(DataCollator(ds.pad_token_id), model.config, ds.pad_token_id)(items)
    assert aligned["image_grids"].tolist() == [[1, 1]] and aligned["pixel_values"].shape == (2, 3, 224, 224)
    assert int(aligned["image_mask"].sum()) == model.config.hd_image_tokens(1, 1) == 145
    with torch.no_grad():
        a, b = model(**plain).loss, model(**aligned).loss
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def _tiny_argv(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """``xcft train`` on the generated HD data: hd_num 4, batch 2, lr 1e-3, no checkpoints, plus ``extra``."""
    return [
        "--model_name_or_path", str(base), "--data_path", str(data), "--output_dir", str(out),
        "--given_num", "false", "--hd_num", "4", "--max_length", "1024", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3", "--save_strategy", "no", *extra, *COMMON,
    ]  # fmt: skip


def test_tiny_2_5_trains_with_batch_2(tmp_path, tiny25_base, generated_data, read_losses):
    """Generated HD data (three crop grids, two images in one sample, text), batch 2, full finetune incl. the ViT."""
    out = tmp_path / "run"
    rc = train_command(_tiny_argv(tiny25_base, generated_data, out, "--max_steps", "3", "--fix_vit", "false"))
    assert rc == 0
    losses = read_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    before, after = load_file(str(tiny25_base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name in SEPARATORS:
        assert not torch.equal(before[name], after[name]), f"{name} was not trained"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("vit.") and "post_layernorm" not in k)
    assert all(torch.equal(before[k], after[k]) for k in before if "post_layernorm" in k)
    assert json.loads((out / "config.json").read_text())["family"] == "2.5"


def test_lone_image_layout_2_5_and_2_0(tmp_path, tiny25_base):
    """2.5: <s>, the image, then every turn (a system turn too); 2.0 keeps the image inside the first user turn."""
    from xcft.data.encode import IMAGE_SLOT, ImageSpec, encode_conversation
    from xcft.data.schema import read_file
    from xcft.model.loading import load_tokenizer

    tok = load_tokenizer(tiny25_base)
    img = _image(tmp_path / "a.png", (300, 200), 7)
    data = tmp_path / "s.json"
    data.write_text(
        json.dumps(
            [
                {
                    "image": img,
                    "conversations": [
                        {"from": "system", "value": "Be brief."},
                        {"from": "user", "value": "What?"},
                        {"from": "assistant", "value": "Noise."},
                    ],
                }
            ]
        )
    )
    (conv,), _ = read_file(data)
    spec = ImageSpec(224, 4)
    enc = encode_conversation(conv, tok, spec, 4096, [(2, 2)])
    n = spec.slots((2, 2))
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[1 : 1 + n] == [IMAGE_SLOT] * n
    text = tok.decode(enc.input_ids[1 + n :], skip_special_tokens=False)
    assert text.startswith("[UNUSED_TOKEN_146]system\nBe brief.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]user\nWhat?")
    assert [i for i, lab in zip(enc.input_ids, enc.labels) if lab != -100] == [
        *tok.encode_text("Noise.[UNUSED_TOKEN_145]"),
        tok.eos_token_id,
    ]
    old = encode_conversation(conv, tok, 56, 4096)  # 2.0: after the user header
    first = old.input_ids.index(IMAGE_SLOT)
    assert tok.decode(old.input_ids[:first], skip_special_tokens=False).endswith("[UNUSED_TOKEN_146]user\n")
    with pytest.raises(ValueError, match="one crop grid per image"):
        encode_conversation(conv, tok, spec, 4096)


@pytest.mark.parametrize("mode", ["--packing", "--group_by_length"])
def test_tiny_2_5_trains_packed_and_length_grouped(tmp_path, mode, tiny25_base, generated_data, read_losses):
    out = tmp_path / "run"
    rc = train_command(_tiny_argv(tiny25_base, generated_data, out, mode, "true", "--max_steps", "2"))
    assert rc == 0
    assert all(math.isfinite(v) for v in read_losses(out).values())


def test_hd_lengths_and_bad_images(tmp_path, tiny25_base, generated_data):
    from xcft.errors import DataError
    from xcft.model.loading import load_tokenizer

    tok = load_tokenizer(tiny25_base)
    ds = build_dataset(generated_data, tok, 224, 1024, given_num=False, hd_num=4)
    for i in range(len(ds)):  # lengths (grouping, packing) are the lengths of the items, without decoding
        assert ds.lengths[i] == ds[i]["input_ids"].shape[0]
        assert int(ds[i]["image_mask"].sum()) == sum(ds.image_spec.slots(g) for g in ds[i]["image_grids"].tolist())
    thin = _image(tmp_path / "thin.png", (3000, 1), 5)  # aspect ratio beyond what the HD transform handles
    data = tmp_path / "bad.json"
    data.write_text(
        json.dumps(
            [{"id": "x", "image": thin, "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "ho"}]}]
        )
    )
    with pytest.raises(DataError, match=r"sample 0 \(id 'x'\): image .*thin.png cannot be used: .*too elongated"):
        build_dataset(data, tok, 224, 1024, given_num=False, hd_num=4)


@pytest.fixture(scope="module")
def tiny25_no_dropout(workdir: Path, tiny25_base: Path) -> Path:
    """tiny-2.5 without Partial-LoRA dropout, so several ranks reproduce a one-process run exactly."""
    from xcft.model.loading import load_tokenizer, save_pretrained

    model = build_model("tiny-2.5", vocab_size=1000, seed=1, plora_dropout=0.0)
    return save_pretrained(model, load_tokenizer(tiny25_base), workdir / "tiny25_nodrop")


@pytest.mark.slow
def test_zero3_two_processes_with_text_only_ranks_equals_one_process(
    generated_data, tiny25_no_dropout, workdir, read_losses, subprocess_env, torchrun
):
    """ZeRO-3 gathers the tower's shards on every rank: a rank whose batch is text gets a blank 1x1 image."""
    pytest.importorskip("deepspeed")
    import subprocess

    argv = [
        "--model_name_or_path",
        str(tiny25_no_dropout),
        "--data_path",
        str(generated_data),
        "--given_num",
        "false",
        "--hd_num",
        "4",
        "--max_length",
        "1024",
        "--max_steps",
        "3",
        "--learning_rate",
        "1e-3",
        "--fix_vit",
        "false",
        "--save_strategy",
        "no",
        *COMMON,
    ]
    out = workdir / "z3_25"
    cmd = [
        *torchrun(),
        "train",
        *argv,
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "1",
        "--deepspeed",
        str(ROOT / "configs" / "ds_zero3.json"),
    ]
    r = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=900, cwd=str(ROOT))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    assert "one blank image" in r.stderr + r.stdout
    ref = workdir / "z3_25_ref"
    assert train_command([*argv, "--output_dir", str(ref), "--per_device_train_batch_size", "2"]) == 0
    got, expected = read_losses(out), read_losses(ref)
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)


# --------------------------------------------------------------------------- official checkpoint and flags

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
def test_official_full_finetune_flags(fixture_2d5_dir, examples_dir, tmp_path, read_losses, run_fresh_python):
    out = tmp_path / "full"
    rc = train_command(
        [
            "--model_name_or_path",
            str(fixture_2d5_dir),
            "--data_path",
            str(examples_dir / "data.txt"),
            "--output_dir",
            str(out),
            "--fix_vit",
            "False",
            "--fix_sampler",
            "False",
            "--use_lora",
            "False",
            *OFFICIAL_FLAGS,
            *COMMON,
        ]
    )
    assert rc == 0
    losses = read_losses(out)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    before, after = load_file(str(fixture_2d5_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name in (*SEPARATORS, "vision_proj.0.weight", "vit.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"):
        assert not torch.equal(before[name].float(), after[name].float()), f"{name} was not trained"
    assert _fresh_logits_sum(out, run_fresh_python) == pytest.approx(_xcft_logits_sum(out), rel=1e-5)


@pytest.mark.slow
def test_official_lora_flags_and_merge(fixture_2d5_dir, examples_dir, tmp_path, capsys, run_fresh_python):
    out = tmp_path / "lora"
    rc = train_command(
        [
            "--model_name_or_path",
            str(fixture_2d5_dir),
            "--data_path",
            str(examples_dir / "data.txt"),
            "--output_dir",
            str(out),
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
            *COMMON,
        ]
    )
    assert rc == 0
    assert (out / "adapter_model.safetensors").is_file()
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out), "--output", str(merged)]) == 0
    assert "1 image" in capsys.readouterr().out
    assert _fresh_logits_sum(merged, run_fresh_python) == pytest.approx(_xcft_logits_sum(merged), rel=1e-5)
    # the merged weights differ from the base: the adapter was trained
    assert _xcft_logits_sum(merged) != pytest.approx(_xcft_logits_sum(fixture_2d5_dir), rel=1e-7)

"""The memory plan against a measurement, its arithmetic, ``xcft plan`` and the check in ``xcft train``.

The central test runs two real training steps (``XcftTrainer``: forward, chunked head, backward,
clipping, fused AdamW) under :class:`~xcft.train.memory_probe.LiveTensorProbe` and asserts that the
plan's peak is within 10 % of the measured peak of live tensor storages, for the tiny and small
presets of both families, full / LoRA / QLoRA, checkpointing on and off. The synthetic rows have
the shape the plan assumes without data (``default_sample``): ``max_length`` positions, one image
(the largest crop grid for 2.5), every other position supervised.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from xcft.commands.bench.train import SyntheticDataset
from xcft.data.dataset import DataCollator
from xcft.errors import XcftError
from xcft.model.presets import build_model, preset_config
from xcft.train.args import parse_train_args
from xcft.train.memory_plan import (
    GIB,
    ModelShape,
    PlanSettings,
    compute_plan,
    default_sample,
    parse_gpu_memory,
    plan_for_config,
    settings_from_config,
    worst_hd_grid,
)
from xcft.train.memory_probe import LiveTensorProbe, measure_training_peak
from xcft.train.setup import prepare_model_for_training

TOLERANCE = 0.10
#: Row lengths: long enough that activations and the head outweigh fixed costs, short enough for seconds per case.
LENGTHS = {"tiny": 1024, "tiny-2.5": 1024, "small": 1400, "small-2.5": 1400}


def _argv(out, length: int, mode: str, checkpointing: bool) -> list[str]:
    argv = [
        "--model_name_or_path", "preset", "--data_path", "synthetic", "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "1", "--report_to", "none",
        "--save_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true", "--logging_steps", "100",
        "--max_length", str(length), "--gradient_checkpointing", str(checkpointing).lower(),
        "--use_lora", str(mode != "full").lower(),
    ]  # fmt: skip
    if mode == "qlora":
        argv += ["--bits", "4"]
    return argv


def measure_case(preset: str, mode: str, checkpointing: bool, out) -> tuple[int, int, str]:
    """(planned peak, measured peak, the plan's phase) of two training steps of ``preset``."""
    length = LENGTHS[preset]
    cfg = parse_train_args(_argv(out, length, mode, checkpointing))
    model = build_model(preset)
    shape = ModelShape.from_config(model.config)
    settings = settings_from_config(cfg, shape, device="cpu", gpus=1)
    sample = default_sample(shape, settings)
    plan = compute_plan(shape, settings, sample)
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
        from xcft.model.quantization import quantize_model

        model = quantize_model(model, bits=4, compute_dtype=torch.float32, device="cpu")
    model = prepare_model_for_training(cfg, model)
    room = length - 8
    grid = (
        worst_hd_grid(int(settings.hd_num or 0), shape.img_size, lambda g: shape.image_tokens(*g) <= room) if shape.hd else None
    )
    data = SyntheticDataset(
        4,
        length,
        1 if sample.image_slots else 0,
        max(1, sample.image_slots),
        shape.img_size,
        shape.vocab,
        2,
        grid=grid,
        supervised_fraction=1.0,
    )
    measured = measure_training_peak(model, cfg.training, data, DataCollator(pad_token_id=2))
    return plan.peak_bytes, measured["peak_bytes"], plan.phase


CASES = [
    pytest.param(
        preset,
        mode,
        ckpt,
        id=f"{preset}-{mode}-{'ckpt' if ckpt else 'nockpt'}",
        marks=[pytest.mark.slow] if "small" in preset else [],
    )
    for preset in ("tiny", "tiny-2.5", "small", "small-2.5")
    for mode in ("full", "lora", "qlora")
    for ckpt in (False, True)
]


@pytest.mark.parametrize(("preset", "mode", "checkpointing"), CASES)
def test_plan_within_10_percent_of_measured_live_tensors(preset, mode, checkpointing, tmp_path):
    planned, measured, phase = measure_case(preset, mode, checkpointing, tmp_path)
    ratio = planned / measured
    assert abs(ratio - 1) <= TOLERANCE, (
        f"{preset} {mode} checkpointing={checkpointing}: plan {planned / 1e6:.2f} MB ({phase}) vs measured "
        f"{measured / 1e6:.2f} MB (ratio {ratio:.3f})"
    )


def test_packed_rows_within_10_percent(tmp_path):
    """Packed rows: SDPA gets a block-diagonal mask (kept per layer as an additive bias) and repeated k / v."""
    from xcft.data.packing import PackedDataset, PackingCollator
    from xcft.train.memory_plan import SampleShape

    length = 1024
    cfg = parse_train_args([*_argv(tmp_path, length, "full", False), "--packing", "true"])
    model = build_model("tiny")
    shape = ModelShape.from_config(model.config)
    settings = settings_from_config(cfg, shape, device="cpu", gpus=1)
    assert settings.attention_mask
    model = prepare_model_for_training(cfg, model)
    half = length // 2  # two samples per row, one image each
    data = PackedDataset(
        SyntheticDataset(8, half, 1, shape.image_tokens(), shape.img_size, shape.vocab, 2, supervised_fraction=1.0), length
    )
    sample = SampleShape(length, 2 * shape.image_tokens(), 2, 2 * (half - shape.image_tokens() - 1), "two packed samples")
    planned = compute_plan(shape, settings, sample).peak_bytes
    measured = measure_training_peak(model, cfg.training, data, PackingCollator(pad_token_id=2))["peak_bytes"]
    assert abs(planned / measured - 1) <= TOLERANCE, (planned, measured)


# ---------------------------------------------------------------------------- the probe itself


def test_probe_counts_storages_once_and_frees_them():
    probe = LiveTensorProbe()
    with probe:
        a = torch.zeros(1000)  # 4000 bytes
        view = a.view(10, 100)  # same storage: not counted again
        b = a + 1  # 4000 more
        assert probe.current_bytes == 8000
        del a
        assert probe.current_bytes == 8000  # the view keeps the storage alive
        del view
        assert probe.current_bytes == 4000
        c = torch.ones(1000, dtype=torch.float64)  # 8000: b and c make the peak
        del b, c
    assert probe.peak_bytes == 12000
    assert probe.current_bytes == 0


def test_probe_roots_count_existing_weights_and_gradients():
    layer = torch.nn.Linear(10, 20)
    layer.weight.grad = torch.zeros_like(layer.weight)
    probe = LiveTensorProbe()
    probe.add_roots([layer])
    assert probe.current_bytes == (200 + 20 + 200) * 4


# ---------------------------------------------------------------------------- arithmetic


def test_parameter_counts_match_the_models():
    for preset in ("tiny", "tiny-2.5", "small", "small-2.5"):
        model = build_model(preset, device="meta")
        assert ModelShape.from_config(model.config).total_params() == sum(p.numel() for p in model.parameters()), preset
    for preset in ("7b", "7b-2.5"):
        model = build_model(preset, device="meta")
        shape = ModelShape.from_config(model.config)
        assert shape.total_params() == sum(p.numel() for p in model.parameters())
        linears = sum(
            p.numel()
            for n, p in model.named_parameters()
            if n.endswith(("wqkv.weight", "wo.weight", "w1.weight", "w2.weight", "w3.weight"))
        )
        assert shape.base_linear_params() == linears


def test_official_2_5_folder_is_planned_as_2_5(fixture_2d5_dir):
    """An official 2.5 folder says internlm2 in config.json: the family comes from the weight names in the header."""
    from xcft.model.loading import load_model
    from xcft.train.memory_plan import model_shape

    shape, _ = model_shape(str(fixture_2d5_dir))
    model = load_model(fixture_2d5_dir, dtype=torch.float32, device="cpu")
    assert shape.family == "2.5" and shape.img_size == model.config.img_size and shape.plora_r == model.config.plora_r
    assert shape.total_params() == sum(p.numel() for p in model.parameters())


def test_2_5_image_tokens_agree_with_the_config():
    config = preset_config("7b-2.5")
    shape = ModelShape.from_config(config)
    for grid in [(1, 1), (2, 3), (3, 6)]:
        assert shape.image_tokens(*grid) == config.hd_image_tokens(*grid)
    grid = worst_hd_grid(18, 560)
    assert grid == (18, 1) and shape.image_tokens(*grid) == 7981


def test_parse_gpu_memory():
    assert parse_gpu_memory("24GiB") == 24 * GIB
    assert parse_gpu_memory("80GB") == 80 * 10**9
    assert parse_gpu_memory("40000MiB") == 40000 * 2**20
    assert parse_gpu_memory("A100-40GB") == 40 * GIB
    assert parse_gpu_memory("rtx4090") == parse_gpu_memory("4090") == 24 * GIB
    assert parse_gpu_memory("NVIDIA H200") > 140 * GIB
    with pytest.raises(XcftError, match="GPU names"):
        parse_gpu_memory("a big one")


def _7b(preset: str = "7b") -> ModelShape:
    return ModelShape.from_config(preset_config(preset))


QLORA_GPU = PlanSettings(use_lora=True, bits=4, amp="bf16", checkpointing=True, batch=1, device="cuda")


def test_issue_targets_qlora_7b_on_one_gpu():
    """Planned peaks (live tensors, as torch.cuda.max_memory_allocated counts them): 2.0 QLoRA (490 px, 4096
    tokens) <= 12 GiB, 2.5 QLoRA (hd_num 18, 16k tokens) <= 22 GiB also with the CUDA context and allocator."""
    p20 = compute_plan(_7b("7b"), dataclasses.replace(QLORA_GPU, max_length=4096))
    p25 = compute_plan(_7b("7b-2.5"), dataclasses.replace(QLORA_GPU, max_length=16384, hd_num=18))
    assert p20.peak_bytes <= 12 * GIB, p20.to_dict()
    assert p25.required_bytes <= 22 * GIB, p25.to_dict()


def test_plan_orders_the_obvious():
    shape = _7b()
    base = PlanSettings(use_lora=True, model_dtype="bfloat16", amp="bf16", batch=1, max_length=4096, device="cuda")
    lora = compute_plan(shape, base).peak_bytes
    assert compute_plan(shape, dataclasses.replace(base, checkpointing=True)).peak_bytes < lora
    assert compute_plan(shape, dataclasses.replace(base, bits=4)).peak_bytes < lora
    assert compute_plan(shape, dataclasses.replace(base, batch=2)).peak_bytes > lora
    full = compute_plan(shape, dataclasses.replace(base, use_lora=False, model_dtype="float32")).peak_bytes
    assert full > lora
    zero3 = compute_plan(shape, dataclasses.replace(base, use_lora=False, model_dtype="float32", zero_stage=3, gpus=8))
    assert zero3.peak_bytes < full


def test_sample_from_real_lengths_unpacked_and_packed():
    from xcft.train.memory_plan import sample_from_lengths

    lengths, slots, views = [300, 1200, 900], [0, 1000, 600], [0, 2, 1]
    unpacked = sample_from_lengths(lengths, slots, views, PlanSettings(), 2048)
    assert (unpacked.positions, unpacked.image_slots, unpacked.views) == (1200, 1000, 2)
    packed = sample_from_lengths(lengths, slots, views, PlanSettings(packing=True), 2048)
    assert packed.positions == 2048 and packed.image_slots == 1707  # the densest sample's share of a row
    assert packed.views == 4 and packed.targets == 2048 - 1707 - 1


def test_settings_read_the_deepspeed_config(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = parse_train_args(
        ["--model_name_or_path", "preset:7b", "--output_dir", str(tmp_path), "--use_cpu", "true",
         "--per_device_train_batch_size", "1", "--gpus", "8"],
        require_data=False,
    )  # fmt: skip
    cfg.training.deepspeed = str(root / "configs" / "ds_zero3_offload.json")  # read as a file, as the Trainer does
    st = settings_from_config(cfg, _7b(), device="cuda", gpus=8)
    assert (st.zero_stage, st.offload_optimizer, st.offload_params, st.gpus) == (3, True, True, 8)
    cfg.training.deepspeed = str(root / "configs" / "ds_zero2.json")
    st2 = settings_from_config(cfg, _7b(), device="cuda", gpus=8)
    assert st2.zero_stage == 2 and not st2.offload_optimizer
    full = dataclasses.replace(st2, amp="bf16")
    assert (
        compute_plan(_7b(), dataclasses.replace(full, gpus=8)).peak_bytes
        < compute_plan(_7b(), dataclasses.replace(full, gpus=2)).peak_bytes
    )


# ---------------------------------------------------------------------------- xcft plan / xcft train


def test_xcft_plan_text_and_json(capsys, tiny_folder, tiny_data):
    from xcft.cli import main

    folder = tiny_folder()
    common = ["plan", "--model_name_or_path", str(folder), "--use_lora", "true", "--per_device_train_batch_size", "1"]
    assert main([*common, "--gpu_memory", "24GiB"]) == 0
    text = capsys.readouterr().out
    assert "memory plan for" in text and "fits" in text and "weights" in text
    assert main([*common, "--data_path", str(tiny_data), "--gpu_memory", "1MiB", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["device"] == "cuda" and out["budget_bytes"] == 2**20
    assert "longest sample" in out["sample"]["source"]
    assert {p["name"] for p in out["parts"]} >= {"weights", "batch"}
    assert out["alternatives"] and all("change" in a for a in out["alternatives"])


def test_train_refuses_before_loading_weights_when_plan_does_not_fit(tiny_folder, tiny_data, tmp_path, monkeypatch):
    """On a GPU whose free memory is below the plan: one error line naming the plan and the fixes, no weight read."""
    from xcft.commands import train as train_module
    from xcft.train import memory_plan

    cfg = parse_train_args(
        ["--model_name_or_path", str(tiny_folder()), "--data_path", str(tiny_data), "--output_dir", str(tmp_path / "o")]
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=0: (2**20, 80 * GIB))

    def no_load(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(train_module, "load_base_model", no_load)
    cfg.training.use_cpu = False
    with pytest.raises(XcftError, match=r"memory plan needs .* --ignore_memory_plan true") as exc:
        train_module._run(cfg, None)  # the run itself: the plan comes before the weights
    assert "\n" not in str(exc.value) and "MiB" in str(exc.value)  # a tiny model's plan is shown in MiB
    cfg.memory.ignore_memory_plan = True
    assert memory_plan.check_memory_plan(cfg).fits is False  # warned, not refused


def test_train_on_cpu_plans_host_ram(tiny_folder, tiny_data, tmp_path, caplog):
    from xcft.train.memory_plan import check_memory_plan

    cfg = parse_train_args(
        [
            "--model_name_or_path",
            str(tiny_folder()),
            "--data_path",
            str(tiny_data),
            "--output_dir",
            str(tmp_path / "o"),
            "--use_cpu",
            "true",
        ]
    )
    with caplog.at_level("INFO", logger="xcft.train.memory_plan"):
        run = check_memory_plan(cfg)
    assert run.plan.settings.device == "cpu" and "available of" in run.budget_source
    assert "memory plan for" in caplog.text
    assert run.files is not None  # the data read for the plan is handed to the run


def test_allocator_default_respects_the_user(monkeypatch):
    from xcft.train.memory_plan import default_allocator_settings

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert default_allocator_settings() is True
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert default_allocator_settings() is False
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_plan_for_preset_and_gpus(tmp_path):
    cfg = parse_train_args(
        ["--model_name_or_path", "preset:7b-2.5", "--output_dir", str(tmp_path), "--use_cpu", "true", "--use_lora", "true",
         "--bits", "4", "--bf16", "true", "--gradient_checkpointing", "true", "--per_device_train_batch_size", "1", "--gpu_memory", "24GiB"],
        require_data=False,
    )  # fmt: skip
    run = plan_for_config(cfg)
    assert run.shape.family == "2.5" and run.plan.settings.hd_num == 18 and run.plan.settings.device == "cuda"
    assert run.fits


@pytest.mark.parametrize("family", ["2.0", "2.5"])
def test_plan_reads_image_counts_and_grids_from_the_columns(family, tok, tiny_data, hd_data, monkeypatch):
    """The planner sees every sample's images without reading a record, as the records themselves give them."""
    import numpy as np

    from xcft.data.cache_options import CacheOptions
    from xcft.data.dataset import FileData, read_data
    from xcft.data.table import SampleTable

    data, hd_num = (tiny_data, None) if family == "2.0" else (hd_data, 4)
    files = read_data(data, tok, 56, 400, hd_num=hd_num, cache=CacheOptions(no_data_cache=True))
    as_lists = [
        FileData(fd.display, fd.path, list(fd.conversations), fd.lengths, fd.draw_count, fd.skipped, list(fd.grids))
        for fd in files
    ]
    monkeypatch.setattr(SampleTable, "raw_record", lambda self, k: pytest.fail("a record was read"))
    seen = []
    for fd, ref in zip(files, as_lists, strict=True):
        counts, grids = fd.image_grids()
        ref_counts, ref_grids = ref.image_grids()
        assert np.array_equal(counts, ref_counts) and np.array_equal(grids, ref_grids)
        seen.append(grids)
    grids = np.concatenate(seen)
    assert len(grids) > 1 and (family == "2.0") == (not grids.any())

"""--packing and --group_by_length through ``xcft train`` (tiny model, small official-layout mixture, CPU)."""

from __future__ import annotations

import math

import pytest
import yaml

from xcft.commands.train import train_command
from xcft.errors import XcftError
from xcft.train.args import parse_train_args


@pytest.fixture(scope="module")
def argv(tiny_base, tiny_data, train_argv):
    """``argv(out, *flags)``: xcft train arguments for the tiny folder on the tiny mixture (no checkpoints)."""

    def make(out, *extra):
        return train_argv(tiny_base, tiny_data, out, "--save_strategy", "no", *extra)

    return make


def test_packed_training_run(tmp_path, argv, read_losses):
    out = tmp_path / "packed"
    assert train_command(argv(out, "--packing", "true", "--max_steps", "2", "--per_device_train_batch_size", "2")) == 0
    losses = read_losses(out)
    assert losses and all(math.isfinite(v) and v > 0 for v in losses.values())
    resolved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert resolved["packing"] is True


def test_group_by_length_run_and_options(tmp_path, argv):
    out = tmp_path / "grouped"
    assert train_command(argv(out, "--group_by_length", "true", "--max_steps", "1", "--per_device_train_batch_size", "2")) == 0
    cfg = parse_train_args(argv(out, "--group_by_length", "true"))
    assert cfg.data.group_by_length is True
    assert (
        getattr(cfg.training, "train_sampling_strategy", "group_by_length") == "group_by_length" or cfg.training.group_by_length
    )
    with pytest.raises(XcftError, match="do not combine"):
        parse_train_args(argv(out, "--group_by_length", "true", "--packing", "true"))


def test_build_datasets_packs_and_sampler_groups(tmp_path, argv, tiny_base):
    from xcft.data.packing import LengthGroupedSampler, PackedDataset, PackingCollator
    from xcft.model.loading import load_pretrained
    from xcft.train.inputs import build_datasets
    from xcft.train.trainer import XcftTrainer

    model, tok = load_pretrained(tiny_base, dtype="float32", device="cpu")
    cfg = parse_train_args(argv(tmp_path, "--packing", "true", "--max_length", "2000"))
    train_ds, _, collator = build_datasets(cfg, tok, model.config)
    assert isinstance(train_ds, PackedDataset) and isinstance(collator, PackingCollator)
    assert train_ds.num_samples == len(train_ds.base) and max(train_ds.lengths) <= 2000
    assert len(train_ds) < len(train_ds.base)  # several samples share rows
    batch = collator([train_ds[0]])
    assert "attention_mask" not in batch and "position_ids" in batch
    cfg = parse_train_args(argv(tmp_path, "--group_by_length", "true", "--per_device_train_batch_size", "2"))
    train_ds, _, collator = build_datasets(cfg, tok, model.config)
    trainer = XcftTrainer(model=model, args=cfg.training, train_dataset=train_ds, data_collator=collator)
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)

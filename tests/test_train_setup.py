"""Getting a model ready to train (xcft.train.setup): the official freezing rules, peft LoRA."""

from __future__ import annotations

import pytest

from xcft.train.args import parse_train_args
from xcft.train.setup import SEPARATOR_NAMES, configure_trainable


def test_separators_train_with_the_projector(tiny_model):
    def trainable(**flags):
        model = tiny_model("tiny-2.5", plora_dropout=0.05)
        model = configure_trainable(model, lora=parse_train_args(["--model_name_or_path", "m", "--data_path", "d"]).lora, **flags)
        return {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad and n.endswith(SEPARATOR_NAMES)}

    assert trainable(use_lora=False, fix_vit=True, fix_sampler=False) == set(SEPARATOR_NAMES)
    assert trainable(use_lora=False, fix_vit=True, fix_sampler=True) == set()
    assert trainable(use_lora=True, fix_vit=True, fix_sampler=False) == set()  # peft saves modules, not bare parameters


def test_lora_mode_needs_the_lora_settings(tiny_model):
    with pytest.raises(ValueError, match="needs the LoRA settings"):
        configure_trainable(tiny_model(), use_lora=True, fix_vit=True, fix_sampler=False)

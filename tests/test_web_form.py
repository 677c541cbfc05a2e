"""The web UI's Train form is generated from the ``xcft train`` dataclasses and means what the CLI means.

No browser here: the form's model (fields, defaults, command line, YAML) against ``parse_train_args``.
"""

from __future__ import annotations

from pathlib import Path

from xcft.commands.web.train_form import HIDDEN_FIELDS, changed_values, form_fields, to_argv, yaml_preview
from xcft.train.args import parse_train_args, resolved_config, valid_keys


def _raw(fields, **values):
    raw = [f.form_default() for f in fields]
    names = [f.name for f in fields]
    for key, value in values.items():
        raw[names.index(key)] = value
    return raw


def test_every_option_has_a_field():
    names = [f.name for f in form_fields()]
    assert len(names) == len(set(names))
    assert set(names) == set(valid_keys()) - HIDDEN_FIELDS


def test_untouched_form_changes_nothing():
    fields = form_fields()
    assert changed_values(fields, _raw(fields)) == {}


def test_command_and_yaml_give_the_same_run(tmp_path: Path):
    fields = form_fields()
    values = changed_values(
        fields,
        _raw(
            fields,
            model_name_or_path="/m",
            data_path="/d.txt",
            use_lora=True,
            lora_r=8,
            learning_rate=0.002,
            max_steps=120,
            eval_steps="30",
            eval_strategy="steps",
            lora_target_modules="attention.wqkv attention.wo",
            output_dir=str(tmp_path / "out"),
            tf32="false",
        ),
    )
    assert values["lora_r"] == 8 and values["eval_steps"] == 30 and values["tf32"] is False
    assert values["lora_target_modules"] == ["attention.wqkv", "attention.wo"]
    from_flags = parse_train_args(to_argv(values))
    config = tmp_path / "config.yaml"
    config.write_text(yaml_preview(values))
    from_yaml = parse_train_args([str(config)])
    assert resolved_config(from_flags) == resolved_config(from_yaml)
    assert from_flags.lora.lora_r == 8 and from_flags.training.max_steps == 120 and from_flags.training.eval_steps == 30
    assert from_flags.model.use_lora and from_flags.training.learning_rate == 0.002


def test_stage_options_have_their_own_group():
    groups = {f.name: f.group for f in form_fields()}
    assert groups["stage"] == groups["beta"] == groups["loss_type"] == "preference"
    assert groups["bits"] == "model"

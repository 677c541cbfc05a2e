"""xcft train configuration: official flags, YAML + overrides, unknown keys, resolved config, configs/, scripts."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from xcft.commands.train import train_command
from xcft.errors import XcftError
from xcft.model.configuration_xcomposer2 import XComposer2Config
from xcft.run_files import RESOLVED_CONFIG_NAME
from xcft.train.args import parse_train_args, valid_keys, write_resolved_config
from xcft.train.inputs import resolve_run_sizes

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["--model_name_or_path", "m", "--data_path", "d.txt"]


def _official_flags(script: Path) -> list[str]:
    """Every --flag a finetune script passes."""
    text = script.read_text().split("xcft.cli train", 1)[1]
    return sorted(set(re.findall(r"--([a-z_0-9]+)", text)))


def test_official_finetune_py_flags_parse(tmp_path):
    argv = [
        *REQUIRED,
        "--given_num",
        "True",
        "--img_size",
        "490",
        "--hd_num",
        "18",
        "--batch_size",
        "2",
        "--max_length",
        "4096",
        "--use_lora",
        "True",
        "--fix_vit",
        "False",
        "--fix_sampler",
        "True",
        "--lora_r",
        "16",
        "--lora_alpha",
        "32",
        "--lora_dropout",
        "0.1",
        "--lora_target_modules",
        "attention.wqkv",
        "attention.wo",
        "--lora_weight_path",
        "",
        "--lora_bias",
        "none",
        "--output_dir",
        str(tmp_path / "o"),
        "--per_device_train_batch_size",
        "3",
        "--gradient_accumulation_steps",
        "4",
        "--evaluation_strategy",
        "no",
        "--warmup_ratio",
        "0.01",
        "--bf16",
        "False",
        "--adam_beta2",
        "0.95",
        "--lr_scheduler_type",
        "cosine",
        "--gradient_checkpointing",
    ]
    cfg = parse_train_args(argv)
    assert cfg.model.use_lora is True and cfg.model.fix_vit is False and cfg.model.fix_sampler is True
    assert cfg.lora.lora_r == 16 and cfg.lora.lora_alpha == 32 and cfg.lora.lora_dropout == pytest.approx(0.1)
    assert cfg.lora.lora_target_modules == ["attention.wqkv", "attention.wo"]
    assert cfg.data.img_size == 490 and cfg.data.max_length == 4096 and cfg.data.given_num is True
    # official --batch_size folds into the per-device batch: 3 * 2
    assert cfg.training.per_device_train_batch_size == 6 and cfg.data.batch_size == 1
    assert cfg.training.gradient_accumulation_steps == 4
    assert cfg.training.warmup_steps == pytest.approx(0.01)  # warmup_ratio -> transformers 5 warmup_steps ratio
    # transformers 5.17 has no activation_checkpointing: the flag keeps its old name there
    checkpointing = "activation_checkpointing" if hasattr(cfg.training, "activation_checkpointing") else "gradient_checkpointing"
    assert getattr(cfg.training, checkpointing) is True
    assert cfg.training.adam_beta2 == pytest.approx(0.95)


@pytest.mark.parametrize("name", ["finetune.sh", "finetune_lora.sh"])
def test_every_flag_of_shipped_scripts_is_valid(name):
    script = ROOT / name
    unknown = [f for f in _official_flags(script) if f not in set(valid_keys())]
    assert unknown == []
    text = script.read_text()
    assert "torchrun" in text and "xcft.cli train" in text
    missing = [
        v
        for v in ("GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "MODEL", "DATA")
        if f"${v}" not in text and f"${{{v}" not in text
    ]
    assert missing == []
    subprocess.run(["sh", "-n", str(script)], check=True)  # POSIX sh syntax


def test_yaml_then_flags_override(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(
        "model_name_or_path: m\ndata_path: d.txt\nlearning_rate: 3.0e-4\nlora_r: 8\nuse_lora: true\n"
        "lora_target_modules: [attention.wqkv]\nnum_train_epochs: 2\noutput-dir: " + str(tmp_path / "o") + "\n"
    )
    cfg = parse_train_args([str(conf), "--lora_r", "4", "--num_train_epochs", "3"])
    assert cfg.lora.lora_r == 4  # flag wins
    assert cfg.training.num_train_epochs == 3
    assert cfg.training.learning_rate == pytest.approx(3e-4)  # from YAML
    assert cfg.lora.lora_target_modules == ["attention.wqkv"]
    assert cfg.model.use_lora is True
    assert {"lora_r", "learning_rate", "num_train_epochs"} <= cfg.explicit


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([*REQUIRED, "--learnig_rate", "1e-4"], "learning_rate"),
        ([*REQUIRED, "--lora_rank", "8"], "lora_r"),
        ([*REQUIRED, "--fix_vitt", "true"], "fix_vit"),
        ([*REQUIRED, "--per_device_train_batchsize=2"], "per_device_train_batch_size"),
    ],
)
def test_unknown_flag_suggests_nearest(argv, expected):
    with pytest.raises(XcftError, match=rf"did you mean '{expected}'"):
        parse_train_args(argv)


def test_unknown_yaml_key_suggests_nearest(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("model_name_or_path: m\ndata_path: d\ngradient_acumulation_steps: 4\n")
    with pytest.raises(
        XcftError, match=r"c\.yaml: unknown option 'gradient_acumulation_steps'; did you mean 'gradient_accumulation_steps'"
    ):
        parse_train_args([str(conf)])


def test_missing_required_and_bad_values(tmp_path):
    with pytest.raises(XcftError, match="model_name_or_path is required"):
        parse_train_args(["--data_path", "d"])
    with pytest.raises(XcftError, match="data_path is required"):
        parse_train_args(["--model_name_or_path", "m"])
    with pytest.raises(XcftError, match="eval_split"):
        parse_train_args([*REQUIRED, "--eval_split", "1.5"])
    with pytest.raises(XcftError, match="does not exist"):
        parse_train_args([str(tmp_path / "nope.yaml")])
    with pytest.raises(XcftError, match="only the first argument"):
        parse_train_args([*REQUIRED, "stray"])


def test_xcft_defaults_and_conditional_defaults(tmp_path):
    cfg = parse_train_args([*REQUIRED, "--output_dir", str(tmp_path)])
    assert cfg.training.report_to == ["tensorboard"]
    assert cfg.training.remove_unused_columns is False
    assert cfg.training.eval_strategy.value == "no"
    cfg = parse_train_args([*REQUIRED, "--eval_split", "0.1", "--fix_vit", "false", "--report_to", "none"])
    assert cfg.training.eval_strategy.value == "epoch"
    assert cfg.training.ddp_find_unused_parameters is True
    assert cfg.training.report_to in ([], ["none"], "none")
    cfg = parse_train_args([*REQUIRED, "--eval_split", "0.1", "--eval_strategy", "steps", "--eval_steps", "5"])
    assert cfg.training.eval_strategy.value == "steps"


def test_resolved_config_round_trips(tmp_path):
    argv = [
        *REQUIRED,
        "--output_dir",
        str(tmp_path),
        "--use_lora",
        "--lora_r",
        "8",
        "--learning_rate",
        "2e-4",
        "--eval_split",
        "0.2",
        "--seed",
        "7",
        "--save_steps",
        "3",
    ]
    cfg = parse_train_args(argv)
    path = write_resolved_config(cfg, tmp_path)
    assert path.name == RESOLVED_CONFIG_NAME
    data = yaml.safe_load(path.read_text())
    assert data["lora_r"] == 8 and data["seed"] == 7 and data["use_lora"] is True and data["eval_split"] == 0.2
    again = parse_train_args([str(path)])
    assert again.model == cfg.model and again.lora == cfg.lora and again.data == cfg.data
    assert again.training.to_dict() == cfg.training.to_dict()


def test_help_lists_official_and_hf_flags(capsys):

    assert train_command(["--help"]) == 0
    out = capsys.readouterr().out
    flags = ("--fix_vit", "--lora_target_modules", "--deepspeed", "--eval_split", "--gradient_accumulation_steps")
    assert [f for f in flags if f not in out] == []


def test_deepspeed_configs_are_valid_for_transformers():
    pytest.importorskip("deepspeed")
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    stages = {}
    for name in ("ds_zero2.json", "ds_zero3.json", "ds_zero3_offload.json"):
        conf = json.loads((ROOT / "configs" / name).read_text())
        stages[name] = conf["zero_optimization"]["stage"]
        assert conf["train_micro_batch_size_per_gpu"] == "auto" and conf["gradient_accumulation_steps"] == "auto"
        HfTrainerDeepSpeedConfig(conf)  # parses
    assert stages == {"ds_zero2.json": 2, "ds_zero3.json": 3, "ds_zero3_offload.json": 3}
    off = json.loads((ROOT / "configs" / "ds_zero3_offload.json").read_text())["zero_optimization"]
    assert off["offload_optimizer"]["device"] == "cpu" and off["offload_param"]["device"] == "cpu"
    for name in ("ds_zero3.json", "ds_zero3_offload.json"):
        z = json.loads((ROOT / "configs" / name).read_text())["zero_optimization"]
        assert z["stage3_gather_16bit_weights_on_model_save"] is True  # consolidated weights at save


def test_fsdp_config_names_our_layer_classes():
    from xcft.model import modeling_xcomposer2 as m

    conf = json.loads((ROOT / "configs" / "fsdp.json").read_text())
    classes = conf["transformer_layer_cls_to_wrap"]
    assert set(classes) == set(m.XComposer2PreTrainedModel._no_split_modules)
    cfg = parse_train_args([*REQUIRED, "--fsdp", "full_shard auto_wrap", "--fsdp_config", str(ROOT / "configs" / "fsdp.json")])
    assert cfg.training.fsdp_config["transformer_layer_cls_to_wrap"] == classes


# --------------------------------------------------------------------------- InternLM-XComposer-2.5 flags


def test_2_5_defaults_hd_num_max_length_and_resolution(tmp_path):
    def parse(*flags: str):
        return parse_train_args(["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path), *flags])

    cfg = parse()
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

    ok = parse("--resolution", "560", "--hd_num", "6", "--max_length", "8192")
    sizes = resolve_run_sizes(ok, config_25)
    assert (sizes.img_size, sizes.max_length, sizes.hd_num) == (560, 8192, 6)
    bad = parse("--resolution", "490")
    with pytest.raises(XcftError, match=r"--resolution 490: the model is an InternLM-XComposer-2.5 model whose views .* 560 px"):
        resolve_run_sizes(bad, config_25)
    with pytest.raises(XcftError, match="--hd_num must be at least 1"):
        parse("--hd_num", "0")
    with pytest.raises(XcftError, match="disagree"):
        parse("--resolution", "560", "--img_size", "490")
    with pytest.raises(XcftError, match=r"--hd_num 6: the model is an InternLM-XComposer2 \(2\.0\) model"):
        resolve_run_sizes(ok, XComposer2Config())  # one rule everywhere: --hd_num on a 2.0 model is an error

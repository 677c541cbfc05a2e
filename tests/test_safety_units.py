"""The safety rules as library functions (fast, in-process): output-folder marker/manifest, overlap,
lock, own-checkpoint rotation, save-error translation, checked model and JSON reading, option types."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from xcft.errors import ModelFolderError, OutputFolderError, SaveError, XcftError
from xcft.output_dir import (
    FolderLock,
    OutputFolder,
    check_no_overlap,
    foreign_entries,
    io_failure_reason,
    is_marked,
    own_entries,
    save_errors,
    write_marker,
)


def test_claim_marks_first_and_tracks_only_what_xcft_wrote(tmp_path):
    out = tmp_path / "out"
    folder = OutputFolder.claim(out, "train")
    assert is_marked(out) and [p.name for p in out.iterdir()] == [".xcft-output.json"]
    (out / "adapter.bin").write_bytes(b"x")
    folder.record()
    (out / "notes.txt").write_text("the user's")  # added by the user after the run
    again = OutputFolder.claim(out, "train")
    assert again.foreign == {"notes.txt"} and foreign_entries(out) == ["notes.txt"]
    assert "adapter.bin" in own_entries(out)
    with pytest.raises(OutputFolderError, match=r"notes\.txt"):
        again.check_writable(["notes.txt"])
    assert again.remove_own() == ["adapter.bin"]
    assert sorted(p.name for p in out.iterdir()) == [".xcft-output.json", "notes.txt"]


def test_unmarked_non_empty_folder_and_files_are_refused_without_writing(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("a")
    with pytest.raises(OutputFolderError, match="xcft did not write"):
        OutputFolder.claim(tmp_path / "mine", "train")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["a.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        OutputFolder.claim(tmp_path / "file", "train")


@pytest.mark.parametrize(
    ("out", "words"), [("model", "is the model"), ("link", "is the model"), ("model/o", "is inside"), (".", "contains")]
)
def test_overlap_rules(tmp_path, out, words):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(OutputFolderError, match=words):
        check_no_overlap(tmp_path / out, [("the model", model)])
    check_no_overlap(tmp_path / "other", [("the model", model)])
    check_no_overlap(model / "o", [("data", model)], allow_inside=True)  # output below a data folder is fine


def test_lock_is_exclusive_names_the_pid_and_is_released(tmp_path):
    import os

    with FolderLock(tmp_path), pytest.raises(OutputFolderError, match=f"PID {os.getpid()}"):
        FolderLock(tmp_path).acquire()
    FolderLock(tmp_path).acquire().release()


def test_rotation_deletes_only_own_checkpoints(tmp_path):
    from xcft.run_files import find_last_checkpoint
    from xcft.train.checkpoints import rotate_own_checkpoints

    for step in (1, 2, 3):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text("{}")
        write_marker(ckpt, "train")
    user = tmp_path / "checkpoint-0"
    user.mkdir()
    (user / "trainer_state.json").write_text("{}")  # looks like a checkpoint, but is the user's
    deleted = rotate_own_checkpoints(tmp_path, 1, best=str(tmp_path / "checkpoint-1"))
    assert [p.name for p in deleted] == ["checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0", "checkpoint-1", "checkpoint-3"]
    assert find_last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    user_last = tmp_path / "checkpoint-9"
    shutil.copytree(user, user_last)
    assert find_last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")  # never resumes from the user's


def test_io_failure_reasons_and_save_errors(tmp_path):
    assert io_failure_reason(OSError(errno.ENOSPC, "x"), tmp_path) == "No space left on device"

    class SafetensorError(Exception):
        pass

    assert io_failure_reason(SafetensorError("I/O error: No space left on device (os error 28)"), tmp_path) == (
        "No space left on device"
    )
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert io_failure_reason(torch_error, tmp_path).startswith("write failed")  # plenty of space here
    assert io_failure_reason(ValueError("a bug"), tmp_path) is None
    cleaned = []
    with (
        pytest.raises(SaveError, match=r"cannot write checkpoint-7 to .*: No space left on device; nothing remains"),
        save_errors("checkpoint-7", tmp_path, remains=lambda: "nothing remains", cleanup=lambda: cleaned.append(1)),
    ):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert cleaned == [1]
    with pytest.raises(ValueError), save_errors("x", tmp_path):  # not an I/O failure: passes through unchanged
        raise ValueError("a bug")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_base):
    """A copy of the shared tiny folder: these tests break files in it."""
    import shutil

    return Path(shutil.copytree(tiny_base, tmp_path_factory.mktemp("units") / "base"))


def test_load_pretrained_raises_model_folder_errors(tiny, tmp_path):
    import xcft

    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(tiny, folder)
        change(folder)
        with pytest.raises(ModelFolderError) as info:
            xcft.load_pretrained(folder, device="cpu")
        assert isinstance(info.value, XcftError) and str(folder) in str(info.value)
        return str(info.value)

    def to_bin(folder: Path, truncate: bool) -> None:
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
        (folder / "model.safetensors").unlink()
        torch.save(state, folder / "pytorch_model.bin")
        if truncate:
            data = (folder / "pytorch_model.bin").read_bytes()
            (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])

    assert "truncated or corrupt" in broken("bin", lambda f: to_bin(f, True))
    assert "not a JSON object" in broken("str", lambda f: (f / "config.json").write_text('"text"'))
    assert "expected int" in broken(
        "float",
        lambda f: (f / "config.json").write_text(
            json.dumps({**json.loads((tiny / "config.json").read_text()), "hidden_size": 64.5})
        ),
    )
    assert "SentencePiece" in broken("tok", lambda f: (f / "tokenizer.model").write_bytes(b"junk"))
    assert "cannot be parsed" in broken("deep", lambda f: (f / "config.json").write_text("[" * 100_000 + "]" * 100_000))


def test_json_type_messages_use_articles(tmp_path):
    from xcft.data.schema import normalize_sample

    _, problems = normalize_sample({"conversations": {"a": 1}}, file="f.json", index=0, search_dirs=[tmp_path])
    assert '"conversations" is an object, expected a list' in problems[0].message
    _, problems = normalize_sample(["x"], file="f.json", index=0, search_dirs=[tmp_path])
    assert "sample is a JSON array, expected an object" in problems[0].message


def _parse_yaml(tmp_path, text: str):
    from xcft.train.args import parse_train_args

    path = tmp_path / "c.yaml"
    path.write_text(f"model_name_or_path: m\ndata_path: d.json\n{text}\n")
    return parse_train_args([str(path)])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("learning_rate: [1, 2]", "expected a number"),
        ("lora_r: 2.5", "expected an integer"),
        ("use_lora: sometimes", "expected true or false"),
        ("num_train_epochs: true", "a number"),
        ("lr_scheduler_type: cosin", "expected one of linear, cosine"),
    ],
)
def test_yaml_values_of_the_wrong_type_are_refused(tmp_path, text, expected):
    with pytest.raises(XcftError, match=expected):
        _parse_yaml(tmp_path, text)


def test_yaml_values_are_converted_to_the_option_types(tmp_path):
    def parse(text: str):
        return _parse_yaml(tmp_path, text)

    cfg = parse("learning_rate: 1e-4\nlora_r: 8.0\nlora_target_modules: attention.wqkv\nuse_lora: 'yes'")
    assert cfg.training.learning_rate == 1e-4 and cfg.lora.lora_r == 8 and cfg.model.use_lora is True
    assert cfg.lora.lora_target_modules == ["attention.wqkv"]
    assert parse("overwrite_output_dir: true").output.overwrite_output_dir is True


def test_a_run_that_fails_at_once_leaves_no_folder(tmp_path, monkeypatch):
    from xcft.commands.train import train_command

    monkeypatch.chdir(tmp_path)
    with pytest.raises(XcftError, match="no such folder"):
        train_command(["--model_name_or_path", str(tmp_path / "nope"), "--data_path", "x", "--output_dir", "new"])
    assert not (tmp_path / "new").exists()

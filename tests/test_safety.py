"""Fault tests: the CLI in a subprocess against the user's files, its own inputs, a second run, a full
disk, broken model folders, hostile data and images, and wrongly typed options. Each asserts the exit
status, the one-line message (file named, no traceback) and that nothing of the user's changed.

Every test starts fresh Python processes (a few seconds each), so the module is marked slow: ``make
test`` runs it, ``make test-fast`` leaves it to the library-level checks in test_safety_units.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from xcft.cli import main as cli_main
from xcft.commands.train import train_command
from xcft.output_dir import LOCK_NAME, MARKER_NAME, FolderLock, is_marked

pytestmark = pytest.mark.slow

# --------------------------------------------------------------------------- helpers: a tiny model and data, the CLI, file hashes
ROOT = Path(__file__).resolve().parents[1]
IMG_SIZE = 56  # 16 slots per image: fast on a CPU


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def xcft(
    *args: object, cwd: Path | None = None, timeout: int = 300, prefix: list[str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m xcft ARGS`` in a fresh process (``prefix`` runs it under another program, e.g. unshare)."""
    cmd = [*(prefix or []), sys.executable, "-m", "xcft", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=cwd)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line of a failed command; asserts exit 1 and no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file and folder under ``folders`` -> sha256 of its bytes ("dir" for folders)."""
    out: dict[str, str] = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_dir():
                out[str(path)] = "dir"
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[str(path)] = "special"
        out[str(folder)] = "dir"
    return out


def build_base(folder: Path, model) -> Path:
    """``model`` saved as a self-contained model folder by xcft's own save path, with a built tokenizer."""
    from xcft.data.spm_builder import build_tokenizer
    from xcft.model.loading import save_pretrained
    from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

    tok = InternLM2Tokenizer.from_model_file(build_tokenizer(folder.parent / f"{folder.name}-tok", vocab_size=1000))
    return save_pretrained(model, tok, folder)


def build_data(folder: Path, n: int = 4) -> Path:
    """``n`` one-image samples (PIL images) in one JSON file; returns the file."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    colours = [(200, 20, 20), (20, 200, 20), (20, 20, 200), (200, 200, 20)]
    samples = []
    for i in range(n):
        Image.new("RGB", (40, 30), colours[i % 4]).save(folder / f"img{i}.png")
        samples.append(
            {
                "id": f"s{i}",
                "image": f"img{i}.png",
                "conversations": [
                    {"from": "user", "value": "<ImageHere>What colour is this?"},
                    {"from": "assistant", "value": ["Red.", "Green.", "Blue.", "Yellow."][i % 4]},
                ],
            }
        )
    path = folder / "train.json"
    path.write_text(json.dumps(samples))
    return path


LORA_FLAGS = ["--use_lora", "true", "--lora_r", "4", "--lora_alpha", "8", "--per_device_train_batch_size", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def train_args(train_argv):
    """``train_args(base, data, out, *flags)``: ``xcft train ...`` arguments (subcommand first) of a quick LoRA run."""

    def make(base: Path, data: Path, out: Path, *extra: object) -> list[str]:
        return ["train", *train_argv(base, data, out, *LORA_FLAGS, "--dataloader_num_workers", "0", *map(str, extra))]

    return make


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """A tiny base model folder and a data folder, shared by the tests of this module (read-only for them)."""
    root = tmp_path_factory.mktemp("safety")
    base = build_base(root / "base", tiny_model(img_size=IMG_SIZE, max_length=160))
    data = build_data(root / "data")
    return root, base, data


def _user_folder(path: Path) -> Path:
    """A folder of the user's own files with the names xcft writes."""
    path.mkdir(parents=True)
    (path / "README.md").write_text("my notes\n")
    (path / "tokenizer.model").write_bytes(b"my tokenizer")
    (path / "train_config.yaml").write_text("learning_rate: 1\n")
    (path / "loss.png").write_bytes(b"\x89PNG my plot")
    (path / "checkpoint-1").mkdir()
    (path / "checkpoint-1" / "weights.bin").write_bytes(b"mine")
    return path


def _without_lock(snap: dict[str, str]) -> dict[str, str]:
    """The lock file holds the PID of whoever took it last: not part of the folder's content."""
    return {k: v for k, v in snap.items() if not k.endswith(LOCK_NAME)}


# --------------------------------------------------------------------------- 1. output-folder rules


def test_train_into_folder_of_user_files_changes_nothing(world, tmp_path, train_args):
    _, base, data = world
    user = _user_folder(tmp_path / "mine")
    before = snapshot(user, base, data.parent)
    line = error_line(xcft(*train_args(base, data, user, "--max_steps", "1")))
    assert str(user) in line and "xcft did not write" in line and "empty or new folder" in line
    assert snapshot(user, base, data.parent) == before  # not even a marker or a lock file


def test_output_dir_equal_inside_or_around_inputs_is_refused(world, tmp_path, capsys, train_args):
    root, base, data = world
    before = snapshot(base, data.parent)
    # the case that overwrote the base weights: a full finetune into its own model folder
    line = error_line(xcft(*train_args(base, data, base, "--use_lora", "false", "--max_steps", "1")))
    assert "is the base model folder" in line and str(base) in line
    # the other overlaps through the same CLI entry point, in this process
    for out, expect in (
        (base / "out", "inside the base model folder"),
        (root, "contains the base model folder"),
        (data.parent, "data file"),
    ):
        assert cli_main(train_args(base, data, out, "--max_steps", "1")) == 1
        assert expect in capsys.readouterr().err
    assert snapshot(base, data.parent) == before
    assert not (base / "out").exists()


def test_merge_convert_init_model_refuse_user_folders(world, tmp_path, capsys):
    _, base, _ = world
    user = _user_folder(tmp_path / "mine")
    before = snapshot(user, base)
    assert "xcft did not write" in error_line(xcft("convert", base, user))
    assert cli_main(["init-model", str(user)]) == 1
    assert "xcft did not write" in capsys.readouterr().err
    assert cli_main(["convert", str(base), str(base / "copy")]) == 1
    assert "inside the source folder" in capsys.readouterr().err
    assert cli_main(["merge", "--adapter", str(base), "--output", str(user)]) == 1
    assert "xcft did not write" in capsys.readouterr().err
    assert snapshot(user, base) == before


def test_earlier_run_needs_resume_or_overwrite_and_only_own_files_go(world, tmp_path, train_args):
    _, base, data = world
    out = tmp_path / "run"
    # an earlier run (in-process: the subprocesses below check what the CLI says)
    assert train_command(train_args(base, data, out, "--max_steps", "2", "--save_steps", "1")[1:]) == 0
    assert is_marked(out) and is_marked(out / "checkpoint-1") and is_marked(out / "checkpoint-2")
    (out / "notes.txt").write_text("mine")  # the user adds files to the folder afterwards
    (out / "checkpoint-100").mkdir()
    (out / "checkpoint-100" / "keep.bin").write_bytes(b"mine")
    mine = [out / "notes.txt", out / "checkpoint-100"]
    before_all = snapshot(out)
    before_mine = {k: v for k, v in before_all.items() if any(k.startswith(str(m)) for m in mine)}

    line = error_line(xcft(*train_args(base, data, out, "--max_steps", "2")))
    assert "--resume_from_checkpoint true" in line and "--overwrite_output_dir true" in line and str(out) in line
    assert _without_lock(snapshot(out)) == _without_lock(before_all)

    # start over: xcft's files go, the user's stay; rotation never deletes the user's checkpoint-100
    proc = xcft(
        *train_args(
            base, data, out, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "1", "--overwrite_output_dir", "true"
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in before_mine} == before_mine
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-100", "checkpoint-3"]
    assert (out / "adapter_model.safetensors").is_file() and not (out / ".xcft-staging").exists()


# --------------------------------------------------------------------------- 2. one run per folder


def test_second_run_on_a_running_folder_is_refused_with_the_pid(world, tmp_path, train_args):
    _, base, data = world
    out = tmp_path / "busy"
    first = subprocess.Popen(
        [sys.executable, "-m", "xcft", *train_args(base, data, out, "--max_steps", "100000", "--save_strategy", "no")],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            lock = out / LOCK_NAME
            if lock.is_file() and lock.read_text().strip() == str(first.pid) and (out / "train_config.yaml").exists():
                break
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("the first run never took the lock")
        # Freeze the first run (it keeps its lock): its own logs stop changing, so any change is the second run's.
        first.send_signal(signal.SIGSTOP)
        before = snapshot(out)
        line = error_line(xcft(*train_args(base, data, out, "--max_steps", "1", "--resume_from_checkpoint", "true")))
        assert str(out) in line and f"PID {first.pid}" in line
        assert _without_lock(snapshot(out)) == _without_lock(before)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    FolderLock(out).acquire().release()  # the OS released the dead run's lock


# --------------------------------------------------------------------------- 3. full disk during a save


def _tmpfs_prefix(mount: Path, size: str) -> list[str] | None:
    """``unshare`` + ``mount -t tmpfs`` when this machine allows it (a private, small file system)."""
    if shutil.which("unshare") is None:
        return None
    mount.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mount}"],
        capture_output=True,
    )
    if probe.returncode != 0:
        return None
    return [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        f'mount -t tmpfs -o size={size} tmpfs {mount} && "$0" "$@"; rc=$?; ls -a {mount}/out {mount}/out/.xcft-staging '
        f"> {mount.parent}/listing.txt 2>&1; exit $rc",
    ]


def test_disk_full_during_checkpoint_save_is_one_line(world, tmp_path, train_args):
    _, base, data = world
    before = snapshot(base, data.parent)
    mount = tmp_path / "small-disk"
    # one LoRA checkpoint of the tiny model is ~260 kB: the first fits in 400 kB, the second does not
    prefix = _tmpfs_prefix(mount, "400k")
    out = mount / "out"
    args = train_args(base, data, out, "--max_steps", "3", "--save_steps", "1")
    if prefix is not None:
        proc = xcft(*args, prefix=prefix)
        listing = (tmp_path / "listing.txt").read_text()
    else:  # no mount allowed: inject the failure into the write itself
        code = (
            "import errno, sys, runpy, torch\n"
            "real = torch.save\n"
            "def save(obj, f, *a, **k):\n"
            "    if 'checkpoint-2' in str(f): raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "    return real(obj, f, *a, **k)\n"
            "torch.save = save\n"
            f"sys.argv = ['xcft', *{args!r}]\n"
            "runpy.run_module('xcft', run_name='__main__')\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300)
        listing = "\n".join(p.name for p in out.iterdir())
    line = error_line(proc)
    assert "checkpoint-2" in line and "No space left on device" in line, line
    assert "checkpoint-1" in line and "intact" in line
    names = listing.split()
    assert "checkpoint-1" in names and "checkpoint-2" not in names, listing
    assert "cannot access" in listing or ".xcft-staging" not in names  # the staging folder is gone
    assert snapshot(base, data.parent) == before


# --------------------------------------------------------------------------- 4. broken model folders


def _broken(base: Path, dest: Path, how: str) -> Path:
    shutil.copytree(base, dest)
    config = dest / "config.json"
    if how == "truncated-safetensors":
        w = dest / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif how == "config-not-json":
        config.write_text('{"hidden_size": 64,')
    elif how == "config-list":
        config.write_text("[1, 2, 3]")
    elif how == "field-type":
        raw = json.loads(config.read_text())
        raw["num_hidden_layers"] = "two"
        config.write_text(json.dumps(raw))
    elif how == "no-tokenizer":
        (dest / "tokenizer.model").unlink()
    return dest


@pytest.mark.parametrize(
    "how, command, expect",
    [
        ("truncated-safetensors", "eval", "model.safetensors"),
        ("config-not-json", "chat", "config.json is not valid JSON"),
        ("config-list", "check-data", "not a JSON object"),
        ("config-list", "train", "not a JSON object"),
        ("field-type", "convert", "'num_hidden_layers'"),
        ("no-tokenizer", "inspect", "no tokenizer.model"),
    ],
)
def test_broken_model_folder_is_one_line(world, tmp_path, how, command, expect, train_args):
    _, _, data = world
    _, base, _ = world
    model = _broken(base, tmp_path / "model", how)
    args = {
        "eval": ["eval", data, "--model", model, "--device", "cpu"],
        "chat": ["chat", "--model", model, "--query", "hi", "--device", "cpu"],
        "check-data": ["check-data", data, "--model", model],
        "train": train_args(model, data, tmp_path / "out", "--max_steps", "1"),
        "convert": ["convert", model, tmp_path / "converted"],
        "inspect": ["inspect", data, "--model", model, "--index", "0"],
    }[command]
    line = error_line(xcft(*args))
    assert str(model) in line and expect in line, line


# --------------------------------------------------------------------------- 5. hostile data and images


def _bomb_png(path: Path, side: int = 40000) -> Path:
    """A valid PNG header declaring side x side pixels (a decompression bomb) with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("kind", ["undecodable", "bomb"])
def test_chat_bad_image_is_one_line(world, tmp_path, kind):
    _, base, _ = world
    image = tmp_path / "x.jpg"
    if kind == "bomb":
        _bomb_png(image)
    else:
        image.write_bytes(b"\xff\xd8\xff not really a jpeg")
    line = error_line(xcft("chat", "--model", base, "--image", image, "--query", "what?", "--device", "cpu"))
    assert str(image) in line and ("DecompressionBomb" in line if kind == "bomb" else "cannot be decoded" in line), line


def test_check_data_names_folder_fifo_and_hostile_json(world, tmp_path):
    _, base, _ = world
    d = tmp_path / "d"
    d.mkdir()
    (d / "folder.jpg").mkdir()
    os.mkfifo(d / "pipe.jpg")
    turns = [{"from": "user", "value": "<ImageHere>hi"}, {"from": "assistant", "value": "yo"}]
    (d / "odd.json").write_text(
        json.dumps(
            [
                {"id": 0, "image": "folder.jpg", "conversations": turns},
                {"id": 1, "image": "pipe.jpg", "conversations": turns},
                {"id": 2, "conversations": [["user", "hi"], {"from": "assistant", "value": "yo"}]},
            ]
        )
    )
    (d / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (d / "bigint.jsonl").write_text(json.dumps({"id": "a", "conversations": turns}) + "\n" + '{"id": ' + "7" * 5000 + "}\n")
    (d / "data.txt").write_text("odd.json 1\ndeep.json 1\nbigint.jsonl 1\n")
    proc = xcft("check-data", d / "data.txt", "--model", base, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("ERROR")]
    text = "\n".join(errors)
    assert "is a folder, not an image file" in text and "is a FIFO, not a regular image file" in text
    assert "not found" not in text
    assert "turn 0 is an array, expected an object" in text
    assert any("deep.json" in e and "nested too deeply" in e for e in errors), text
    assert any("bigint.jsonl line 2" in e and "5000 digits" in e for e in errors), text


def test_train_on_hostile_json_names_the_file(world, tmp_path, train_args):
    _, base, _ = world
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    line = error_line(xcft(*train_args(base, deep, tmp_path / "out", "--max_steps", "1")))
    assert str(deep) in line and "nested too deeply" in line


# --------------------------------------------------------------------------- 6. options of the wrong type


def test_wrong_option_types_are_one_line(world, tmp_path):
    _, base, data = world
    config = tmp_path / "train.yaml"
    config.write_text(f"model_name_or_path: {base}\ndata_path: {data}\noutput_dir: {tmp_path / 'o'}\nlearning_rate: [1, 2]\n")
    line = error_line(xcft("train", config))
    assert "learning_rate" in line and "[1, 2]" in line and "a number" in line and str(config) in line
    line = error_line(xcft("train", "--model_name_or_path", base, "--data_path", data, "--lora_r", "eight"))
    assert "--lora_r" in line and "'eight'" in line and "int" in line
    proc = xcft("-v", "train", config)  # -v keeps the traceback for bug reports
    assert proc.returncode == 1 and "Traceback" in proc.stderr


# --------------------------------------------------------------------------- 7. self-contained save_pretrained


FRESH = """
import sys, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
out = model(input_ids=torch.tensor([[1, 5, 6, 7]]))
assert out.logits.shape[-1] == base.config.vocab_size
assert not any(m == "xcft" or m.startswith("xcft.") for m in sys.modules), "xcft was imported"
print("OK", type(model.get_base_model()).__module__)
"""


def test_standard_save_pretrained_is_self_contained_for_autopeft(world, tmp_path, train_args):
    import xcft as xcft_lib

    _, base, data = world
    model, tokenizer = xcft_lib.load_pretrained(base, device="cpu")
    saved = tmp_path / "saved"
    model.save_pretrained(saved)  # the plain Hugging Face call, no xcft helper
    tokenizer.save_pretrained(saved)
    for name in ("modeling_xcomposer2.py", "configuration_xcomposer2.py", "image_processing_xcomposer2.py"):
        assert (saved / name).is_file(), name
    auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_xcomposer2.XComposer2ForCausalLM"
    adapter = tmp_path / "adapter"
    proc = xcft(*train_args(saved, data, adapter, "--max_steps", "1", "--save_strategy", "no"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    fresh = subprocess.run(
        [sys.executable, "-c", FRESH, str(saved), str(adapter)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert fresh.returncode == 0 and "OK transformers_modules." in fresh.stdout, fresh.stderr[-3000:]


# --------------------------------------------------------------------------- 8. merge memory


def test_merge_peak_memory_stays_near_the_weights(tmp_path, tiny_model):
    """A 6-M-parameter model with the real vocabulary at 490 px: the merge stays far below 1 GB.

    Comparing every probe position (1262 x 92544 logits per copy) made this merge peak at 2.3 GB.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    import xcft as xcft_lib

    base = build_base(
        tmp_path / "base", tiny_model(vocab_size=92544, img_size=490, max_length=160, hidden_size=32, intermediate_size=80)
    )
    model, _ = xcft_lib.load_pretrained(base, device="cpu")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["attention.wqkv"], task_type="CAUSAL_LM"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(tmp_path / "adapter")
    del peft_model, model
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['xcft', 'merge', '--adapter', {str(tmp_path / 'adapter')!r}, '--output', {str(tmp_path / 'merged')!r}]\n"
        "try:\n    runpy.run_module('xcft', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        # VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) RSS at fork into the child's ru_maxrss
        "print('PEAK_KB', [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_mb = int(proc.stdout.split("PEAK_KB")[1].split()[0]) / 1024
    assert peak_mb < 1000, f"merge peaked at {peak_mb:.0f} MB"
    assert is_marked(tmp_path / "merged") and (tmp_path / "merged" / MARKER_NAME).is_file()


def test_torchrun_has_one_lock_holder_and_marks_its_checkpoints(world, tmp_path, torchrun, train_args):

    _, base, data = world
    out = tmp_path / "ddp"
    cmd = [
        *torchrun(),
        *train_args(
            base,
            data,
            out,
            "--max_steps",
            "2",
            "--save_steps",
            "1",
            "--save_total_limit",
            "1",
            "--ddp_backend",
            "gloo",
            "--per_device_train_batch_size",
            "1",
        ),
    ]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert is_marked(out) and is_marked(out / "checkpoint-2") and not (out / "checkpoint-1").exists()
    assert len((out / LOCK_NAME).read_text().split()) == 1  # one holder: the main process
    FolderLock(out).acquire().release()

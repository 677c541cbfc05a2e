"""The preprocessing cache: what invalidates an entry, concurrent and killed builds, corrupt entries,
and that training reads exactly the same samples through it as without it (both families)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xcft.data.cache import CACHE_VERSION
from xcft.data.cache_options import CacheOptions
from xcft.data.check import load_settings, run_check
from xcft.data.dataset import build_dataset, read_data
from xcft.data.encode import ImageSpec, encode_conversation
from xcft.data.mixture import epoch_draw, load_spec
from xcft.data.read_pass import read_pass
from xcft.data.schema import read_file

NO_CACHE = CacheOptions(no_data_cache=True)


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _samples(n: int, image: str | None = None, long: bool = False) -> list[dict]:
    answer = " ".join(["the river runs to the sea"] * (30 if long else 1))
    out = []
    for i in range(n):
        s: dict = {
            "id": f"s{i}",
            "conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": f"{answer} {i}."}],
        }
        if image is not None and i % 2 == 0:
            s["image"] = image
            s["conversations"][0]["value"] = "<ImageHere>" + s["conversations"][0]["value"]
        out.append(s)
    return out


@pytest.fixture
def one_file(tmp_path: Path, tiny_data: Path) -> Path:
    """A JSON file of 30 samples (every other one with an image) next to the tiny data's images."""
    image = str(tiny_data.parent / "data" / "images" / "red.png")
    path = tmp_path / "set.json"
    path.write_text(json.dumps(_samples(30, image)))
    return path


def _columns(found) -> list[dict[str, np.ndarray]]:
    return [{k: np.asarray(v) for k, v in fs.table.columns.items()} for fs in found.files]


def _same_pass(a, b) -> None:
    assert [p.to_dict() for p in a.problems] == [p.to_dict() for p in b.problems]
    for ca, cb in zip(_columns(a), _columns(b), strict=True):
        assert ca.keys() == cb.keys()
        for k in ca:
            assert np.array_equal(ca[k], cb[k]), k


def test_cached_pass_equals_uncached_and_is_reused(tok, tiny_data: Path, tmp_path: Path, caplog) -> None:
    cache = CacheOptions(data_cache_dir=str(tmp_path / "c"))
    spec = ImageSpec(56)
    plain = read_pass(tiny_data, tok, spec, 160, cache=NO_CACHE)
    assert not (tmp_path / "c").exists()
    first = read_pass(tiny_data, tok, spec, 160, cache=cache)
    assert len(_entries(tmp_path / "c")) == 3  # one entry per data file
    _same_pass(plain, first)
    caplog.set_level(logging.INFO, logger="xcft.data.cache")
    caplog.clear()
    second = read_pass(tiny_data, tok, spec, 160, cache=cache)
    assert "stored" not in caplog.text  # mapped, not built
    assert isinstance(second.files[0].table.columns["length"], np.memmap)
    _same_pass(plain, second)
    # conversations read back from their records are the ones the reader makes
    for fs in second.files:
        convs, _ = read_file(fs.source.path, search_dirs=load_spec(tiny_data).search_dirs(fs.source), display=fs.source.display)
        assert [fs.table.conversation(k) for k in range(len(fs.table))] == convs


def test_changed_file_or_setting_makes_a_new_entry(tok, one_file: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    cache = CacheOptions(data_cache_dir=str(root))
    assert len(read_data(one_file, tok, 56, 160, cache=cache)[0].conversations) == 30
    assert len(_entries(root)) == 1
    read_data(one_file, tok, 56, 160, cache=cache)
    assert len(_entries(root)) == 1  # same file, same settings: the same entry
    for settings in ({"max_length": 60}, {"hd_num": 2}):
        kwargs = {"max_length": settings.get("max_length", 160), "hd_num": settings.get("hd_num")}
        files = read_data(one_file, tok, 56, kwargs["max_length"], hd_num=kwargs["hd_num"], cache=cache)
        assert (
            files[0].lengths.tolist()
            == read_data(one_file, tok, 56, kwargs["max_length"], hd_num=kwargs["hd_num"], cache=NO_CACHE)[0].lengths.tolist()
        )
    assert len(_entries(root)) == 3
    # same size and modification time, other bytes: the content hash tells them apart
    st = one_file.stat()
    samples = json.loads(one_file.read_text())
    samples[1]["conversations"][1]["value"] = samples[1]["conversations"][1]["value"].replace("river", "RIVER")
    text = json.dumps(samples)
    assert len(text) == st.st_size
    one_file.write_text(text)
    os.utime(one_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    conv = read_data(one_file, tok, 56, 160, cache=cache)[0].conversations[1]
    assert "RIVER" in conv.messages[1].text
    # more samples
    one_file.write_text(json.dumps(samples + _samples(5)))
    assert len(read_data(one_file, tok, 56, 160, cache=cache)[0].conversations) == 35
    assert len(_entries(root)) == 5


def test_changed_image_makes_a_new_entry(tok, tmp_path: Path) -> None:
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("RGB", (56, 56)).save(img)
    data = tmp_path / "d.json"
    data.write_text(json.dumps(_samples(4, str(img))))
    cache = CacheOptions(data_cache_dir=str(tmp_path / "c"))
    grids = list(read_data(data, tok, 56, 4096, hd_num=4, cache=cache)[0].grids)
    Image.new("RGB", (224, 56)).save(img)  # a wider image: another crop grid
    assert list(read_data(data, tok, 56, 4096, hd_num=4, cache=cache)[0].grids) != grids


def test_an_entry_with_errors_is_not_kept(tok, tmp_path: Path) -> None:
    data = tmp_path / "d.json"
    data.write_text(json.dumps(_samples(3, str(tmp_path / "missing.png"))))
    settings = load_settings_like(tok)
    cache = CacheOptions(data_cache_dir=str(tmp_path / "c"))
    assert run_check(data, settings, cache=cache).errors
    assert _entries(tmp_path / "c") == []
    from PIL import Image

    Image.new("RGB", (30, 30)).save(tmp_path / "missing.png")  # the user fixes the data
    assert not run_check(data, settings, cache=cache).errors


def load_settings_like(tok):
    from xcft.data.check import Settings

    return Settings(tok, 56, 160)


def test_check_data_after_training_decodes_the_images_once(tok, tmp_path: Path) -> None:
    """An entry built by training (headers only) serves check-data after its images decode; a broken image is found."""
    from PIL import Image

    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (30, 30)).save(good)
    Image.new("RGB", (30, 30)).save(bad)
    data = tmp_path / "d.json"
    data.write_text(json.dumps(_samples(4, str(good)) + _samples(4, str(bad))))
    cache = CacheOptions(data_cache_dir=str(tmp_path / "c"))
    read_data(data, tok, 56, 160, cache=cache)
    entry = _entries(tmp_path / "c")[0]
    assert json.loads((entry / "meta.json").read_text())["images_decoded"] is False
    assert run_check(data, load_settings_like(tok), cache=cache).ok
    assert json.loads((entry / "meta.json").read_text())["images_decoded"] is True
    # a truncated PNG with the same size and time is invisible to stat; a new build with it decodes and reports it
    cache2 = CacheOptions(data_cache_dir=str(tmp_path / "c2"))
    read_data(data, tok, 56, 160, cache=cache2)
    st = bad.stat()
    raw = bad.read_bytes()
    bad.write_bytes(raw[:20] + b"\0" * (len(raw) - 20))
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = run_check(data, load_settings_like(tok), cache=cache2)
    assert any("bad.png" in p.message for p in result.errors)


def test_corrupt_entry_is_rebuilt_with_a_warning(tok, one_file: Path, tmp_path: Path, caplog) -> None:
    root = tmp_path / "c"
    cache = CacheOptions(data_cache_dir=str(root))
    expected = read_data(one_file, tok, 56, 160, cache=NO_CACHE)[0].lengths.tolist()
    read_data(one_file, tok, 56, 160, cache=cache)
    entry = _entries(root)[0]
    for damage in ("column", "meta", "missing"):
        column = entry / "length.npy"
        if damage == "column":
            raw = bytearray(column.read_bytes())
            raw[-4:] = b"\xff\xff\xff\x7f"  # a plausible array with another value
            column.write_bytes(bytes(raw))
        elif damage == "meta":
            (entry / "meta.json").write_text('{"version": ')
        else:
            column.unlink()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="xcft.data.cache"):
            got = read_data(one_file, tok, 56, 160, cache=cache)[0].lengths.tolist()
        assert got == expected
        assert "is rebuilt" in caplog.text, damage
        assert len(_entries(root)) == 1


_BUILD = """
import json, logging, os, signal, sys
logging.basicConfig(level=logging.INFO)
import numpy as np
from xcft.data.cache_options import CacheOptions
from xcft.data.dataset import read_data
from xcft.model.tokenization_internlm2 import InternLM2Tokenizer
tok = InternLM2Tokenizer.from_model_file(sys.argv[1])
if sys.argv[4] == "kill":  # die (SIGKILL) after the first column file of the entry is written
    real_save = np.save
    def save(*a, **k):
        real_save(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    np.save = save
files = read_data(sys.argv[2], tok, 56, 160, cache=CacheOptions(data_cache_dir=sys.argv[3], preprocessing_num_workers=2))
print(json.dumps([f.lengths.tolist() for f in files]))
"""


def _builder(built_tokenizer: Path, data: Path, root: Path, mode: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _BUILD, str(built_tokenizer), str(data), str(root), mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_two_processes_building_at_once_give_one_correct_cache(
    tok, built_tokenizer: Path, tmp_path: Path, subprocess_env: dict, tiny_data: Path
) -> None:
    data = tmp_path / "big.json"
    data.write_text(json.dumps(_samples(9000, str(tiny_data.parent / "data" / "images" / "red.png"), long=True)))
    root = tmp_path / "c"
    expected = [f.lengths.tolist() for f in read_data(data, tok, 56, 160, cache=NO_CACHE)]
    procs = [_builder(built_tokenizer, data, root, "build", subprocess_env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert json.loads(out) == expected
    assert len(_entries(root)) == 1
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert sum("stored as" in err for _, err in outs) == 1  # one built it, the other mapped it


@pytest.mark.slow
def test_a_killed_build_leaves_nothing_that_is_read(tok, built_tokenizer: Path, tmp_path: Path, subprocess_env: dict) -> None:
    data = tmp_path / "d.json"
    data.write_text(json.dumps(_samples(50)))
    root = tmp_path / "c"
    proc = _builder(built_tokenizer, data, root, "kill", subprocess_env)
    proc.communicate(timeout=300)
    assert proc.returncode == -9
    assert _entries(root) == []  # only a temporary folder, never looked at
    files = read_data(data, tok, 56, 160, cache=CacheOptions(data_cache_dir=str(root)))
    assert files[0].lengths.tolist() == read_data(data, tok, 56, 160, cache=NO_CACHE)[0].lengths.tolist()
    assert len(_entries(root)) == 1


def test_parallel_build_equals_serial(tok, tmp_path: Path, tiny_data: Path, monkeypatch) -> None:
    import xcft.data.table as table

    monkeypatch.setattr(table, "CHUNK", 7)
    monkeypatch.setattr(table, "PARALLEL_MIN", 10)
    data = tmp_path / "d.jsonl"
    lines = [json.dumps(s) for s in _samples(40, str(tiny_data.parent / "data" / "images" / "blue.jpg"))]
    lines.insert(3, "{not json")
    data.write_text("\n".join(lines) + "\n")
    spec = ImageSpec(56, 2)
    serial = read_pass(data, tok, spec, 160, cache=CacheOptions(no_data_cache=True, preprocessing_num_workers=1))
    parallel = read_pass(data, tok, spec, 160, cache=CacheOptions(no_data_cache=True, preprocessing_num_workers=2))
    _same_pass(serial, parallel)
    assert any(p.line == 4 for p in serial.problems)
    assert parallel.files[0].table.conversation(3).id == "s3"  # the bad line is not a sample


def test_each_image_is_decoded_once_per_build_not_per_chunk(tok, tmp_path: Path, tiny_data: Path, monkeypatch) -> None:
    """Real sets reuse a few images across many chunks: the building process remembers what it checked."""
    import xcft.data.table as table

    monkeypatch.setattr(table, "CHUNK", 5)
    decoded: list[Path] = []
    real = table.decode_with_size

    def counting(path: Path):
        decoded.append(path)
        return real(path)

    monkeypatch.setattr(table, "decode_with_size", counting)
    data = tmp_path / "d.json"
    data.write_text(json.dumps(_samples(40, str(tiny_data.parent / "data" / "images" / "red.png"))))
    found = read_pass(
        data, tok, ImageSpec(56), 160, cache=CacheOptions(no_data_cache=True, preprocessing_num_workers=1), decode_images=True
    )
    assert found.files[0].table.encoded.sum() == 40  # 8 chunks, 20 samples with the image
    assert len(decoded) == 1


def test_version_is_part_of_the_entry(tok, one_file: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    read_data(one_file, tok, 56, 160, cache=CacheOptions(data_cache_dir=str(root)))
    meta = json.loads((_entries(root)[0] / "meta.json").read_text())
    assert meta["version"] == CACHE_VERSION and meta["samples"] == 30


# --------------------------------------------------------------------------- the batches training sees


def _reference_items(data: Path, tok, img_size: int, max_length: int, hd_num: int | None, seed: int):
    """What the training dataset must yield, computed from the plain reader and encoder (no table, no cache)."""
    from xcft.data.dataset import make_item
    from xcft.data.read_pass import conversation_grids

    spec = load_spec(data)
    image_spec = ImageSpec(img_size, hd_num)
    per_file = []
    for src in spec.sources:
        convs, _ = read_file(src.path, search_dirs=spec.search_dirs(src), display=src.display)
        usable = []
        for conv in convs:
            grids = conversation_grids(conv, image_spec) if hd_num is not None else None
            enc = encode_conversation(conv, tok, image_spec, max_length, grids)
            if enc.num_supervised:
                usable.append((conv, enc))
        per_file.append((src, usable))
    from xcft.data.mixture import draw_count

    counts = [draw_count(len(u), src.number) for src, u in per_file]
    draw = epoch_draw(counts, [len(u) for _, u in per_file], seed, 0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return [make_item(*per_file[f][1][j], pad, img_size, hd_num=hd_num) for f, j in draw.tolist()], draw


def _same_items(ds, ref_items, ref_draw) -> None:
    assert np.array_equal(ds.draw, ref_draw)
    assert len(ds) == len(ref_items)
    for i, ref in enumerate(ref_items):
        item = ds[i]
        for key, value in ref.items():
            assert torch.equal(item[key], value), (i, key)


@pytest.mark.parametrize("hd_num", [None, 2])
def test_training_items_equal_the_plain_reader(tok, tiny_data: Path, hd_num: int | None) -> None:
    """Generated data, both families: ids, labels, image slots, pixels and the draw of a seed, cold and warm."""
    ref_items, ref_draw = _reference_items(tiny_data, tok, 56, 160, hd_num, seed=5)
    for _ in ("cold", "warm"):
        ds = build_dataset(tiny_data, tok, 56, 160, seed=5, hd_num=hd_num)
        _same_items(ds, ref_items, ref_draw)


@pytest.mark.slow
@pytest.mark.parametrize("hd_num", [None, 6])
def test_training_items_equal_on_the_official_examples(examples_dir: Path, real_tokenizer: Path, hd_num: int | None) -> None:
    from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

    tok = InternLM2Tokenizer.from_model_file(real_tokenizer)
    data = examples_dir / "data.txt"
    img_size = 560 if hd_num is not None else 224
    ref_items, ref_draw = _reference_items(data, tok, img_size, 4096, hd_num, seed=1)
    for _ in ("cold", "warm"):
        ds = build_dataset(data, tok, img_size, 4096, seed=1, hd_num=hd_num)
        _same_items(ds, ref_items, ref_draw)


def test_dataloader_workers_read_records_from_the_mapping(tok, tiny_data: Path) -> None:
    """Forked loader workers open the data file themselves and give the same items."""
    from torch.utils.data import DataLoader

    ds = build_dataset(tiny_data, tok, 56, 160, seed=2)
    serial = [ds[i]["input_ids"] for i in range(len(ds))]
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
    assert all(torch.equal(a["input_ids"], b) for a, b in zip(loader, serial, strict=True))


def test_check_data_reads_through_the_default_cache(tiny_base: Path, tiny_data: Path, data_cache_dir: Path) -> None:
    run_check(tiny_data, load_settings(tiny_base, None, None))
    metas = [json.loads(m.read_text()) for m in data_cache_dir.glob("*/meta.json")]
    stored = {m["file"] for m in metas}
    assert {str(src.path) for src in load_spec(tiny_data).sources} <= stored  # the default folder ($XCFT_DATA_CACHE in tests)


def test_ids_are_a_column_found_without_reading_records(tok, tmp_path: Path, monkeypatch) -> None:
    """An id given, an id missing (the index stands for it), an integer id, a repeated id, a record that is no object."""
    import xcft.data.table as table

    records = [
        {"id": "a", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
        {"id": 7, "conversations": [{"from": "human", "value": "Q?"}]},  # no answer: not usable, id still known
        {"id": "a", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "B."}]},
        ["not", "an", "object"],
        {"id": "é", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
    ]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    found = read_pass(data, tok, ImageSpec(56), 160, cache=CacheOptions(data_cache_dir=str(tmp_path / "c")))
    t = found.files[0].table
    assert [t.sample_id(k) for k in range(len(t))] == ["a", "1", "7", "a", None, "é"]
    monkeypatch.setattr(table.SampleTable, "raw_record", lambda self, k: pytest.fail("a record was read"))
    assert t.find_id("a").tolist() == [0, 3]
    assert t.find_id("1").tolist() == [1] and t.find_id("7").tolist() == [2] and t.find_id("é").tolist() == [5]
    assert t.find_id("b").tolist() == [] and t.find_id("").tolist() == []

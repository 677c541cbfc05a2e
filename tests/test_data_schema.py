"""Reading and normalising samples: accepted variants and collected problems."""

from __future__ import annotations

import json
from pathlib import Path

from xcft.data.schema import IMAGE_PLACEHOLDER, normalize_sample, read_file


def _norm(record, tmp_path: Path):
    return normalize_sample(record, file="f.json", index=3, search_dirs=[tmp_path])


def _turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


def test_roles_case_insensitive_and_id_variants(tmp_path: Path) -> None:
    conv, probs = _norm(
        {"id": 7, "conversations": _turns(("Human", " hi "), ("GPT", "yo\n"), ("USER", "q"), ("Bot", "a"))}, tmp_path
    )
    assert probs == [] and conv is not None
    assert [m.role for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert conv.messages[0].text == "hi" and conv.messages[1].text == "yo"
    assert conv.id == "7" and conv.index == 3
    conv, _ = _norm({"conversations": _turns(("user", "q"), ("assistant", "a"))}, tmp_path)
    assert conv is not None and conv.id == "3"  # missing id -> index
    conv, _ = _norm({"id": "abc", "conversations": _turns(("system", "sys"), ("user", "q"), ("assistant", "a"))}, tmp_path)
    assert conv is not None and conv.messages[0].role == "system"


def test_images_string_list_and_prepend(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    conv, probs = _norm({"image": "a.jpg", "conversations": _turns(("user", "what?"), ("assistant", "x"))}, tmp_path)
    assert conv is not None and conv.images == [tmp_path / "a.jpg"] and conv.image_prepended
    assert conv.messages[0].text == IMAGE_PLACEHOLDER + "what?"
    assert [p.level for p in probs] == ["info"]
    conv, probs = _norm(
        {"image": ["a.jpg", "b.jpg"], "conversations": _turns(("user", "<ImageHere> and <ImageHere>"), ("assistant", "x"))},
        tmp_path,
    )
    assert probs == [] and conv is not None and conv.images == [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    conv, probs = _norm({"image": [], "conversations": _turns(("user", "q"), ("assistant", "x"))}, tmp_path)
    assert probs == [] and conv is not None and conv.images == []


def test_image_found_in_second_dir(tmp_path: Path) -> None:
    other = tmp_path / "json_dir"
    other.mkdir()
    (other / "c.png").write_bytes(b"x")
    conv, probs = normalize_sample(
        {"image": "c.png", "conversations": _turns(("user", "<ImageHere>"), ("assistant", "x"))},
        file="f",
        index=0,
        search_dirs=[tmp_path, other],
    )
    assert conv is not None and conv.images == [other / "c.png"]
    conv, probs = normalize_sample(
        {"image": "zz.png", "conversations": _turns(("user", "<ImageHere>"), ("assistant", "x"))},
        file="f",
        index=0,
        search_dirs=[tmp_path, other],
    )
    assert conv is None and str(tmp_path / "zz.png") in probs[0].message and str(other / "zz.png") in probs[0].message


def _messages(record, tmp_path: Path) -> list[str]:
    conv, probs = _norm(record, tmp_path)
    assert conv is None
    return [p.message + " | " + p.fix for p in probs if p.level == "error"]


def test_sample_errors(tmp_path: Path) -> None:
    ok = _turns(("user", "q"), ("assistant", "a"))
    assert "expected an object" in _messages([1, 2], tmp_path)[0]
    assert 'missing "conversations"' in _messages({"id": 1}, tmp_path)[0]
    assert "rename it" in _messages({"messages": ok}, tmp_path)[0]
    assert "empty" in _messages({"conversations": []}, tmp_path)[0]
    assert 'unknown role "narrator"' in _messages({"conversations": _turns(("narrator", "q"), ("assistant", "a"))}, tmp_path)[0]
    assert (
        "not a string"
        in _messages({"conversations": [{"from": "user", "value": ["x"]}, {"from": "gpt", "value": "a"}]}, tmp_path)[0]
    )
    assert "no assistant answer" in _messages({"conversations": _turns(("user", "q"))}, tmp_path)[0]
    assert "must alternate" in _messages({"conversations": _turns(("assistant", "a"), ("user", "q"))}, tmp_path)[0]
    assert "must alternate" in _messages({"conversations": _turns(("user", "a"), ("user", "q"), ("gpt", "x"))}, tmp_path)[0]
    assert "first turn" in _messages({"conversations": _turns(("user", "q"), ("system", "s"), ("assistant", "a"))}, tmp_path)[0]
    assert "id must be" in _messages({"id": [1], "conversations": ok}, tmp_path)[0]
    (tmp_path / "a.jpg").write_bytes(b"x")
    msg = _messages(
        {"image": ["a.jpg", "a.jpg"], "conversations": _turns(("user", "<image> and <image>"), ("gpt", "a"))}, tmp_path
    )[0]
    assert "<image>" in msg and "replace" in msg and "<ImageHere>" in msg
    msg = _messages({"image": "a.jpg", "conversations": _turns(("user", "<image>\nq"), ("gpt", "a"))}, tmp_path)[0]
    assert "LLaVA" in msg
    msg = _messages({"image": ["a.jpg"], "conversations": _turns(("user", "<ImageHere><ImageHere>"), ("gpt", "a"))}, tmp_path)[0]
    assert "2" in msg and "1 image" in msg
    assert "expected a path" in _messages({"image": 5, "conversations": ok}, tmp_path)[0]


def test_read_file_variants(tmp_path: Path) -> None:
    sample = {"id": "x", "conversations": _turns(("user", "q"), ("assistant", "a"))}
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([sample, sample]))
    convs, probs = read_file(arr)
    assert len(convs) == 2 and probs == []
    jl = tmp_path / "a.jsonl"
    jl.write_text(json.dumps(sample) + "\n\n" + json.dumps(sample) + "\n")
    convs, probs = read_file(jl)
    assert len(convs) == 2 and probs == []
    jl_as_json = tmp_path / "b.json"
    jl_as_json.write_text(json.dumps(sample) + "\n" + json.dumps(sample) + "\n")
    convs, probs = read_file(jl_as_json)
    assert len(convs) == 2 and probs == []
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([sample]).encode())
    assert read_file(bom)[1] == []


def test_read_file_all_problems_in_one_pass(tmp_path: Path) -> None:
    good = {"conversations": _turns(("user", "q"), ("assistant", "a"))}
    bad = {"conversations": _turns(("alien", "q"), ("assistant", "a"))}
    f = tmp_path / "many.json"
    f.write_text(json.dumps([good, bad, good, bad, bad]))
    convs, probs = read_file(f, display="many.json")
    assert [c is not None for c in convs] == [True, False, True, False, False]
    assert [p.index for p in probs] == [1, 3, 4]
    assert str(probs[0]).startswith("many.json: sample 1 (id '1'): turn 0 has unknown role")


def test_file_level_errors(tmp_path: Path) -> None:
    def msg(name: str, content: bytes) -> str:
        p = tmp_path / name
        p.write_bytes(content)
        _, probs = read_file(p)
        assert len(probs) >= 1 and probs[0].level == "error"
        return probs[0].message

    assert "line 2 column" in msg("bad.json", b'[\n {"id": 1,, }\n]')
    assert "not UTF-8" in msg("latin.json", '[{"id": "caf\u00e9"}]'.encode("latin-1"))
    assert "empty" in msg("empty.json", b"  \n")
    assert "single JSON object" in msg("obj.json", b'{"conversations": []}')
    assert "JSON string" in msg("str.json", b'"hello"')
    assert "no samples" in msg("none.json", b"[]")
    assert "line 2" in msg("bad.jsonl", b'{"conversations": []}\n{oops\n')
    _, probs = read_file(tmp_path / "missing.json")
    assert "not found" in probs[0].message

"""data.txt parsing and the per-epoch draw."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from xcft.data.mixture import draw_count, epoch_draw, parse_data_txt, resolve_data


def test_parse_data_txt(tmp_path: Path) -> None:
    (tmp_path / "my data").mkdir()
    (tmp_path / "my data" / "a b.json").write_text("[]")
    (tmp_path / "c.jsonl").write_text("")
    txt = tmp_path / "data.txt"
    txt.write_text("# comment\n\nmy data/a b.json 0.02\n  c.jsonl\t3  \n")
    sources, problems = parse_data_txt(txt)
    assert problems == []
    assert [(s.path, s.number, s.line) for s in sources] == [
        (tmp_path / "my data" / "a b.json", 0.02, 3),
        (tmp_path / "c.jsonl", 3.0, 4),
    ]


def test_parse_data_txt_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("[]")
    txt = tmp_path / "data.txt"
    txt.write_text("a.json\na.json many\nmissing.json 1\na.json -1\na.json 1\n")
    sources, problems = parse_data_txt(txt)
    assert len(sources) == 1
    assert [p.line for p in problems] == [1, 2, 3, 4]
    assert "expected '<path> <number>'" in problems[0].message
    assert "not a number" in problems[1].message
    assert "not found" in problems[2].message and str(tmp_path / "missing.json") in problems[2].message
    assert ">= 0" in problems[3].message


def test_single_json_accepted(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text("")
    spec, problems = resolve_data(tmp_path / "x.jsonl")
    assert problems == [] and spec is not None and spec.sources[0].number is None and spec.root == tmp_path
    spec, problems = resolve_data(tmp_path / "nope.txt")
    assert spec is None and "not found" in problems[0].message


def test_draw_count() -> None:
    assert draw_count(2, 0.02) == 20  # thousands, fractional
    assert draw_count(100, 0.01) == 10
    assert draw_count(100, 0.29) == 290
    assert draw_count(100, 0.5, given_num=False) == 50
    assert draw_count(7, 2, given_num=False) == 14
    assert draw_count(7, None) == 7
    assert draw_count(0, 1.0) == 0


def test_epoch_draw_counts_and_coverage() -> None:
    draw = epoch_draw([3, 25, 0], [10, 8, 5], seed=0, epoch=0)
    assert draw.shape == (28, 2)
    per_file = Counter(draw[:, 0].tolist())
    assert per_file == {0: 3, 1: 25}
    # fewer than the file holds: without replacement
    assert len(set(draw[draw[:, 0] == 0][:, 1].tolist())) == 3
    # more: every sample at least once (here 3 full passes + 1 extra)
    c = Counter(draw[draw[:, 0] == 1][:, 1].tolist())
    assert set(c) == set(range(8)) and sorted(c.values()) == [3] * 7 + [4]


def test_epoch_draw_deterministic_and_changes() -> None:
    a = epoch_draw([50, 20], [200, 30], seed=3, epoch=1)
    b = epoch_draw([50, 20], [200, 30], seed=3, epoch=1)
    assert np.array_equal(a, b)  # same on every rank / after a restart
    c = epoch_draw([50, 20], [200, 30], seed=3, epoch=2)
    d = epoch_draw([50, 20], [200, 30], seed=4, epoch=1)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert set(map(tuple, a[a[:, 0] == 0].tolist())) != set(map(tuple, c[c[:, 0] == 0].tolist()))

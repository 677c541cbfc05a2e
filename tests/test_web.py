"""``xcft web`` driven in a real headless browser (system Chromium through Playwright's Python API).

One server per module, started as ``xcft web`` in a subprocess on a free port; every check goes
through the page (clicks, typing, uploads) and reads what the page shows. Expected values come from
the CLI (``xcft inspect --format json``, ``xcft check-data``) or from files the runs leave. Screenshots
of each tab go to the test's temp folder (and, with ``XCFT_WEB_SCREENSHOTS=DIR``, to DIR, which is
how the README's pictures are made).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio", reason="gradio is not installed (pip install 'xcft[web]')")
try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IMG_SIZE = 56  # 16 slots per image: quick on a CPU
MAX_LENGTH = 160
SERVER_START_S = 180


def _skip_without_browser() -> None:
    if sync_playwright is None:
        pytest.skip("playwright is not installed (pip install 'xcft[test]'); the web UI tests drive a real browser")
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the web UI tests drive a real browser")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        TOKENIZERS_PARALLELISM="false",
        GRADIO_ANALYTICS_ENABLED="False",
        PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


# --------------------------------------------------------------------------- what the tests work on


def _build_assets(root: Path) -> dict[str, Path]:
    """A tiny model folder and a data.txt with a clean file and a broken one (images made with PIL)."""
    from PIL import Image

    from xcft.data.spm_builder import build_tokenizer
    from xcft.model.loading import save_pretrained
    from xcft.model.presets import build_model
    from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

    tok = build_tokenizer(root / "tok", vocab_size=1000)
    model = build_model("tiny", img_size=IMG_SIZE, vocab_size=1000, seed=0, max_length=MAX_LENGTH)
    base = save_pretrained(model, InternLM2Tokenizer.from_model_file(tok), root / "base")
    data = root / "data"
    (data / "img").mkdir(parents=True)
    for i, colour in enumerate([(210, 40, 40), (40, 190, 60), (40, 60, 200)]):
        img = Image.new("RGB", (96, 72), (235, 235, 235))
        img.paste(Image.new("RGB", (48, 36), colour), (24, 18))
        img.save(data / "img" / f"{i}.png")
    good = [
        {
            "id": "red",
            "image": "img/0.png",
            "conversations": [
                {"from": "user", "value": "<ImageHere>What colour is the square?"},
                {"from": "assistant", "value": "The square is red."},
            ],
        },
        {
            "id": "hello",
            "conversations": [
                {"from": "user", "value": "Say hello."},
                {"from": "assistant", "value": "Hello there."},
                {"from": "user", "value": "Again."},
                {"from": "assistant", "value": "Hello again."},
            ],
        },
        {
            "id": "two",
            "image": ["img/1.png", "img/2.png"],
            "conversations": [
                {"from": "user", "value": "Compare <ImageHere> with <ImageHere>."},
                {"from": "assistant", "value": "Green, then blue."},
            ],
        },
    ]
    bad = [
        {"id": "fine", "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]},
        {"id": "narrator", "conversations": [{"from": "narrator", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {
            "id": "lost",
            "image": "img/nope.png",
            "conversations": [{"from": "user", "value": "<ImageHere>q"}, {"from": "assistant", "value": "a"}],
        },
    ]
    (data / "good.json").write_text(json.dumps(good), encoding="utf-8")
    (data / "bad.json").write_text(json.dumps(bad), encoding="utf-8")
    (data / "data.txt").write_text("good.json 0.006\nbad.json 0.003\n", encoding="utf-8")
    return {"base": base, "data_txt": data / "data.txt", "good": data / "good.json", "image": data / "img" / "0.png"}


class WebServer:
    """``xcft web`` in a subprocess: start, kill (like a crash), start again on the same work folder."""

    def __init__(self, workdir: Path, log: Path) -> None:
        self.workdir, self.log = workdir, log
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, wait: bool = True) -> None:
        """Launch the server; with ``wait``, return once it answers and has printed its address."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "xcft.cli", "web", "--port", str(port), "--workdir", str(self.workdir), "--device", "cpu"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_env(),
                cwd=str(self.workdir.parent),
            )
        if wait:
            self.wait()

    def wait(self) -> None:
        assert self.proc is not None
        deadline = time.time() + SERVER_START_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"xcft web exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    # it answers, and it has printed its address for the user
                    if r.status == 200 and f"open {self.url}" in self.log.read_text():
                        break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError(
                f"xcft web did not start (answer and print its address) within {SERVER_START_S} s:\n"
                f"{self.log.read_text()[-3000:]}"
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> Iterator[dict[str, Any]]:
    _skip_without_browser()
    root = tmp_path_factory.mktemp("web")
    server = WebServer(root / "work", root / "server.log")
    server.start(wait=False)  # it starts up while the model and data are built
    try:
        assets = _build_assets(root)
        server.wait()
    except BaseException:
        server.kill()
        raise
    shots = root / "screenshots"
    shots.mkdir()
    env: dict[str, Any] = {"root": root, "server": server, "shots": shots, **assets}
    try:
        yield env
    finally:
        server.kill()
        for run_pid in (root / "work").glob("*/*/train.pid"):  # nothing a test started keeps running (runs, evals)
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(run_pid.read_text()), signal.SIGKILL)


@pytest.fixture(scope="module")
def browser(web) -> Iterator[Any]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def _new_page(browser: Any, web: dict[str, Any]) -> Page:
    """A new browser session on the page (a context of its own: its own Gradio session)."""
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(30_000)
    pg.goto(web["server"].url)
    return pg


@pytest.fixture(scope="module")
def page(browser, web) -> Page:
    return _new_page(browser, web)


# --------------------------------------------------------------------------- page helpers


def _tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _fill(page: Page, elem_id: str, value: Any) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")  # blur: number fields commit their value


def _rows(page: Page, elem_id: str) -> list[list[str]]:
    rows = page.locator(f"#{elem_id} .virtual-row")
    return [[c.inner_text().strip() for c in rows.nth(i).locator("[role=gridcell]").all()] for i in range(rows.count())]


def _shot(page: Page, web: dict[str, Any], name: str) -> None:
    """Screenshot into the test folder; also into $XCFT_WEB_SCREENSHOTS (kept small for the docs)."""
    path = web["shots"] / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    docs = os.environ.get("XCFT_WEB_SCREENSHOTS")
    if docs:
        from PIL import Image

        out = Path(docs) / f"web-{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            img.convert("RGB").quantize(colors=128).save(out, optimize=True)


def _watch_progress(page: Page, elem_ids: list[str]) -> None:
    """Start counting, per component, the moments a progress indicator is visible over it."""
    page.evaluate(
        """ids => {
            window.xcftProgress = Object.fromEntries(ids.map(i => [i, 0]));
            const look = () => { for (const i of ids) {
                for (const w of document.querySelectorAll('#' + i + ' .wrap.center')) {
                    if (!w.classList.contains('hide') && w.offsetParent !== null) { window.xcftProgress[i] += 1; }
                } } };
            if (window.xcftObserver) { window.xcftObserver.disconnect(); }
            window.xcftObserver = new MutationObserver(look);
            window.xcftObserver.observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
        }""",
        elem_ids,
    )


def _progress_seen(page: Page) -> dict[str, int]:
    return page.evaluate("() => window.xcftProgress")


def _train_log(page: Page) -> str:
    return page.locator("#train-log .xcft-log pre").inner_text()


def _check(page: Page, data: Path | str, model: Path | str, max_length: int = 0) -> None:
    _tab(page, "Data")
    _fill(page, "data-path", data)
    _fill(page, "data-model", model)
    _fill(page, "data-max-length", max_length)
    mark = page.locator("#data-status .xcft-check")
    before = mark.get_attribute("data-done") if mark.count() else ""
    page.click("#data-check")
    page.wait_for_function(
        "b => { const e = document.querySelector('#data-status .xcft-check'); return e && e.dataset.done !== b; }",
        arg=before,
        timeout=120_000,
    )
    page.wait_for_timeout(300)  # the other outputs of the same answer render


def _show_index(page: Page, index: int) -> None:
    _fill(page, "sample-id", "")
    _fill(page, "sample-index", index)
    page.click("#sample-show")
    page.wait_for_selector(f'#sample-view .xcft-sample[data-index="{index}"]')


def _trained_texts(data: Path, model: Path, index: int, capsys) -> tuple[list[str], dict[str, Any]]:
    """What ``xcft inspect --format json`` says is trained: each run of trained tokens, decoded."""
    from xcft.cli import main
    from xcft.model.tokenization_internlm2 import InternLM2Tokenizer

    capsys.readouterr()
    assert main(["inspect", str(data), "--model", str(model), "--index", str(index), "--format", "json"]) == 0
    enc = json.loads(capsys.readouterr().out)
    tok = InternLM2Tokenizer.from_model_file(model / "tokenizer.model")
    runs, i = [], 0
    ids, labels, mask = enc["input_ids"], enc["labels"], enc["image_mask"]
    while i < len(ids):
        if mask[i] or labels[i] == -100:
            i += 1
            continue
        j = i
        while j < len(ids) and not mask[j] and labels[j] != -100:
            j += 1
        runs.append(tok.decode(ids[i:j], skip_special_tokens=False))
        i = j
    return runs, enc


def _run_state(page: Page, tab: str = "train", count: str = ".xcft-loss-points") -> tuple[str, int]:
    """A run's state in the tab's status box, and its count (train: loss points; eval: answers written)."""
    box = page.locator(f"#{tab}-status .xcft-run")
    if not box.count():
        return "", 0
    points = page.locator(f"#{tab}-status {count}")
    return box.first.get_attribute("data-state") or "", int(points.first.get_attribute("data-n") or 0) if points.count() else 0


def _wait_run(
    page: Page, until, timeout: float = 240.0, tab: str = "train", count: str = ".xcft-loss-points"
) -> list[tuple[str, int]]:
    """Poll the tab's run status until ``until(state, count)``; returns what was seen."""
    seen: list[tuple[str, int]] = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        state, n = _run_state(page, tab, count)
        if not seen or seen[-1] != (state, n):
            seen.append((state, n))
        if until(state, n):
            return seen
        log = page.locator(f"#{tab}-log .xcft-log pre").inner_text()
        assert state not in ("failed", "ended"), page.inner_text(f"#{tab}-status") + "\n" + log[-3000:]
        page.wait_for_timeout(300)
    raise AssertionError(f"run did not reach the expected state; seen {seen}\n{page.inner_text(f'#{tab}-status')}")


# --------------------------------------------------------------------------- Data tab


def test_data_tab_summary_problems_and_histogram(page, web):
    _check(page, web["data_txt"], web["base"])
    status = page.inner_text("#data-status")
    assert "6 samples in 2 file(s)" in status and "FAILED: 2 error(s)" in status
    rows = {r[0]: r for r in _rows(page, "data-summary")}
    assert set(rows) == {"good.json", "bad.json", "total"}
    assert rows["good.json"][1:5] == ["3", "3", "6", "3"]  # samples, usable, drawn/epoch, images
    assert rows["bad.json"][1:3] == ["3", "1"] and rows["total"][1] == "6"
    assert page.locator("#data-hist img").count() == 1  # the length histogram is a picture

    problems = _rows(page, "data-problems")
    assert [(p[0], p[1], p[3], p[4]) for p in problems] == [
        ("error", "bad.json", "1", "narrator"),
        ("error", "bad.json", "2", "lost"),
    ]
    assert 'unknown role "narrator"' in problems[0][5] and "nope.png" in problems[1][5]

    # the filter narrows the table; clicking a problem opens its sample
    _fill(page, "problems-filter", "nope")
    page.locator("#problems-filter textarea").press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#data-problems .virtual-row').length === 1")
    page.locator("#data-problems .virtual-row [role=gridcell]").nth(5).click()
    page.wait_for_selector('#sample-view .xcft-sample[data-index="5"]')
    view = page.inner_text("#sample-view")
    assert "bad.json: sample 2 (overall index 5)" in view and "nope.png" in view and "not found" in view
    _fill(page, "problems-filter", "")
    page.locator("#problems-filter textarea").press("Enter")
    _show_index(page, 0)
    _shot(page, web, "data-generated")


def test_sample_view_matches_inspect(page, web, capsys):
    _check(page, web["data_txt"], web["base"])
    for index, n_images in ((0, 1), (1, 0), (2, 2)):
        if index == 1:  # paging: Next moves one sample on
            page.click("#sample-next")
            page.wait_for_selector('#sample-view .xcft-sample[data-index="1"]')
        else:
            _show_index(page, index)
        expected, enc = _trained_texts(web["data_txt"], web["base"], index, capsys)
        marks = [m.text_content() for m in page.locator("#sample-view .xcft-seq mark.xcft-trained").all()]
        assert expected and marks == expected, (index, marks, expected)
        assert page.locator("#sample-view .xcft-thumb img").count() == n_images
        assert page.locator("#sample-view .xcft-seq .xcft-slot").count() == n_images
        counts = {
            c.get_attribute("data-name"): int(c.locator("b").first.inner_text())
            for c in page.locator("#sample-view .xcft-count").all()
        }
        assert counts["total"] == len(enc["input_ids"])
        assert counts["supervised"] == sum(1 for v in enc["labels"] if v != -100)
        assert counts["image_slots"] == sum(enc["image_mask"]) == n_images * (IMG_SIZE // 14) ** 2
    # by id
    _fill(page, "sample-id", "hello")
    page.click("#sample-show")
    page.wait_for_selector('#sample-view .xcft-sample[data-index="1"]')


@pytest.mark.slow
def test_data_tab_as_a_new_user_meets_it(page, web):
    """Progress over the status line only; indexes out of range said, not clamped; paths carried to Train."""
    _tab(page, "Train")  # empty Train and Eval fields: the checked paths will be carried there
    _fill(page, "train-data_path", "")
    _fill(page, "train-model_name_or_path", "")
    _tab(page, "Eval")
    _fill(page, "eval-data", "")
    _fill(page, "eval-model-1", "")
    _watch_progress(page, ["data-status", "data-summary", "data-hist", "data-problems", "sample-view"])
    _check(page, web["data_txt"], web["base"])
    seen = _progress_seen(page)
    assert seen["data-status"] > 0 and not any(seen[k] for k in seen if k != "data-status"), seen
    # the histogram carries its own title; no panel label drawn over it
    assert "hide" in (page.locator("#data-hist [data-testid=block-label]").get_attribute("class") or "")

    _fill(page, "sample-id", "")
    _fill(page, "sample-index", 99)
    page.click("#sample-show")
    page.wait_for_function("() => document.querySelector('#sample-nav').innerText.includes('from 0 to 5')")
    assert page.locator("#sample-index input").input_value() == "99"  # not silently moved to the last one
    _show_index(page, 5)
    page.click("#sample-next")
    page.wait_for_function("() => document.querySelector('#sample-nav').innerText.includes('last sample (index 5)')")
    assert page.locator('#sample-view .xcft-sample[data-index="5"]').count() == 1
    page.click("#sample-prev")
    page.wait_for_selector('#sample-view .xcft-sample[data-index="4"]')
    assert page.inner_text("#sample-nav").strip() == ""

    _tab(page, "Train")
    assert page.locator("#train-data_path textarea").input_value() == str(web["data_txt"])
    assert page.locator("#train-model_name_or_path textarea").input_value() == str(web["base"])
    # fields are named for people, with the option name the command and YAML use
    assert "Model folder (model_name_or_path)" in page.inner_text("#train-model_name_or_path")
    _fill(page, "train-data_path", "")
    _fill(page, "train-model_name_or_path", "")
    _tab(page, "Eval")
    assert page.locator("#eval-data textarea").input_value() == str(web["data_txt"])
    assert page.locator("#eval-model-1 textarea").input_value() == str(web["base"])
    _tab(page, "Data")


def test_sample_view_marks_truncation(page, web):
    _check(page, web["good"], web["base"], max_length=30)
    _show_index(page, 2)  # two images of 16 slots: the cut at 30 falls inside the second one
    view = page.locator("#sample-view")
    assert view.locator(".xcft-cut").count() == 1 and view.locator(".xcft-truncated").count() == 1
    assert view.locator(".xcft-thumb.xcft-dropped").count() == 1 and view.locator(".xcft-seq .xcft-slot").count() == 1


def test_official_examples(page, web, examples_dir, fixture_dir):
    _check(page, examples_dir / "data.txt", fixture_dir)
    assert "OK: training can start" in page.inner_text("#data-status")
    rows = {r[0]: r for r in _rows(page, "data-summary")}
    assert len(rows) == 4 and rows["total"][1] == "6"
    for name in (
        "data/only_text_example.json",
        "data/single_turn_single_image_example.json",
        "data/multi_turn_multi_images_example.json",
    ):
        assert rows[name][1] == "2"
    # the table words the levels as the verdict counts them (notes)
    notes = int(re.search(r"(\d+) note\(s\)", page.inner_text("#data-status")).group(1))
    assert notes == sum(1 for r in _rows(page, "data-problems") if r[0] == "note")
    _show_index(page, 2)  # the first sample of the single-image file: one image, placed before its text
    assert page.locator("#sample-view .xcft-thumb img").count() == 1
    assert page.locator("#sample-view .xcft-seq mark.xcft-trained").count() >= 1
    _shot(page, web, "data")


def test_bad_input_shows_the_cli_message(page, web, capsys, tmp_path):
    from xcft.cli import main

    missing_model = tmp_path / "no-such-model"
    capsys.readouterr()
    assert main(["check-data", str(web["data_txt"]), "--model", str(missing_model)]) == 1
    cli_line = capsys.readouterr().err.strip()
    assert cli_line.startswith("error: ")
    _check(page, web["data_txt"], missing_model)
    # the CLI's line, with its flags named as the page's fields
    from xcft.commands.web.ui import DATA_FIELDS, in_page_terms

    assert "--model" in cli_line and "--model" not in page.inner_text("#data-status")
    assert page.inner_text("#data-status").strip() == in_page_terms(cli_line, DATA_FIELDS)

    _check(page, tmp_path / "nothing.txt", web["base"])
    assert "data path not found" in page.inner_text("#data-status")
    _show_index_error = page.locator("#sample-view").inner_text()
    assert "Traceback" not in _show_index_error
    # the server is still there and answers the next request
    _check(page, web["good"], web["base"])
    assert "OK: training can start" in page.inner_text("#data-status")


# --------------------------------------------------------------------------- Train tab


def _start_run(page: Page, web: dict[str, Any], output: Path, max_steps: int, extra: dict[str, Any] | None = None) -> None:
    _tab(page, "Train")
    # the page has loaded its state (it suggests an output folder) before anything is typed
    page.wait_for_function("() => document.querySelector('#train-output_dir textarea').value.length > 0")
    _fill(page, "train-model_name_or_path", web["base"])
    _fill(page, "train-data_path", web["good"])
    page.locator("#train-use_lora input[type=checkbox]").check()
    for key, value in {"lora_r": 8, "max_steps": max_steps, "per_device_train_batch_size": 2, "output_dir": output}.items():
        _fill(page, f"train-{key}", value)
    for key, value in (extra or {}).items():  # folded options: open their section first
        if not page.locator(f"#train-{key}").is_visible():
            page.locator("#train-more").get_by_text("all other options").first.click()
            page.locator("#train-more").get_by_text("Training (TrainingArguments)").first.click()
        _fill(page, f"train-{key}", value)
    expected = ["--use_lora true", f"--output_dir {output}", "--lora_r 8", f"--max_steps {max_steps}"]
    expected += [f"--{key} {value}" for key, value in (extra or {}).items()]
    page.wait_for_function(
        "parts => parts.every(p => document.querySelector('#train-command').innerText.includes(p))", arg=expected
    )
    command = page.inner_text("#train-command")
    assert f"max_steps: {max_steps}" in page.inner_text("#train-yaml")
    assert all(part in command for part in expected)
    page.click("#train-start")
    page.wait_for_function("() => document.querySelector('#train-action').innerText.includes('started run')")


@pytest.fixture(scope="module")
def finished_run(page, web) -> dict[str, Any]:
    """A short LoRA run started and watched through the page."""
    output = web["root"] / "runs-out" / "short"
    _tab(page, "Train")
    if not (web["root"] / "work" / "runs").exists():  # no run yet: nothing to stop or resume
        assert page.locator("#train-stop").is_disabled() and page.locator("#train-resume").is_disabled()
    _start_run(page, web, output, max_steps=6)
    seen = _wait_run(page, lambda s, n: s == "finished")
    return {"output": output, "seen": seen}


def _log_end_in_view(page: Page) -> bool:
    """The log box shows its last line (the end of the text is at the bottom of the box)."""
    return page.evaluate(
        """() => { const box = document.querySelector('#train-log .xcft-log');
                   const text = box.querySelector('pre');
                   return Math.abs(text.getBoundingClientRect().bottom - box.getBoundingClientRect().bottom) < 3; }"""
    )


def _form_value(page: Page, name: str) -> str:
    return page.locator(f"#train-{name} textarea, #train-{name} input").first.input_value()


@pytest.mark.slow
def test_train_tab_runs_and_draws_the_loss_curve(page, web, finished_run):
    seen, output = finished_run["seen"], finished_run["output"]
    final_state, final_points = seen[-1]
    assert final_state == "finished" and final_points == 6
    assert any(s == "running" and n < final_points for s, n in seen), seen  # points arrived while it ran
    assert (output / "adapter_config.json").is_file() and (output / "trainer_log.jsonl").is_file()
    assert page.locator("#train-loss img").count() == 1
    assert "finished" in _train_log(page) and "exited with status 0" in _train_log(page).strip().splitlines()[-1]
    assert _log_end_in_view(page)
    assert page.locator("#train-stop").is_disabled() and page.locator("#train-resume").is_disabled()
    _shot(page, web, "train")


@pytest.mark.slow
def test_stop_resume_and_server_restart(page, web, finished_run):
    output = web["root"] / "runs-out" / "long"
    _start_run(page, web, output, max_steps=100_000, extra={"save_steps": 1_000_000})
    _wait_run(page, lambda s, n: s == "running" and n >= 2)

    # the status refreshes every second without a progress indicator over it
    _watch_progress(page, ["train-status", "train-log", "train-loss", "train-action"])
    page.wait_for_timeout(3000)
    assert not any(_progress_seen(page).values()), _progress_seen(page)
    assert page.locator("#train-resume").is_disabled() and not page.locator("#train-stop").is_disabled()

    page.reload()  # the page finds the running run again, with the form it was started with
    _tab(page, "Train")
    _wait_run(page, lambda s, n: s == "running" and n >= 2)
    run_id = page.locator("#train-status .xcft-run").get_attribute("data-run")
    page.wait_for_function("() => document.querySelector('#train-command').innerText.includes('--save_steps 1000000')")
    assert _form_value(page, "output_dir") == str(output) and _form_value(page, "max_steps") == "100000"
    assert _form_value(page, "model_name_or_path") == str(web["base"])
    # another run selected: its own settings
    page.locator("#train-run input").click()
    page.get_by_role("option", name="short").click()
    page.wait_for_function("() => document.querySelector('#train-command').innerText.includes('--max_steps 6')")
    assert _form_value(page, "max_steps") == "6" and "save_steps" not in page.inner_text("#train-command")
    page.wait_for_selector('#train-status .xcft-run[data-state="finished"]')
    page.locator("#train-run input").click()
    page.get_by_role("option", name=run_id).click()
    page.wait_for_function("() => document.querySelector('#train-command').innerText.includes('--max_steps 100000')")
    train_pid = int((web["root"] / "work" / "runs" / run_id / "train.pid").read_text())

    web["server"].kill()  # the server dies; the training does not
    os.kill(train_pid, 0)
    n_before = len((output / "trainer_log.jsonl").read_text().splitlines())
    deadline = time.time() + 30
    while len((output / "trainer_log.jsonl").read_text().splitlines()) <= n_before:
        assert time.time() < deadline, "training goes on without the server"
        time.sleep(0.2)
    web["server"].start()
    page.goto(web["server"].url)
    _tab(page, "Train")
    _wait_run(page, lambda s, n: s == "running")
    assert page.locator("#train-status .xcft-run").get_attribute("data-run") == run_id

    page.click("#train-stop")
    seen = _wait_run(page, lambda s, n: s == "stopped")
    message = page.inner_text("#train-status")
    ckpt = re.search(r"checkpoint written: (checkpoint-\d+)", message)
    assert ckpt, message
    assert (output / ckpt.group(1) / "trainer_state.json").is_file()
    stopped_step = int(ckpt.group(1).split("-")[1])

    page.click("#train-resume")
    _wait_run(page, lambda s, n: s == "running" and n > seen[-1][1])
    assert f"resuming from {output / ckpt.group(1)}" in _train_log(page)
    page.click("#train-stop")
    _wait_run(page, lambda s, n: s == "stopped")
    later = re.search(r"checkpoint written: checkpoint-(\d+)", page.inner_text("#train-status"))
    assert later and int(later.group(1)) > stopped_step


# --------------------------------------------------------------------------- Eval tab


def _eval_ids(page: Page) -> list[tuple[str, str]]:
    """The samples the Eval tab shows: (id, fixed/broken/"")."""
    return [
        (s.get_attribute("data-id") or "", s.get_attribute("data-change") or "")
        for s in page.locator("#eval-samples .xcft-eval-sample").all()
    ]


def _eval_filter(page: Page, which: str, n: int) -> list[tuple[str, str]]:
    page.locator("#eval-filter").get_by_text(which, exact=True).click()
    page.wait_for_function(
        "n => { const e = document.querySelector('#eval-samples .xcft-eval-page'); return e && +e.dataset.n === n; }", arg=n
    )
    return _eval_ids(page)


@pytest.mark.slow
def test_eval_tab_compares_two_models_as_xcft_score_does(page, web, tmp_path):
    """Two tiny models answer a small set; the page's table, counts and filters are xcft score's on the same files."""
    import torch

    from xcft.commands.predict import predict_command
    from xcft.commands.score import comparison_rows, score_files
    from xcft.model.loading import load_pretrained, save_pretrained
    from xcft.model.presets import build_model
    from xcft.train.answer_metrics import compare_predictions, normalize_answer
    from xcft.train.predict import read_predictions

    _, tok = load_pretrained(web["base"], dtype=torch.float32, device="cpu")
    other = save_pretrained(
        build_model("tiny", img_size=IMG_SIZE, vocab_size=1000, seed=1, max_length=MAX_LENGTH), tok, web["root"] / "eval-2"
    )
    samples = json.loads(web["good"].read_text())  # one image, text only over two turns, two images
    samples.append(
        {"id": "more", "conversations": [{"from": "user", "value": "Name a shape."}, {"from": "assistant", "value": "?"}]}
    )
    data = web["good"].parent / "eval.json"
    data.write_text(json.dumps(samples), encoding="utf-8")
    settings = {"max_new_tokens": 6, "batch_size": 2}
    # what each model answers (the page's run must give the same): references that one model gets right
    answers = []
    for k, model in enumerate((web["base"], other)):
        out = tmp_path / f"pre-{k}.jsonl"
        predict_command(data=str(data), model_dir=str(model), output=str(out), device="cpu", **settings)
        answers.append({r["id"]: r["prediction"] for r in read_predictions(out)})
    differ = [s["id"] for s in samples if normalize_answer(answers[0][s["id"]]) != normalize_answer(answers[1][s["id"]])]
    assert len(differ) >= 2, answers
    references = {differ[0]: answers[0][differ[0]], differ[1]: answers[1][differ[1]]}  # broken, then fixed
    for s in samples:
        s["conversations"][-1]["value"] = references.get(s["id"], "no model says this")
    data.write_text(json.dumps(samples), encoding="utf-8")

    _tab(page, "Eval")
    for elem, value in (
        ("eval-data", data),
        ("eval-model-1", web["base"]),
        ("eval-model-2", other),
        ("eval-max-new-tokens", settings["max_new_tokens"]),
        ("eval-batch-size", settings["batch_size"]),
        ("eval-metrics", "exact,contains,rouge_l"),
    ):
        _fill(page, elem, value)
    page.click("#eval-run")
    page.wait_for_function("() => document.querySelector('#eval-action').innerText.includes('started eval')")
    seen = _wait_run(page, lambda s, n: s == "finished", tab="eval", count=".xcft-run")
    assert seen[-1] == ("finished", 2 * len(samples)), seen
    assert any(state in ("starting", "running") and n < 2 * len(samples) for state, n in seen), seen  # followed as it ran
    log = page.locator("#eval-log .xcft-log pre").inner_text()
    assert log.count("$ xcft predict ") == 2 and log.count("exited with status 0") == 2, log[-2000:]
    run_id = page.locator("#eval-status .xcft-run").get_attribute("data-run")

    page.reload()  # the page finds the finished run again, and its form
    _tab(page, "Eval")
    page.wait_for_selector(f'#eval-status .xcft-run[data-state="finished"][data-run="{run_id}"]')
    assert page.locator("#eval-model-2 textarea").input_value() == str(other.resolve())
    assert [m.get_attribute("data-done") for m in page.locator("#eval-status .xcft-eval-model").all()] == ["4", "4"]

    files = [web["root"] / "work" / "evals" / run_id / f"model-{k}.jsonl" for k in (1, 2)]
    for k, f in enumerate(files):  # the page's run answered as xcft predict did
        assert {r["id"]: r["prediction"] for r in read_predictions(f)} == answers[k]
    expected = score_files(str(files[0]), str(files[1]), "exact,contains,rouge_l")
    page.wait_for_function("() => document.querySelectorAll('#eval-table .virtual-row').length === 2")
    assert _rows(page, "eval-table") == [
        [g, n, *(c for cell in cells for c in cell)] for g, n, cells in comparison_rows(expected)
    ]
    assert (
        expected.to_dict()
        == compare_predictions(*(read_predictions(f) for f in files), ["exact", "contains", "rouge_l"]).to_dict()
    )
    assert page.locator("#eval-changes .xcft-fixed").get_attribute("data-n") == str(len(expected.fixed)) == "1"
    assert page.locator("#eval-changes .xcft-broken-n").get_attribute("data-n") == str(len(expected.broken)) == "1"

    assert [i for i, _ in _eval_ids(page)] == [s["id"] for s in samples]  # all, in the data's order
    two = page.locator('#eval-samples .xcft-eval-sample[data-id="two"]')
    assert two.locator(".xcft-thumb img").count() == 2 and two.locator(".xcft-answer").count() == 2
    wrong = [s["id"] for s in expected.after.samples if s["passed"] is False]
    assert [i for i, _ in _eval_filter(page, "wrong", len(wrong))] == wrong
    changed = _eval_filter(page, "changed", 2)
    assert sorted(changed) == sorted([(differ[0], "broken"), (differ[1], "fixed")])
    _shot(page, web, "eval")

    # bad input: the CLI's one line, in the page's words; the server goes on
    _fill(page, "eval-model-1", web["root"] / "no-such-model")
    page.click("#eval-run")
    page.wait_for_function("() => document.querySelector('#eval-action').innerText.includes('does not exist')")
    assert "Traceback" not in page.inner_text("#eval-action") and "--model" not in page.inner_text("#eval-action")
    _eval_filter(page, "all", len(samples))


# --------------------------------------------------------------------------- Chat and Export


def _load_model(page: Page, folder: Path | str) -> None:
    _tab(page, "Chat")
    _fill(page, "chat-model", folder)
    page.click("#chat-load")
    page.wait_for_function(
        "f => { const ok = document.querySelector('#chat-status .xcft-ok'); return ok && ok.innerText.includes(f); }",
        arg=str(Path(folder).resolve()),
        timeout=120_000,
    )


def _ask(page: Page, question: str, turn: int) -> str:
    """Send a question; the answer of that turn once it is complete."""
    _fill(page, "chat-query", question)
    page.click("#chat-send")
    page.wait_for_function(
        "s => document.querySelector('#chat-status').innerText.includes(s)", arg=f"answered turn {turn} ", timeout=120_000
    )
    return page.locator("#chat-bot [data-testid=bot]").nth(turn - 1).inner_text().strip()


def _greedy(page: Page, max_new_tokens: int) -> None:
    page.locator("#chat-sampling input[type=checkbox]").uncheck()
    _fill(page, "chat-max-new-tokens", max_new_tokens)


@pytest.mark.slow
def test_chat_with_the_trained_adapter(page, web, finished_run):
    _tab(page, "Chat")
    # a question before Load: said so, and neither kept in the chat nor lost from the box
    _fill(page, "chat-query", "Too early?")
    page.click("#chat-send")
    page.wait_for_function("() => document.querySelector('#chat-status').innerText.includes('no model loaded')")
    assert page.locator("#chat-bot [data-testid=user]").count() == 0
    assert page.locator("#chat-query textarea").input_value() == "Too early?"

    _load_model(page, finished_run["output"])
    assert "LoRA adapter" in page.inner_text("#chat-status") and str(web["base"]) in page.inner_text("#chat-status")
    # the settings show the model's own prompt layout: a model xcft created knows only the training layout
    assert page.locator("#chat-layout input").input_value() == "training"
    assert page.locator("#chat-system textarea").input_value() == ""
    page.locator("#chat-images input[type=file]").set_input_files(str(web["image"]))
    page.wait_for_timeout(500)
    _greedy(page, 12)
    for turn, question in enumerate(["What colour is the square?", "And the background?"], start=1):
        _ask(page, question, turn)
        assert "error" not in page.inner_text("#chat-status")
    bot = page.locator("#chat-bot [data-testid=bot]")
    assert bot.count() == 2 and all(b.inner_text().strip() for b in bot.all())
    users = [u.inner_text().strip() for u in page.locator("#chat-bot [data-testid=user]").all()]
    assert [u for u in users if u] == ["What colour is the square?", "And the background?"]  # no early question glued on
    assert page.locator("#chat-bot img").count() >= 1  # the uploaded image is in the conversation
    _shot(page, web, "chat")
    uploaded = "#chat-images .file-preview, #chat-images table tr"
    assert page.locator(uploaded).count() > 0
    page.click("#chat-clear")
    page.wait_for_function("() => document.querySelectorAll('#chat-bot [data-testid=bot]').length === 0")
    assert page.locator(uploaded).count() == 0  # the images went too


@pytest.mark.slow
def test_two_sessions_chat_with_their_own_models(browser, web):
    """Two pages with two models answer each with its own, whatever the other loads; a new page has none."""
    import torch

    from xcft.model.loading import load_pretrained, save_pretrained
    from xcft.model.presets import build_model

    _, tok = load_pretrained(web["base"], dtype=torch.float32, device="cpu")
    other = save_pretrained(
        build_model("tiny", img_size=IMG_SIZE, vocab_size=1000, seed=1, max_length=MAX_LENGTH), tok, web["root"] / "base-2"
    )
    question = "What colour is the square?"
    refs = []
    for folder in (web["base"], other):
        model, tok = load_pretrained(folder, dtype=torch.float32, device="cpu")
        refs.append(model.chat(tok, question, images=[str(web["image"])], do_sample=False, max_new_tokens=10)[0])
    assert refs[0] != refs[1]

    pages = [_new_page(browser, web) for _ in range(3)]
    try:
        first, second, fresh = pages
        for pg, folder in ((first, web["base"]), (second, other)):
            _load_model(pg, folder)
            pg.locator("#chat-images input[type=file]").set_input_files(str(web["image"]))
            pg.wait_for_timeout(300)
            _greedy(pg, 10)
        assert _ask(first, question, 1) == refs[0]
        assert _ask(second, question, 1) == refs[1]
        first.click("#chat-clear")
        first.wait_for_function("() => document.querySelectorAll('#chat-bot [data-testid=bot]').length === 0")
        first.locator("#chat-images input[type=file]").set_input_files(str(web["image"]))
        first.wait_for_timeout(300)
        assert _ask(first, question, 1) == refs[0]  # after the other page loaded its model
        _tab(fresh, "Chat")
        _fill(fresh, "chat-query", question)
        fresh.click("#chat-send")
        fresh.wait_for_function("() => document.querySelector('#chat-status').innerText.includes('no model loaded')")
        # a model that answers nothing (its output head is zero: every step picks <unk>, which decodes to "")
        silent, _ = load_pretrained(web["base"], dtype=torch.float32, device="cpu")
        with torch.no_grad():
            silent.output.weight.zero_()
        _load_model(fresh, save_pretrained(silent, tok, web["root"] / "silent"))
        _greedy(fresh, 4)
        assert "empty answer" in _ask(fresh, question, 1)
    finally:
        for pg in pages:
            pg.close()


@pytest.mark.slow
def test_export_merges_and_shows_the_probe_difference(page, web, finished_run):
    merged = web["root"] / "merged"
    _tab(page, "Export")
    _fill(page, "export-adapter", finished_run["output"])
    _fill(page, "export-output", merged)
    page.click("#export-merge")
    page.wait_for_selector("#export-result .xcft-probe, #export-result .xcft-error", timeout=180_000)
    result = page.locator("#export-result .xcft-probe")
    assert result.count() == 1, page.inner_text("#export-result") + page.locator("#export-log textarea").input_value()
    diff = float(result.get_attribute("data-diff"))
    tol = float(re.search(r"tolerance ([0-9.eE+-]+)", page.inner_text("#export-result")).group(1))
    assert 0 <= diff <= tol
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    _shot(page, web, "export")
    page.click("#export-merge")  # the same output again: the CLI's refusal, in the page's words
    page.wait_for_selector("#export-result .xcft-error", timeout=120_000)
    assert "the output folder" in page.inner_text("#export-result") and "--output" not in page.inner_text("#export-result")
    assert "already holds an earlier xcft output" in page.inner_text("#export-result")
    # a folder that does not exist: said at once, the last result gone
    _fill(page, "export-adapter", web["root"] / "no-such-adapter")
    page.click("#export-merge")
    page.wait_for_function("() => document.querySelector('#export-result').innerText.includes('does not exist')", timeout=5_000)
    assert "already holds" not in page.inner_text("#export-result")


@pytest.mark.slow
def test_demo_model_answers_in_the_chat_tab_with_its_defaults(browser, web):
    """The demo's merged model, loaded with nothing changed in the settings, names the colour of a held-out shape."""
    from xcft.commands.demo.run import run_demo

    demo = run_demo(web["root"] / "demo", quick=True)
    from xcft.commands.demo.synthetic import HELDOUT_PREFIX

    colours = json.loads((Path(demo.output_dir) / "data" / f"{HELDOUT_PREFIX}colour.json").read_text())[:3]
    pg = _new_page(browser, web)
    try:
        _load_model(pg, demo.merged_dir)
        right = 0
        for q in colours:
            pg.locator("#chat-images input[type=file]").set_input_files(str(Path(demo.output_dir) / "data" / q["image"][0]))
            pg.wait_for_timeout(300)
            answer = _ask(pg, q["conversations"][0]["value"], 1)
            right += answer.split()[:1] == [q["conversations"][1]["value"]]
            pg.click("#chat-clear")
            pg.wait_for_function("() => document.querySelectorAll('#chat-bot [data-testid=bot]').length === 0")
        assert right >= 2, right  # sampling (the default): a rare miss is allowed
    finally:
        pg.close()

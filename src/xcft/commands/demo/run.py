"""``xcft demo``: synthetic data -> tiny model -> accuracy -> LoRA finetune -> accuracy -> merge -> chat.

Every stage uses the code path a user's run uses: the data is written in the official JSON format
with a ``data.txt``; the base model is an ordinary saved folder; training is ``xcft train`` (its
library entry point, with the official flags); the adapter is evaluated by loading the adapter
folder; merging is ``xcft merge``; the merged folder is queried by ``xcft chat`` in a new process.
Accuracies are measured by `xcft predict` + `xcft score` on held-out images (see :mod:`xcft.commands.demo.scoring`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from xcft.commands.demo.report import format_table, to_json
from xcft.commands.demo.scoring import HEADLINE_KINDS, METRIC, chance_levels, heldout_accuracy
from xcft.commands.demo.synthetic import DemoData, generate_dataset
from xcft.commands.merge import merge_model
from xcft.commands.train import train_command
from xcft.data.spm_builder import build_tokenizer
from xcft.errors import XcftError
from xcft.model.loading import load_pretrained, save_pretrained
from xcft.model.presets import build_model
from xcft.model.tokenization_internlm2 import InternLM2Tokenizer
from xcft.output_dir import FolderLock, OutputFolder
from xcft.run_files import LOSS_PLOT_NAME, TRAINER_STATE_NAME
from xcft.train.plots import loss_figure, save_figure

logger = logging.getLogger(__name__)

__all__ = ["FULL", "QUICK", "DemoPreset", "DemoResult", "demo_command", "run_demo"]


@dataclass(frozen=True)
class DemoPreset:
    """Sizes and hyper-parameters of one demo variant (chosen for a 2-core CPU; see README "The demo")."""

    n_single: int  # one-image samples (each asks colour and shape)
    n_compare: int  # two-image "same colour?" samples
    n_text: int  # text-only samples
    n_heldout: int  # held-out images (each asked colour and shape)
    steps: int
    batch_size: int
    learning_rate: float
    lora_r: int = 16
    lora_alpha: int = 32
    fix_vit: bool = False
    img_size: int = 224
    warmup: float = 0.05
    shape_fraction: float = 0.5  # share of one-image samples that ask the shape (colour is learned faster)
    shapes: tuple[str, ...] | None = None  # None: xcft.commands.demo.synthetic.SHAPES
    model: str = "tiny"  # xcft.model.presets shape of the base model
    draw_size: int | None = None  # pixel size of the image files (None: at least 112)
    # tiny decoder / vision sizes (xcft.model.presets "tiny" with these overrides)
    overrides: dict[str, Any] = field(default_factory=dict)


#: Base-model overrides of the "tiny" preset: a wider init so that the frozen random output head
#: can express a confident token (with 0.02 the logits of a random head are ~0.1 apart and LoRA
#: alone cannot leave ln(vocab)), and RoPE theta 1e4 (positions inside a short sequence are
#: distinguishable; 1e6 is for 32k contexts).
TINY_DEMO_OVERRIDES: dict[str, Any] = {"initializer_range": 0.25, "rope_theta": 1e4}

FULL = DemoPreset(
    n_single=1200,
    n_compare=200,
    n_text=100,
    n_heldout=48,
    steps=4000,
    batch_size=8,
    learning_rate=3e-3,
    img_size=56,
    overrides=TINY_DEMO_OVERRIDES,
    shape_fraction=2 / 3,
)
#: The 2.5 family (HD crops, separators, 2x2 merge) at 56-px views. The images are drawn at 36 px so
#: that the training transform (x1.5 width factor) and the chat transform give the same 1x1 crop
#: grid: the official release trains and chats with different transforms, and a tiny model trained
#: from scratch would otherwise be asked about grids it never saw.
FULL_2_5 = replace(FULL, model="tiny-2.5", draw_size=36)
QUICK = DemoPreset(
    n_single=400,
    n_compare=0,
    n_text=40,
    n_heldout=24,
    steps=200,
    batch_size=8,
    learning_rate=3e-3,
    img_size=56,
    overrides=TINY_DEMO_OVERRIDES,
)
QUICK_2_5 = replace(QUICK, model="tiny-2.5", draw_size=36)
PRESETS = {("2.0", False): FULL, ("2.0", True): QUICK, ("2.5", False): FULL_2_5, ("2.5", True): QUICK_2_5}


@dataclass
class DemoResult:
    """Everything the demo measured, and where it wrote things."""

    accuracy_before: float
    accuracy_after: float
    per_kind_before: dict[str, float]
    per_kind_after: dict[str, float]
    per_kind_count: dict[str, int]
    chance: dict[str, float]
    accuracy_blank_images: float | None
    loss_first: float
    loss_last: float
    losses: list[tuple[int, float]]
    steps: int
    train_seconds: float
    total_seconds: float
    output_dir: str
    data_txt: str
    base_dir: str
    adapter_dir: str
    merged_dir: str | None
    loss_png: str | None
    reload_question: dict[str, str] | None
    reload_answer: str | None
    reload_adapter_answer: str | None  # what the adapter model said to the same question in this process
    heldout_txt: str  # the held-out questions, one file per kind (xcft predict / xcft score input)
    predictions_before: str  # xcft predict output of the base model on them
    predictions_after: str  # ... and of the finetuned model
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _redirect(quiet: bool):
    """Send the sub-commands' own prints to stderr when stdout must hold only the JSON result."""
    return contextlib.redirect_stdout(sys.stderr) if quiet else contextlib.nullcontext()


def _loss_history(adapter_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from the trainer state ``xcft train`` saves next to the adapter."""
    state = adapter_dir / TRAINER_STATE_NAME
    if not state.is_file():
        raise XcftError(f"{state} is missing: training did not finish (see the messages above)")
    history = json.loads(state.read_text())["log_history"]
    return [(int(h["step"]), float(h["loss"])) for h in history if "loss" in h]


def train_flags(preset: DemoPreset, base: Path, data_txt: Path, out: Path, steps: int, seed: int) -> list[str]:
    """The ``xcft train`` command line the demo runs (official finetune.py flags + TrainingArguments)."""
    flags = {
        "model_name_or_path": base,
        "data_path": data_txt,
        "given_num": "true",
        "img_size": preset.img_size,
        "use_lora": "true",
        "fix_vit": str(preset.fix_vit).lower(),
        "fix_sampler": "false",
        "lora_r": preset.lora_r,
        "lora_alpha": preset.lora_alpha,
        "lora_dropout": 0.0,
        "output_dir": out,
        "max_steps": steps,
        "per_device_train_batch_size": preset.batch_size,
        "learning_rate": preset.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": preset.warmup,
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "use_cpu": "true",
    }
    argv: list[str] = []
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


def _reload_and_ask(merged: Path, image: str, question: str, timeout: float = 300.0) -> str:
    """Ask the merged folder one question with ``xcft chat`` in a fresh Python process."""
    cmd = [
        sys.executable,
        "-m",
        "xcft.cli",
        "chat",
        "--model",
        str(merged),
        "--image",
        image,
        "--query",
        question,
        "--greedy",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise XcftError(f"`xcft chat` on the merged model failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


RESULT_NAME = "result.json"


def run_demo(
    output: str | Path,
    *,
    steps: int | None = None,
    quick: bool = False,
    preset: DemoPreset | None = None,
    blank_train_images: bool = False,
    merge: bool = True,
    seed: int = 0,
    quiet: bool = False,
    family: str = "2.0",
) -> DemoResult:
    """Run the whole demo under ``output`` and return what it measured (see module docstring).

    ``blank_train_images`` is the control experiment: training images are flat grey, so the
    colour and shape accuracy must stay at chance. ``merge`` False skips merging and the
    fresh-process chat (the tests' control run needs only the accuracies).

    The folder follows xcft's output-folder rules (:mod:`xcft.output_dir`): new, empty or an
    earlier demo's, and locked while the demo runs.
    """
    out = Path(output).resolve()
    folder = OutputFolder.claim(out, "demo", flag="--output")
    with FolderLock(out):
        try:
            return _run_demo(
                out,
                folder,
                steps=steps,
                quick=quick,
                preset=preset,
                blank_train_images=blank_train_images,
                merge=merge,
                seed=seed,
                quiet=quiet,
                family=family,
            )
        finally:
            folder.record()


def _data_and_base(parts: dict[str, Path], preset: DemoPreset, *, seed: int, blank_train_images: bool) -> DemoData:
    """Generate the synthetic data, then a tokenizer and a tiny base model saved as an ordinary model folder."""
    data = generate_dataset(
        parts["data"],
        n_single=preset.n_single,
        n_compare=preset.n_compare,
        n_text=preset.n_text,
        n_heldout=preset.n_heldout,
        img_size=preset.img_size,
        seed=seed,
        blank_train_images=blank_train_images,
        shape_fraction=preset.shape_fraction,
        draw_size=preset.draw_size,
        **({"shapes": preset.shapes} if preset.shapes else {}),
    )
    tok_path = build_tokenizer(parts["tokenizer"])
    tokenizer = InternLM2Tokenizer.from_model_file(tok_path)
    model = build_model(preset.model, preset.img_size, int(tokenizer.vocab_size), seed=seed, **preset.overrides)
    save_pretrained(model, tokenizer, parts["base"], command="demo")
    shutil.rmtree(parts["tokenizer"], ignore_errors=True)  # it is inside the base folder now
    return data


def _merge_and_ask(parts: dict[str, Path], replies: Any, quiet: bool) -> tuple[dict[str, Any], str, str]:
    """Merge the adapter (verified), then ask the merged folder a held-out colour question in a new process.

    Returns (the question, the merged model's answer, the adapter's answer in this process).
    """
    with _redirect(quiet):
        merge_model(adapter=str(parts["lora"]), output=str(parts["merged"]), base=None)
    qa, adapter_answer = next((q, a) for q, a in replies if q.kind == "colour")
    # The question as trained, placeholder included: where an image without one goes differs by family.
    question = {"image": qa.images[0], "question": qa.question, "answer": qa.answer}
    return question, _reload_and_ask(parts["merged"], qa.images[0], qa.question), adapter_answer


def _run_demo(
    out: Path,
    folder: OutputFolder,
    *,
    steps: int | None,
    quick: bool,
    preset: DemoPreset | None,
    blank_train_images: bool,
    merge: bool,
    seed: int,
    quiet: bool,
    family: str,
) -> DemoResult:
    """The demo's steps in the claimed and locked folder ``out`` (what they write is declared xcft's first)."""
    t_start = time.perf_counter()
    if preset is None:
        if (family, quick) not in PRESETS:
            raise XcftError(f"--family {family}: choose 2.0 or 2.5")
        preset = PRESETS[(family, quick)]
    n_steps = int(steps if steps is not None else preset.steps)
    if n_steps < 1:
        raise XcftError(f"--steps {n_steps}: give at least 1 training step")
    parts = {name: out / name for name in ("data", "tokenizer", "base", "lora", "merged")}
    predictions = {name: out / f"predictions_{name}.jsonl" for name in ("before", "after", "blank")}
    # Everything the demo writes is declared xcft's before it is written; a rerun replaces only that.
    folder.declare([*parts, *(p.name for p in predictions.values()), RESULT_NAME, LOSS_PLOT_NAME])
    for path in parts.values():
        if path.exists():
            shutil.rmtree(path)
    for path in predictions.values():
        path.unlink(missing_ok=True)

    # 1-2. data, tokenizer and the tiny base model
    data = _data_and_base(parts, preset, seed=seed, blank_train_images=blank_train_images)

    # 3. accuracy before (the saved base folder, loaded like a user's)
    base_model, tokenizer = load_pretrained(parts["base"], dtype=torch.float32, device="cpu")
    before = heldout_accuracy(base_model, tokenizer, data.heldout_txt, predictions["before"], data.heldout)
    logger.info("accuracy before training: %.3f %s", before.overall, before.per_kind)
    del base_model

    # 4. LoRA finetune with `xcft train`
    argv = train_flags(preset, parts["base"], data.data_txt, parts["lora"], n_steps, seed)
    logger.info("xcft train %s", " ".join(argv))
    t0 = time.perf_counter()
    with _redirect(quiet):
        status = train_command(argv)
    train_seconds = time.perf_counter() - t0
    if status != 0:
        raise XcftError(f"xcft train stopped with status {status}; see the messages above")
    losses = _loss_history(parts["lora"])

    # 5. accuracy after (the adapter folder: base + LoRA + trained projector), and the blank-image control
    tuned, tokenizer = load_pretrained(parts["lora"], dtype=torch.float32, device="cpu")
    after = heldout_accuracy(tuned, tokenizer, data.heldout_txt, predictions["after"], data.heldout)
    blank = heldout_accuracy(tuned, tokenizer, data.heldout_blank, predictions["blank"], data.heldout)
    logger.info("accuracy after training: %.3f %s; colour with blank images %.3f", after.overall, after.per_kind, blank.overall)
    del tuned

    # 6. merge, then one question to the merged folder in a new process
    merged_dir = reload_answer = reload_q = adapter_answer = None
    if merge:
        reload_q, reload_answer, adapter_answer = _merge_and_ask(parts, after.replies, quiet)
        merged_dir = str(parts["merged"])

    # 7. loss plot + result
    png = save_figure(loss_figure(losses, title="xcft demo: LoRA training loss", log_scale=True), out / LOSS_PLOT_NAME)
    chance = chance_levels()
    result = DemoResult(
        accuracy_before=before.overall,
        accuracy_after=after.overall,
        per_kind_before=before.per_kind,
        per_kind_after=after.per_kind,
        per_kind_count=after.counts,
        chance={k: v for k, v in chance.items() if k in after.counts},
        accuracy_blank_images=blank.per_kind.get("colour"),
        loss_first=losses[0][1] if losses else float("nan"),
        loss_last=losses[-1][1] if losses else float("nan"),
        losses=losses,
        steps=n_steps,
        train_seconds=round(train_seconds, 2),
        total_seconds=round(time.perf_counter() - t_start, 2),
        output_dir=str(out),
        data_txt=str(data.data_txt),
        base_dir=str(parts["base"]),
        adapter_dir=str(parts["lora"]),
        merged_dir=merged_dir,
        loss_png=str(png) if png else None,
        reload_question=reload_q,
        reload_answer=reload_answer,
        reload_adapter_answer=adapter_answer,
        heldout_txt=str(data.heldout_txt),
        predictions_before=before.predictions,
        predictions_after=after.predictions,
        settings={
            **asdict(replace(preset, steps=n_steps)),
            "quick": quick,
            "blank_train_images": blank_train_images,
            "headline_kinds": list(HEADLINE_KINDS),
            "metric": METRIC,
            "torch_threads": torch.get_num_threads(),
        },
    )
    (out / RESULT_NAME).write_text(json.dumps(result.to_dict(), indent=1))
    return result


def demo_command(*, output: str, steps: int | None, quick: bool, output_format: str = "text", family: str = "2.0") -> int:
    """The SFT demo of ``xcft demo``: run it, print the table (or one JSON object)."""
    quiet = output_format == "json"
    # In JSON mode stdout carries the one JSON object only: everything the stages print (and
    # logging handlers that libraries bind to sys.stdout when first imported) goes to stderr.
    with _redirect(quiet):
        result = run_demo(output, steps=steps, quick=quick, quiet=quiet, family=family).to_dict()
    if quiet:
        slim = {k: v for k, v in result.items() if k != "losses"}
        print(to_json(slim))
    else:
        print()
        print(format_table(result))
    return 0

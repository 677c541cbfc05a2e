"""``xcft demo --stage dpo``: a model that names the wrong colour, corrected by DPO on preference pairs.

1. The SFT demo's data (colour questions only), and a copy whose answers are a plausible wrong
   colour (:data:`PLAUSIBLE_WRONG`: red -> orange, green -> blue, ...).
2. A tiny base model finetuned (LoRA, ``xcft train``) on the wrong answers and merged
   (``xcft merge``): the starting model, which prefers the wrong colour.
3. Preference pairs in the compact form: chosen = the right colour, rejected = the plausible wrong
   one; training pairs from the training images, held-out pairs from freshly drawn images.
4. ``xcft train --stage dpo --use_lora true`` from the merged model (the reference is that model:
   the adapter disabled), evaluated on the held-out pairs while it trains.
5. Before and after, on the held-out pairs: preference accuracy (share of pairs whose chosen answer
   has the higher summed log-probability, i.e. a positive margin) and greedy chat answers.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xcft.commands.demo.run import QUICK, RESULT_NAME, _redirect, train_flags
from xcft.commands.demo.scoring import heldout_accuracy
from xcft.commands.demo.synthetic import COLOURS, HELDOUT_PREFIX, QA, QUESTIONS, generate_dataset
from xcft.commands.eval import evaluate_pairs
from xcft.commands.merge import merge_command
from xcft.commands.train import train_command
from xcft.data.spm_builder import build_tokenizer
from xcft.errors import XcftError
from xcft.model.loading import load_pretrained, save_pretrained
from xcft.model.presets import build_model
from xcft.model.tokenization_internlm2 import InternLM2Tokenizer
from xcft.output_dir import FolderLock, OutputFolder
from xcft.run_files import TRAINER_LOG_NAME
from xcft.train.answer_metrics import first_word

logger = logging.getLogger(__name__)

__all__ = ["PLAUSIBLE_WRONG", "DpoDemoPreset", "DpoDemoResult", "format_dpo_table", "pair_margins", "run_dpo_demo"]

#: The wrong colour the starting model learns for each colour: a neighbouring hue or brightness.
PLAUSIBLE_WRONG = {
    "red": "orange",
    "orange": "yellow",
    "yellow": "white",
    "white": "yellow",
    "green": "blue",
    "blue": "purple",
    "purple": "blue",
    "black": "purple",
}


@dataclass(frozen=True)
class DpoDemoPreset:
    """Sizes and hyper-parameters of the DPO demo (chosen for a 2-core CPU)."""

    n_train: int = 400  # one-image colour samples (the wrong SFT and the training pairs share them)
    n_heldout: int = 48  # held-out images, one pair each
    sft_steps: int = 300
    dpo_steps: int = 150
    batch_size: int = 8
    sft_learning_rate: float = 3e-3
    dpo_learning_rate: float = 2e-3
    beta: float = 0.1
    rpo_alpha: float | None = 1.0  # the chosen answers' NLL added (TRL's RPO): keeps greedy answers words
    img_size: int = 56
    overrides: dict[str, Any] = field(default_factory=lambda: dict(QUICK.overrides))


FULL_DPO = DpoDemoPreset()
QUICK_DPO = DpoDemoPreset(n_train=200, n_heldout=24, sft_steps=150, dpo_steps=40)


@dataclass
class DpoDemoResult:
    """What the DPO demo measured, and where it wrote things."""

    preference_accuracy_before: float
    preference_accuracy_after: float
    mean_margin_before: float
    mean_margin_after: float
    colour_accuracy_before: float
    colour_accuracy_after: float
    says_wrong_colour_before: float
    says_wrong_colour_after: float
    eval_reward_accuracy_last: float | None
    answers: list[dict[str, str]]  # a few held-out questions: right, wrong, before, after
    pairs_heldout: int
    sft_seconds: float
    dpo_seconds: float
    total_seconds: float
    output_dir: str
    sft_model_dir: str
    dpo_adapter_dir: str
    pairs_train: str
    pairs_heldout_file: str
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pair_margins(model: Any, tokenizer: Any, pairs_file: Path, batch_size: int = 8) -> np.ndarray:
    """Per held-out pair: summed answer log-prob of the chosen minus the rejected answer (``xcft eval``'s)."""
    result = evaluate_pairs(model, tokenizer, str(pairs_file), batch_size=batch_size, progress=False)
    return np.asarray([p["margin"] for p in result["pairs"]])


def _write_pairs(path: Path, samples: list[tuple[str, str]]) -> Path:
    """Compact pairs for (image path relative to ``path``'s folder, right colour)."""
    records = [
        {
            "id": k,
            "image": image,
            "conversations": [{"from": "user", "value": "<ImageHere>" + QUESTIONS["colour"]}],
            "chosen": colour,
            "rejected": PLAUSIBLE_WRONG[colour],
        }
        for k, (image, colour) in enumerate(samples)
    ]
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def _greedy(model: Any, tokenizer: Any, data: Path, predictions: Path, questions: list[QA]) -> tuple[float, float, list[str]]:
    """(right-colour share, wrong-colour share, first words) of greedy answers (``xcft predict`` of ``data``)."""
    if predictions.exists():
        predictions.unlink()  # a fresh measurement, not the continuation of an earlier one
    acc = heldout_accuracy(model, tokenizer, data, predictions, questions)
    words = [first_word(reply) for _, reply in acc.replies]
    wrong = [w == PLAUSIBLE_WRONG[qa.answer] for (qa, _), w in zip(acc.replies, words)]
    return acc.overall, sum(wrong) / max(len(wrong), 1), words


def _dpo_flags(preset: DpoDemoPreset, base: Path, pairs: Path, heldout: Path, out: Path, steps: int, seed: int) -> list[str]:
    flags = {
        "stage": "dpo",
        "model_name_or_path": base,
        "data_path": pairs,
        "eval_data_path": heldout,
        "given_num": "false",
        "use_lora": "true",
        "fix_vit": "false",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "beta": preset.beta,
        **({"rpo_alpha": preset.rpo_alpha} if preset.rpo_alpha else {}),
        "output_dir": out,
        "max_steps": steps,
        "per_device_train_batch_size": preset.batch_size,
        "per_device_eval_batch_size": preset.batch_size,
        "learning_rate": preset.dpo_learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "weight_decay": 0.0,
        "eval_strategy": "steps",
        "eval_steps": max(1, steps // 4),
        "save_strategy": "no",
        "report_to": "none",
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "use_cpu": "true",
        "disable_tqdm": "true",
    }
    argv: list[str] = []
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


def run_dpo_demo(
    output: str | Path, *, quick: bool = False, steps: int | None = None, seed: int = 0, quiet: bool = False
) -> DpoDemoResult:
    """Run the DPO demo under ``output`` (an output folder with xcft's rules) and return what it measured."""
    out = Path(output).resolve()
    folder = OutputFolder.claim(out, "demo", flag="--output")
    with FolderLock(out):
        try:
            return _run(out, folder, QUICK_DPO if quick else FULL_DPO, steps, seed, quiet, quick)
        finally:
            folder.record()


def _run(
    out: Path, folder: OutputFolder, preset: DpoDemoPreset, steps: int | None, seed: int, quiet: bool, quick: bool
) -> DpoDemoResult:
    t_start = time.perf_counter()
    dpo_steps = int(steps if steps is not None else preset.dpo_steps)
    if dpo_steps < 1:
        raise XcftError(f"--steps {dpo_steps}: give at least 1 training step")
    parts = {name: out / name for name in ("data", "tokenizer", "base", "sft-lora", "sft", "dpo")}
    folder.declare([*parts, RESULT_NAME])
    for path in parts.values():
        if path.exists():
            shutil.rmtree(path)

    # 1. data: colour questions; the wrong-answer copy for the starting model
    data = generate_dataset(
        parts["data"],
        n_single=preset.n_train,
        n_compare=0,
        n_text=0,
        n_heldout=preset.n_heldout,
        img_size=preset.img_size,
        seed=seed,
        shape_fraction=0.0,
    )
    train = json.loads(data.train_files["shapes"].read_text())
    right = [(s["image"][0], s["conversations"][1]["value"]) for s in train]
    wrong_sft = [
        {**s, "conversations": [s["conversations"][0], {**s["conversations"][1], "value": PLAUSIBLE_WRONG[c]}]}
        for s, (_, c) in zip(train, right)
    ]
    wrong_json = parts["data"] / "wrong_colours.json"
    wrong_json.write_text(json.dumps(wrong_sft, indent=1), encoding="utf-8")
    pairs_train = _write_pairs(parts["data"] / "pairs.json", right)
    heldout_qas = [qa for qa in data.heldout if qa.kind == "colour"]
    root = parts["data"]
    colour_file = root / f"{HELDOUT_PREFIX}colour.json"
    pairs_heldout = _write_pairs(
        parts["data"] / "pairs_heldout.json", [(str(Path(qa.images[0]).relative_to(root)), qa.answer) for qa in heldout_qas]
    )

    # 2. the starting model: a tiny base finetuned on the wrong colours, merged
    tokenizer = InternLM2Tokenizer.from_model_file(build_tokenizer(parts["tokenizer"]))
    base = build_model("tiny", preset.img_size, int(tokenizer.vocab_size), seed=seed, **preset.overrides)
    save_pretrained(base, tokenizer, parts["base"], command="demo")
    del base
    shutil.rmtree(parts["tokenizer"], ignore_errors=True)
    sft_preset = replace(QUICK, learning_rate=preset.sft_learning_rate, batch_size=preset.batch_size)
    argv = train_flags(sft_preset, parts["base"], wrong_json, parts["sft-lora"], preset.sft_steps, seed)
    argv += ["--given_num", "false", "--disable_tqdm", "true"]
    t0 = time.perf_counter()
    with _redirect(quiet):
        if train_command(argv) != 0:
            raise XcftError("the wrong-colour finetune failed; see the messages above")
        if merge_command(adapter=str(parts["sft-lora"]), output=str(parts["sft"]), base=None) != 0:
            raise XcftError("xcft merge of the wrong-colour adapter failed")
    sft_seconds = time.perf_counter() - t0
    shutil.rmtree(parts["sft-lora"], ignore_errors=True)

    # 3. before
    model, tokenizer = load_pretrained(parts["sft"], dtype=torch.float32, device="cpu")
    margins_before = pair_margins(model, tokenizer, pairs_heldout)
    right_before, wrong_before, words_before = _greedy(
        model, tokenizer, colour_file, root / "predictions_before.jsonl", heldout_qas
    )
    del model

    # 4. DPO
    t0 = time.perf_counter()
    with _redirect(quiet):
        status = train_command(_dpo_flags(preset, parts["sft"], pairs_train, pairs_heldout, parts["dpo"], dpo_steps, seed))
    dpo_seconds = time.perf_counter() - t0
    if status != 0:
        raise XcftError(f"xcft train --stage dpo stopped with status {status}")
    evals = [json.loads(line) for line in (parts["dpo"] / TRAINER_LOG_NAME).read_text().splitlines()]
    eval_acc = [r["eval_rewards/accuracies"] for r in evals if "eval_rewards/accuracies" in r]

    # 5. after (the adapter folder, base + LoRA)
    model, tokenizer = load_pretrained(parts["dpo"], dtype=torch.float32, device="cpu")
    margins_after = pair_margins(model, tokenizer, pairs_heldout)
    right_after, wrong_after, words_after = _greedy(model, tokenizer, colour_file, root / "predictions_after.jsonl", heldout_qas)
    del model

    answers = [
        {"image": Path(qa.images[0]).name, "right": qa.answer, "wrong": PLAUSIBLE_WRONG[qa.answer], "before": b, "after": a}
        for qa, b, a in list(zip(heldout_qas, words_before, words_after))[:8]
    ]
    result = DpoDemoResult(
        preference_accuracy_before=float((margins_before > 0).mean()),
        preference_accuracy_after=float((margins_after > 0).mean()),
        mean_margin_before=float(margins_before.mean()),
        mean_margin_after=float(margins_after.mean()),
        colour_accuracy_before=right_before,
        colour_accuracy_after=right_after,
        says_wrong_colour_before=wrong_before,
        says_wrong_colour_after=wrong_after,
        eval_reward_accuracy_last=eval_acc[-1] if eval_acc else None,
        answers=answers,
        pairs_heldout=len(margins_after),
        sft_seconds=round(sft_seconds, 2),
        dpo_seconds=round(dpo_seconds, 2),
        total_seconds=round(time.perf_counter() - t_start, 2),
        output_dir=str(out),
        sft_model_dir=str(parts["sft"]),
        dpo_adapter_dir=str(parts["dpo"]),
        pairs_train=str(pairs_train),
        pairs_heldout_file=str(pairs_heldout),
        settings={**asdict(preset), "dpo_steps": dpo_steps, "quick": quick, "colours": len(COLOURS)},
    )
    (out / RESULT_NAME).write_text(json.dumps(result.to_dict(), indent=1))
    return result


def format_dpo_table(result: dict[str, Any]) -> str:
    """The DPO demo's figures as a few aligned lines."""

    def pct(x: float) -> str:
        return f"{100 * x:5.1f}%"

    n = result["pairs_heldout"]
    rows = [
        (
            f"held-out preference accuracy (n={n}, chance 50%)",
            pct(result["preference_accuracy_before"]),
            pct(result["preference_accuracy_after"]),
        ),
        (
            "  mean log-prob margin chosen - rejected",
            f"{result['mean_margin_before']:6.2f}",
            f"{result['mean_margin_after']:6.2f}",
        ),
        ("greedy answer: right colour", pct(result["colour_accuracy_before"]), pct(result["colour_accuracy_after"])),
        (
            "greedy answer: the plausible wrong colour",
            pct(result["says_wrong_colour_before"]),
            pct(result["says_wrong_colour_after"]),
        ),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [f"{'':{w}}   before     after", *(f"{a:{w}}   {b:>6}  ->  {c:>6}" for a, b, c in rows)]
    if result.get("eval_reward_accuracy_last") is not None:
        lines.append(f"{'eval_rewards/accuracies (last eval)':{w}}             {pct(result['eval_reward_accuracy_last'])}")
    lines.append("")
    lines.append("some held-out answers (right / wrong: before -> after):")
    for a in result["answers"]:
        lines.append(f"  {a['image']}: {a['right']} / {a['wrong']}: {a['before']!r} -> {a['after']!r}")
    lines.append("")
    lines.append(
        f"wrong-colour finetune {result['sft_seconds']:.1f} s, DPO {result['dpo_seconds']:.1f} s (total {result['total_seconds']:.1f} s)"
    )
    lines.append(f"output: {result['output_dir']}")
    return "\n".join(lines)

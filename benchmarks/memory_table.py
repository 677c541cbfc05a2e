"""Print the docs' "what fits where" table from the memory plan (no GPU needed, nothing is loaded).

    PYTHONPATH=src python benchmarks/memory_table.py            # markdown, as in docs/memory.md
    PYTHONPATH=src python benchmarks/memory_table.py --json     # one JSON line per configuration

Every cell is :func:`xcft.train.memory_plan.compute_plan` for the 7B shapes (``7b``: 2.0 at 490 px
and 4096 tokens; ``7b-2.5``: hd_num 18, 16384 tokens), the worst-case rows the plan assumes without
data (each row ``max_length`` positions with one image, the largest crop grid for 2.5), bf16 mixed
precision and activation checkpointing. The batch is the largest per-GPU batch (1, 2, 4 ...) whose
plan, CUDA context and allocator overhead included, fits the card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from xcft.model.presets import preset_config
from xcft.train.memory_plan import GIB, ModelShape, PlanSettings, compute_plan, largest_batch

CARDS = {"24 GB": 24 * GIB, "40 GB": 40 * GIB, "80 GB": 80 * GIB}
FAMILIES = {
    "2.0 (490 px, 4096 tokens)": ("7b", {"max_length": 4096}),
    "2.5 (hd_num 18, 16384 tokens)": ("7b-2.5", {"max_length": 16384, "hd_num": 18}),
}
BASE = PlanSettings(amp="bf16", checkpointing=True, batch=1, device="cuda")
MODES = {
    # name: (settings change, flags on 1 GPU, on 8 GPUs)
    "full": (
        {"use_lora": False, "model_dtype": "float32"},
        {},
        {"zero_stage": 3},
    ),
    "LoRA": ({"use_lora": True, "model_dtype": "bfloat16"}, {}, {}),
    "QLoRA": ({"use_lora": True, "bits": 4}, {}, {"zero_stage": 2}),
}
FLAGS = {
    ("full", 1): "`--bf16 true`",
    ("full", 8): "`--bf16 true --deepspeed configs/ds_zero3.json`",
    ("LoRA", 1): "`--use_lora true --model_dtype bfloat16 --bf16 true`",
    ("LoRA", 8): "same, DDP",
    ("QLoRA", 1): "`--use_lora true --bits 4 --bf16 true`",
    ("QLoRA", 8): "same, `--deepspeed configs/ds_zero2.json`",
}


def rows() -> list[dict]:
    out = []
    for family, (preset, data) in FAMILIES.items():
        shape = ModelShape.from_config(preset_config(preset))
        for mode, (change, one, eight) in MODES.items():
            for gpus, extra in ((1, one), (8, eight)):
                st = dataclasses.replace(BASE, **change, **data, **extra, gpus=gpus)
                plan = compute_plan(shape, st)
                cells = {card: largest_batch(shape, st, None, budget) for card, budget in CARDS.items()}
                out.append(
                    {
                        "family": family,
                        "mode": mode,
                        "gpus": gpus,
                        "flags": FLAGS[(mode, gpus)],
                        "needs_gib_batch1": round(plan.required_bytes / GIB, 1),
                        "peak_gib_batch1": round(plan.peak_bytes / GIB, 1),
                        "largest_batch": cells,
                    }
                )
    return out


def markdown(table: list[dict]) -> str:
    cards = list(CARDS)
    lines = [
        "| model | mode | GPUs | flags (plus `--gradient_checkpointing true`) | needs per GPU at batch 1 | "
        + " | ".join(cards)
        + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in cards) + " |",
    ]
    for r in table:
        cells = [f"batch {r['largest_batch'][c]}" if r["largest_batch"][c] else "no" for c in cards]
        lines.append(
            f"| {r['family']} | {r['mode']} | {r['gpus']} | {r['flags']} | {r['needs_gib_batch1']:.1f} GiB | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON line per configuration")
    args = p.parse_args()
    table = rows()
    if args.json:
        for r in table:
            print(json.dumps(r))
    else:
        print(markdown(table))


if __name__ == "__main__":
    main()

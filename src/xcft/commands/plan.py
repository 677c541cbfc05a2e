"""``xcft plan``: the memory a training run needs per device, and what makes it fit, before it starts.

Takes exactly the options of ``xcft train`` (a YAML file and/or flags; ``--data_path`` optional: with
it the plan uses the data's real lengths and crop grids), plus the memory options (``--gpu_memory``,
``--gpus``) and ``--format text|json``. Nothing is loaded but ``config.json``, the weight files'
headers and, with ``--data_path``, the tokenizer and the data (no image is decoded).
"""

from __future__ import annotations

import json

from xcft.train.args import parse_train_args, print_help
from xcft.train.memory_plan import format_plan, plan_for_config


def _pop_format(argv: list[str]) -> tuple[list[str], str]:
    out, fmt, i = [], "text", 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--format" and i + 1 < len(argv):
            fmt, i = argv[i + 1], i + 2
            continue
        if tok.startswith("--format="):
            fmt, i = tok.split("=", 1)[1], i + 1
            continue
        out.append(tok)
        i += 1
    if fmt not in ("text", "json"):
        from xcft.errors import XcftError

        raise XcftError(f"--format {fmt}: choose text or json")
    return out, fmt


def plan_command(argv: list[str]) -> int:
    """Entry point of ``xcft plan``; returns the exit status (0: the plan was printed, fits or not)."""
    if any(a in ("-h", "--help") for a in argv):
        print(
            "usage: xcft plan [CONFIG.yaml] [xcft train options] [--gpu_memory 24GiB|A100-40GB|...] [--gpus N] "
            "[--format text|json]\n\nThe peak memory per device of the xcft train run these options describe, its "
            "breakdown, whether it fits and the changes that make it fit. The xcft train options:\n"
        )
        print_help()
        return 0
    argv, fmt = _pop_format(list(argv))
    import torch

    if not torch.cuda.is_available() and not any(a.split("=", 1)[0] == "--use_cpu" for a in argv):
        # planning a GPU run on a machine without one: TrainingArguments would reject --bf16 here
        argv = [*argv, "--use_cpu", "true"]
    run = plan_for_config(parse_train_args(argv, require_data=False))
    if fmt == "json":
        print(json.dumps(run.to_dict(), indent=2))
    else:
        print(format_plan(run))
    return 0


__all__ = ["plan_command"]

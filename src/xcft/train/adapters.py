"""LoRA adapter folders: find the base, load base + adapter with our model code.

``xcft.load_pretrained(adapter_dir)`` reaches :func:`load_adapter_pretrained` through the hook in
:func:`xcft.model.loading.load_adapter_folder`. This works for any base folder, including an
official checkpoint whose remote code would need transformers 4.33: the base is read by our own
classes and the peft adapter is applied on top.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from xcft.errors import XcftError

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a peft adapter folder (it has adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_path(adapter_dir: str | os.PathLike, base: Optional[str] = None) -> Path:
    """The base model folder of an adapter: ``base`` when given, else the one its adapter_config.json names.

    A relative name is tried against the current directory, then against the adapter folder.
    """
    adapter_dir = Path(adapter_dir)
    conf_path = adapter_dir / ADAPTER_CONFIG
    if not conf_path.is_file():
        raise XcftError(f"{adapter_dir} is not a LoRA adapter folder (no {ADAPTER_CONFIG}); pass the output of a --use_lora run")
    if base:
        chosen = Path(base)
    else:
        try:
            named = json.loads(conf_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except json.JSONDecodeError as exc:
            raise XcftError(f"{conf_path} is not valid JSON: {exc}") from None
        if not named:
            raise XcftError(f"{conf_path} names no base model (base_model_name_or_path); pass the base folder with --base")
        chosen = Path(named)
        if not chosen.is_absolute() and not chosen.is_dir() and (adapter_dir / chosen).is_dir():
            chosen = adapter_dir / chosen
    if not chosen.is_dir():
        raise XcftError(
            f"base model folder {chosen} of adapter {adapter_dir} does not exist; pass the base folder with --base"
        )
    return chosen.resolve()


def load_adapter_model(
    adapter_dir: str | os.PathLike,
    *,
    base: Optional[str] = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[Any, Any, Path]:
    """``(peft_model, tokenizer, base_path)``: the base read with our classes, the adapter on top (eval mode)."""
    from peft import PeftModel

    from xcft.model.loading import load_model, load_tokenizer

    adapter_dir = Path(adapter_dir)
    base_path = adapter_base_path(adapter_dir, base)
    model = load_model(base_path, dtype=dtype, device=device)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise XcftError(f"cannot apply the adapter {adapter_dir} to the base {base_path}: {exc}") from None
    peft_model.to(model.device)
    tok_dir = adapter_dir if (adapter_dir / "tokenizer.model").is_file() else base_path
    return peft_model.eval(), load_tokenizer(tok_dir), base_path


def load_adapter_pretrained(
    path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for an adapter folder: base + adapter merged into a plain XComposer2 model.

    Merging gives a model with ``chat``/``generate`` and the same outputs as base + adapter.
    """
    peft_model, tokenizer, base_path = load_adapter_model(path, dtype=dtype, device=device)
    logger.info("loaded LoRA adapter %s on base %s (merged for inference)", path, base_path)
    return peft_model.merge_and_unload().eval(), tokenizer

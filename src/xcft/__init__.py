"""xcft: finetuning toolkit for InternLM-XComposer2 vision-language models."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_pretrained"]


def load_pretrained(path: str, **kwargs: Any):
    """Load ``(model, tokenizer)`` from an official folder, an xcft output or a LoRA adapter folder.

    Imported lazily so that ``import xcft`` stays cheap for the CLI's ``--help``.
    """
    from xcft.model.loading import load_pretrained as _load

    return _load(path, **kwargs)

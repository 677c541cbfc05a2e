"""The native InternLM-XComposer2 model: configuration, modeling, loading, presets, eval.

Exports load lazily: the tokenizer and image files are used by the data pipeline and
``xcft check-data``, which should not pay for importing the modeling code and CLIP.
Importing :mod:`xcft.model.loading` registers :class:`XComposer2Config` /
:class:`XComposer2ForCausalLM` with transformers' Auto classes under the model type
``"xcomposer2"`` (see :func:`register_auto_classes`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "XComposer2Config": "xcft.model.configuration_xcomposer2",
    "XComposer2ForCausalLM": "xcft.model.modeling_xcomposer2",
    "XComposer2Model": "xcft.model.modeling_xcomposer2",
    "load_pretrained": "xcft.model.loading",
    "register_auto_classes": "xcft.model.loading",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'xcft.model' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)

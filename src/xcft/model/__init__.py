"""The native InternLM-XComposer2 model: configuration, modeling, loading, presets, eval.

Importing this package registers :class:`XComposer2Config` / :class:`XComposer2ForCausalLM`
with transformers' ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` under the model
type ``"xcomposer2"``, so our own output folders also load through the Auto classes without
``trust_remote_code`` inside an xcft process.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from xcft.model.configuration_xcomposer2 import XComposer2Config
from xcft.model.modeling_xcomposer2 import XComposer2ForCausalLM, XComposer2Model


def register_auto_classes() -> None:
    """Register our classes with the transformers Auto classes (idempotent)."""
    AutoConfig.register(XComposer2Config.model_type, XComposer2Config, exist_ok=True)
    AutoModel.register(XComposer2Config, XComposer2ForCausalLM, exist_ok=True)
    AutoModelForCausalLM.register(XComposer2Config, XComposer2ForCausalLM, exist_ok=True)


register_auto_classes()


def load_pretrained(*args, **kwargs):
    """See :func:`xcft.model.loading.load_pretrained`."""
    from xcft.model.loading import load_pretrained as _load

    return _load(*args, **kwargs)


__all__ = ["XComposer2Config", "XComposer2ForCausalLM", "XComposer2Model", "load_pretrained", "register_auto_classes"]

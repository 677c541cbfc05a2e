"""Model shapes for ``xcft init-model`` and for tests, the demo and benchmarks.

``tiny`` trains on a CPU in minutes (tests, demo); ``small`` is the benchmark shape;
``7b`` is the released InternLM-XComposer2-VL-7B shape (build it on the meta device or
straight on the GPU: ``build_model("7b", device="cuda", dtype=torch.bfloat16)``).
``tiny-2.5`` and ``7b-2.5`` are the InternLM-XComposer-2.5 family (HD crops, separators): the
tiny one with 224 px views (145 slots for a 1x1 crop grid) so it trains on a CPU, the 7b one the
released internlm-xcomposer2d5-7b shape (CLIP ViT-L/14 at 560 px, 16384 tokens).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from xcft.errors import XcftError
from xcft.model.configuration_xcomposer2 import CLIP_VIT_L_14_336, FAMILY_2_0, FAMILY_2_5, XComposer2Config
from xcft.model.loading import resolve_dtype
from xcft.model.modeling_xcomposer2 import XComposer2ForCausalLM
from xcft.model.template_xcomposer2 import LAYOUT_TRAINING

logger = logging.getLogger(__name__)

REAL_VOCAB_SIZE = 92544
#: Vocabulary of the tokenizer built on the spot (``xcft.data.spm_builder``) for tiny models.
SMALL_TOKENIZER_VOCAB = 1000

_TINY: dict[str, Any] = {
    "decoder": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=176,
        plora_r=16,
        plora_alpha=16.0,
    ),
    "vision": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        image_size=336,
    ),
    "projector_hidden_size": 64,
    "img_size": 224,
    "vocab_size": SMALL_TOKENIZER_VOCAB,
    "max_length": 2048,
    "dtype": torch.float32,
}
_7B: dict[str, Any] = {
    "decoder": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        plora_r=256,
        plora_alpha=256.0,
    ),
    "vision": dict(CLIP_VIT_L_14_336),
    "projector_hidden_size": 4096,
    "img_size": 490,
    "vocab_size": REAL_VOCAB_SIZE,
    "max_length": 4096,
    "dtype": torch.bfloat16,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    "small": {
        "decoder": dict(
            hidden_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=1408,
            plora_r=256,
            plora_alpha=256.0,
        ),
        "vision": dict(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            patch_size=14,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            image_size=336,
        ),
        "projector_hidden_size": 512,
        "img_size": 490,
        "vocab_size": REAL_VOCAB_SIZE,
        "max_length": 4096,
        "dtype": torch.float32,
    },
    "7b": _7B,
    # The 2.5 family: the same decoders, HD views (global view + crop grid) with separators.
    "tiny-2.5": {**_TINY, "vision": {**_TINY["vision"], "image_size": 224}, "max_length": 4096, "family": FAMILY_2_5},
    "7b-2.5": {
        **_7B,
        "vision": {**_7B["vision"], "image_size": 560},
        "img_size": 560,
        "max_length": 16384,
        "family": FAMILY_2_5,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "max_position_embeddings": 24576,
    },
}


def preset_config(preset: str, img_size: int | None = None, vocab_size: int | None = None, **overrides: Any) -> XComposer2Config:
    """The :class:`XComposer2Config` of a preset (``img_size``/``vocab_size`` default to the preset's)."""
    if preset not in PRESETS:
        raise XcftError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    kwargs: dict[str, Any] = dict(spec["decoder"])
    kwargs.update(
        vocab_size=int(vocab_size or spec["vocab_size"]),
        img_size=int(img_size or spec["img_size"]),
        max_length=spec["max_length"],
        projector_hidden_size=spec["projector_hidden_size"],
        vision_config=dict(spec["vision"]),
        rms_norm_eps=1e-5,
        max_position_embeddings=spec.get("max_position_embeddings", 32768),
        family=spec.get("family", FAMILY_2_0),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        architectures=["XComposer2ForCausalLM"],
        prompt_layout=LAYOUT_TRAINING,  # a new model learns only the layout xcft trains it on
    )
    if "rope_scaling" in spec:
        kwargs["rope_scaling"] = dict(spec["rope_scaling"])
    kwargs.update(overrides)
    return XComposer2Config(**kwargs)


def build_model(
    preset: str,
    img_size: int | None = None,
    vocab_size: int | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    **overrides: Any,
) -> XComposer2ForCausalLM:
    """A randomly initialised model of ``preset``, built directly on ``device`` (no disk).

    ``device="meta"`` gives a shape-only model; ``device="cuda"`` initialises on the GPU without
    a CPU copy. ``dtype`` defaults to the preset's (float32; bfloat16 for 7b).
    """
    config = preset_config(preset, img_size, vocab_size, **overrides)
    torch_dtype = resolve_dtype(dtype, default=PRESETS[preset]["dtype"])
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = XComposer2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = torch_dtype
    return model.eval()


__all__ = ["PRESETS", "build_model", "preset_config"]

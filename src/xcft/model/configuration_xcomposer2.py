"""Configuration of InternLM-XComposer2 and 2.5 (InternLM2 decoder + Partial LoRA + CLIP vision tower).

Self-contained: imports only the standard library, transformers, the image-processing file
(for the 2.5 token count) and the chat template (prompt layouts), because
``save_pretrained`` copies this file into model folders loaded with ``trust_remote_code``.

The official ``config.json`` has ``model_type: "internlm"`` and no vision section; this
class reads it as is. The vision tower's configuration is taken, in this order, from a
``vision_config`` object inside ``config.json``, from a ``vision_config.json`` next to it
(used by small test checkpoints), or from the default CLIP ViT-L/14-336 that the official
code always builds.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, ClassVar

from transformers import CLIPVisionConfig, PreTrainedConfig

from .image_processing_xcomposer2 import hd_tokens_for_grid
from .template_xcomposer2 import LAYOUT_OFFICIAL, PROMPT_LAYOUTS

logger = logging.getLogger(__name__)

#: ``architectures`` values that identify an XComposer2 checkpoint (official and ours).
XCOMPOSER2_ARCHITECTURES = ("InternLMXComposer2ForCausalLM", "XComposer2ForCausalLM")

#: Used when ``config.json`` has no ``max_length``. The official code silently falls back to
#: 20 tokens, which truncates every sample; 4096 is the official 2.0 finetuning default and
#: 16384 the value the official 2.5 finetune script passes.
DEFAULT_MAX_LENGTH = 4096
DEFAULT_MAX_LENGTH_2_5 = 16384

#: The vision tower the official code always builds: OpenAI CLIP ViT-L/14 at 336 px.
CLIP_VIT_L_14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "num_channels": 3,
    "attention_dropout": 0.0,
}

VISION_CONFIG_FILE = "vision_config.json"

#: Model families. 2.0: one fixed-size view per image, one token per patch. 2.5 (HD): a global
#: view plus a grid of crops per image, 2x2 patch merge and two learned separator tokens.
FAMILY_2_0 = "2.0"
FAMILY_2_5 = "2.5"
FAMILIES = (FAMILY_2_0, FAMILY_2_5)
#: View side in pixels when ``img_size`` is not given: the 2.0 VL release and the 2.5 release.
DEFAULT_IMG_SIZE = {FAMILY_2_0: 490, FAMILY_2_5: 560}


def _vision_dict(value: Any) -> dict[str, Any]:
    """A vision config as a plain dict without the keys a CLIPVisionConfig does not take."""
    if isinstance(value, PreTrainedConfig):
        value = value.to_dict()
    out = {k: v for k, v in dict(value).items() if not k.startswith("_")}
    for key in ("architectures", "transformers_version", "model_type"):
        out.pop(key, None)
    return out


class XComposer2Config(PreTrainedConfig):
    """Configuration of :class:`XComposer2ForCausalLM`.

    Decoder keys are the official InternLM2 ones. Extra keys the model reads:
    ``family`` (``"2.0"`` or ``"2.5"``; official 2.5 folders say ``model_type: internlm2`` like
    any InternLM2, so the loader decides it from the weights and records it here),
    ``img_size`` (side of one view in pixels; the CLIP position grid is ``img_size // patch_size``;
    0 or absent: 490 for 2.0, 560 for 2.5),
    ``max_length`` (token limit used by the data path), ``plora_r``/``plora_alpha``/
    ``plora_dropout`` (Partial LoRA; the loader overwrites ``plora_r`` with the rank found in
    the weights), ``vision_config`` (a CLIPVisionConfig), ``projector_hidden_size`` and
    ``prompt_layout`` (the chat prompt the model was trained for, ``model.chat``'s default:
    "official" when absent, as in official folders; "training" in models xcft creates from scratch).
    """

    model_type = "xcomposer2"
    # save_pretrained copies this file next to config.json and names it in auto_map (self-contained folders).
    _auto_class = "AutoConfig"
    sub_configs_defaults: ClassVar[dict[str, Any]] = {"vision_config": CLIPVisionConfig}
    # transformers < 5.2x reads ``sub_configs`` (newer ones derive it from the line above).
    sub_configs: ClassVar[dict[str, type]] = {"vision_config": CLIPVisionConfig}
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache"]

    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 2
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    bias: bool = False
    rope_parameters: dict | None = None
    family: str = FAMILY_2_0
    img_size: int = 0
    max_length: int | None = None
    plora_r: int = 256
    plora_alpha: float = 256.0
    plora_dropout: float = 0.05
    projector_hidden_size: int | None = None
    vision_config: dict | PreTrainedConfig | None = None
    prompt_layout: str = LAYOUT_OFFICIAL

    def __post_init__(self, **kwargs: Any) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {list(FAMILIES)}")
        if self.prompt_layout not in PROMPT_LAYOUTS:
            raise ValueError(f"prompt_layout {self.prompt_layout!r} is not one of {list(PROMPT_LAYOUTS)}")
        if not self.img_size:
            self.img_size = DEFAULT_IMG_SIZE[self.family]
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.projector_hidden_size is None:
            self.projector_hidden_size = self.hidden_size
        if self.max_length is None:
            self.max_length = DEFAULT_MAX_LENGTH_2_5 if self.family == FAMILY_2_5 else DEFAULT_MAX_LENGTH
            logger.info(
                "config has no max_length; using %d (the official code would silently truncate to 20 tokens)",
                self.max_length,
            )
        if self.vision_config is None:
            self.vision_config = dict(CLIP_VIT_L_14_336)
        if isinstance(self.vision_config, dict):
            # Built here, not left to the base class: older transformers keep a dict sub-config.
            self.vision_config = CLIPVisionConfig(**_vision_dict(self.vision_config))
        if self.rope_parameters is None and "rope_theta" not in kwargs:
            kwargs["rope_theta"] = 1e6
        super().__post_init__(**kwargs)
        # The tower is built for img_size: its position grid is img_size // patch_size per side.
        if self.img_size % self.vision_config.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of the patch size {self.vision_config.patch_size}")
        self.vision_config.image_size = self.img_size
        if self.hd and self.vision_grid % 2:
            raise ValueError(
                f"a 2.5 model merges 2x2 patches: img_size {self.img_size} / patch {self.vision_config.patch_size} "
                f"= {self.vision_grid} patches per side must be even"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def vision_grid(self) -> int:
        """Patches per image side at ``img_size``."""
        assert isinstance(self.vision_config, PreTrainedConfig), "__post_init__ builds the vision config"
        return self.img_size // self.vision_config.patch_size

    @property
    def hd(self) -> bool:
        """True for the 2.5 family: variable crop grids, 2x2 merge, separator tokens."""
        return self.family == FAMILY_2_5

    @property
    def image_tokens(self) -> int:
        """2.0: feature vectors (token slots) per image, the patch grid without the class token.

        A 2.5 image has a count that depends on its crop grid: use :meth:`hd_image_tokens`.
        """
        if self.hd:
            raise ValueError("a 2.5 (HD) image has no fixed token count; use config.hd_image_tokens(rows, cols)")
        return self.vision_grid**2

    @property
    def merged_grid(self) -> int:
        """2.5: tokens per view side after the 2x2 patch merge (20 at 560 px, patch 14)."""
        return self.vision_grid // 2

    @property
    def projector_input_size(self) -> int:
        """Width of the projector input: the tower width (2.0) or four merged patches (2.5)."""
        assert isinstance(self.vision_config, PreTrainedConfig), "__post_init__ builds the vision config"
        return self.vision_config.hidden_size * (4 if self.hd else 1)

    def hd_image_tokens(self, rows: int, cols: int) -> int:
        """2.5: token slots of an image with a ``rows x cols`` crop grid.

        Global view with a separator after each of its rows, one separator, then the stitched
        crops with a separator after each row: ``(rows*cols + 1) * g*g + 1 + (rows + 1) * g``.
        """
        return hd_tokens_for_grid(rows, cols, self.merged_grid)

    # ------------------------------------------------------------------ reading folders
    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Read ``config.json`` and normalise an official one (model_type, auto_map, vision section)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        folder = str(pretrained_model_name_or_path)
        return normalize_config_dict(config_dict, folder if os.path.isdir(folder) else None), kwargs


def normalize_config_dict(config_dict: dict[str, Any], folder: str | None) -> dict[str, Any]:
    """Turn an official or our own ``config.json`` dict into keys :class:`XComposer2Config` takes.

    The model is recognised by ``architectures`` (the official ``model_type`` is the generic
    ``"internlm"``). The official ``auto_map`` points at remote code that is never executed
    here, so it is dropped. When the dict has no ``vision_config``, ``vision_config.json``
    in ``folder`` supplies it; else the CLIP ViT-L/14-336 default applies.
    """
    config_dict = dict(config_dict)
    # A training-time switch that folders saved by earlier xcft versions may carry; it is not a model property.
    config_dict.pop("supervised_logits_only", None)
    archs = config_dict.get("architectures") or []
    if archs and not any(a in XCOMPOSER2_ARCHITECTURES for a in archs):
        raise ValueError(
            f"config.json names architectures {archs}, not an InternLM-XComposer2 model "
            f"(expected one of {list(XCOMPOSER2_ARCHITECTURES)})"
        )
    if config_dict.get("model_type") != XComposer2Config.model_type:
        config_dict["model_type"] = XComposer2Config.model_type
        auto_map = config_dict.get("auto_map") or {}
        if any(".InternLM" in str(v) for v in auto_map.values()):
            config_dict.pop("auto_map", None)
    if config_dict.get("vision_config") is None:
        path = os.path.join(folder, VISION_CONFIG_FILE) if folder else None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                config_dict["vision_config"] = _vision_dict(json.load(fh))
            logger.info("vision tower configuration read from %s", path)
        else:
            config_dict["vision_config"] = dict(CLIP_VIT_L_14_336)
    return config_dict


__all__ = [
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_MAX_LENGTH_2_5",
    "FAMILIES",
    "FAMILY_2_0",
    "FAMILY_2_5",
    "XCOMPOSER2_ARCHITECTURES",
    "XComposer2Config",
    "normalize_config_dict",
]

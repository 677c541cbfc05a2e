"""Model FLOPs of one training step, for MFU.

Convention (stated in every report): "model FLOPs", the PaLM-style count of the useful work,
independent of how it is executed:

* decoder linears: 6 × weights × real tokens (forward 2, backward 4), **whether or not the weights
  are trained** (LoRA skips the weight gradients of frozen weights, so it executes about a third
  less; MFU is then the usual model-FLOPs figure, not the executed share);
* Partial LoRA: 6 × its weights × image slots; peft LoRA adapters are not counted (small);
* causal attention: 6 × hidden × s² per layer and sample of length s (QKᵀ and AV, causal half);
  padding and attention across packed samples are not counted (they are not useful work);
* output head: 6 × hidden × vocab per supervised target (the loss needs nothing else);
* vision tower: forward only (2 ×) when frozen, 6 × when trained; projector 6 × per image slot
  when trained, 2 × when frozen. Activation-checkpointing recomputation is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StepCounts:
    """What one step computed (summed over its micro-batch)."""

    samples: int = 0
    real_tokens: int = 0  # image slots included, padding excluded
    computed_positions: int = 0  # rows × width (padding included)
    image_slots: int = 0
    images: int = 0
    targets: int = 0  # supervised targets (labels[:, 1:] != -100)
    sum_sq_segments: int = 0  # Σ over samples of length²

    def add(self, other: StepCounts) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


def _vision_dims(config: Any) -> tuple[int, int, int, int]:
    vc = config.vision_config
    get = (lambda k: vc[k]) if isinstance(vc, dict) else (lambda k: getattr(vc, k))
    return int(get("hidden_size")), int(get("intermediate_size")), int(get("num_hidden_layers")), int(get("patch_size"))


def step_flops(config: Any, c: StepCounts, *, vit_trained: bool = False, projector_trained: bool = True) -> float:
    """Model FLOPs of a training step with counts ``c`` (see the module docstring)."""
    h = int(config.hidden_size)
    inter = int(config.intermediate_size)
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv = int(config.num_key_value_heads)
    head_dim = h // heads
    qkv_out = (heads + 2 * kv) * head_dim
    r = int(getattr(config, "plora_r", 0) or 0)
    vocab = int(config.vocab_size)
    dense = layers * (h * qkv_out + h * h + 3 * h * inter)
    plora = layers * r * ((h + qkv_out) + 2 * h + 2 * (h + inter) + (inter + h))
    flops = 6.0 * dense * c.real_tokens
    flops += 6.0 * plora * c.image_slots
    flops += 6.0 * layers * h * c.sum_sq_segments
    flops += 6.0 * h * vocab * c.targets
    if c.images:
        hv, iv, lv, patch = _vision_dims(config)
        img = int(config.img_size)
        patches = (img // patch) ** 2 + 1
        vit_weights = lv * (4 * hv * hv + 2 * hv * iv)
        vit_fwd = 2.0 * vit_weights * patches + lv * 4.0 * hv * patches * patches
        flops += (3.0 if vit_trained else 1.0) * vit_fwd * c.images
        proj = hv * int(config.projector_hidden_size) + int(config.projector_hidden_size) * h
        flops += (6.0 if projector_trained else 2.0) * proj * c.image_slots
    return flops


#: Dense peak FLOP/s by GPU name fragment: (bf16/fp16, tf32).
GPU_PEAKS = {
    "H200": (989.4e12, 494.7e12),
    "H100": (989.4e12, 494.7e12),
    "H800": (989.4e12, 494.7e12),
    "A100": (312e12, 156e12),
    "A800": (312e12, 156e12),
    "L40S": (362e12, 183e12),
}


def gpu_peak_flops(name: str, half: bool) -> float | None:
    """Dense peak of a known GPU (bf16/fp16 when ``half``, else TF32); None for an unknown card."""
    for key, (bf16, tf32) in GPU_PEAKS.items():
        if key.lower() in name.lower():
            return bf16 if half else tf32
    return None


__all__ = ["StepCounts", "gpu_peak_flops", "step_flops"]

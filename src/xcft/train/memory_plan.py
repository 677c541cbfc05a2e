"""The memory plan: the peak memory of a training run per device, before any weight is loaded.

The plan works from the model's shape (``config.json`` or a preset), the ``xcft train`` options and,
when ``--data_path`` is given, the data's real lengths and crop grids (read without decoding an
image). It counts the tensors that are alive at each of the three moments where a training step
can peak, with the dtypes the run uses:

* **forward end** (in the chunked output head): weights, optimizer state, every activation saved
  for the backward, the head's float32 logits chunk and its gradient buffers;
* **backward**: with checkpointing, one decoder layer's recomputed activations plus its gradients
  in flight, at the top (all checkpoints alive) and at the bottom (almost every weight gradient
  alive) of the stack; without it, the last layer's backward on top of all saved activations;
* **optimizer step**: weights, gradients and optimizer state together.

The saved activations are counted tensor by tensor, as autograd keeps them for this model (see
:func:`_layer_saved`); the same formulas with the CPU dtypes are checked against a live-tensor
measurement (:mod:`xcft.train.memory_probe`) in the tests, and with the GPU dtypes (bf16 autocast,
4-bit weights) they give the GPU estimate, plus the CUDA context and allocator overhead.

Everything below :func:`plan_for_config` is pure arithmetic on small dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xcft.errors import XcftError
from xcft.model.image_processing_xcomposer2 import HD_NUM_TRAIN

logger = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2

#: Memory of GPUs people train on, by the names they type (the card's total memory).
GPU_MEMORY_GIB: dict[str, float] = {
    "H200": 140.4,
    "H100": 79.6,
    "H100-80GB": 79.6,
    "H800": 79.6,
    "A100": 80.0,
    "A100-80GB": 80.0,
    "A100-40GB": 40.0,
    "A800": 80.0,
    "L40S": 45.0,
    "L40": 45.0,
    "A6000": 48.0,
    "A40": 45.0,
    "A10": 22.5,
    "A10G": 22.5,
    "L4": 22.5,
    "V100": 32.0,
    "V100-32GB": 32.0,
    "V100-16GB": 16.0,
    "T4": 15.0,
    "3090": 24.0,
    "RTX3090": 24.0,
    "4090": 24.0,
    "RTX4090": 24.0,
    "5090": 32.0,
    "RTX5090": 32.0,
}

#: Per process on a GPU: the CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers (not tensors).
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
#: Allocator overhead on a GPU: memory the caching allocator holds beyond the live tensors
#: (block rounding and fragmentation; small with expandable segments, which xcft turns on).
ALLOCATOR_SLACK = 0.05
#: On a CPU: the Python process, torch and the libraries, before any tensor.
HOST_RUNTIME_BYTES = int(1.0 * GIB)
#: The 2.5 crop budget of training when --hd_num is not given (the official default).
DEFAULT_HD_NUM = HD_NUM_TRAIN


def _head_chunk_rows() -> int:
    """Rows per chunk of the training head (the modeling code's ``OutputHead.chunk_rows``)."""
    from xcft.model.modeling_xcomposer2 import OutputHead

    return int(OutputHead.chunk_rows)


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_gpu_memory(text: str) -> int:
    """Bytes of ``24GiB``, ``80GB``, ``40000MiB``, ``24`` (GiB) or a GPU name such as ``A100-40GB``."""
    raw = str(text).strip()
    key = raw.upper().replace(" ", "").replace("_", "-")
    key = re.sub(r"^(NVIDIA-?|GEFORCE-?)", "", key)
    for name, gib in GPU_MEMORY_GIB.items():
        if key == name.upper() or key == name.upper().replace("-", ""):
            return int(gib * GIB)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(GIB|GB|G|MIB|MB|M|TIB|TB)?", key)
    if not m:
        names = ", ".join(sorted(GPU_MEMORY_GIB))
        raise XcftError(f"--gpu_memory {raw!r}: give a size such as 24GiB or 80GB, or one of the GPU names {names}")
    value, unit = float(m.group(1)), (m.group(2) or "GIB")
    scale = {"GIB": GIB, "G": GIB, "GB": 1e9, "MIB": MIB, "M": MIB, "MB": 1e6, "TIB": 1024 * GIB, "TB": 1e12}[unit]
    return int(value * scale)


# ============================================================================ inputs


@dataclass(frozen=True)
class ModelShape:
    """The sizes the plan needs, from ``config.json`` or a preset (no weights)."""

    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    plora_r: int
    plora_dropout: float
    img_size: int
    patch: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    projector_hidden: int
    max_length: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From an :class:`~xcft.model.configuration_xcomposer2.XComposer2Config`."""
        v = config.vision_config
        return cls(
            family=str(config.family),
            hidden=int(config.hidden_size),
            layers=int(config.num_hidden_layers),
            heads=int(config.num_attention_heads),
            kv_heads=int(config.num_key_value_heads),
            intermediate=int(config.intermediate_size),
            vocab=int(config.vocab_size),
            plora_r=int(config.plora_r),
            plora_dropout=float(config.plora_dropout),
            img_size=int(config.img_size),
            patch=int(v.patch_size),
            vision_hidden=int(v.hidden_size),
            vision_layers=int(v.num_hidden_layers),
            vision_heads=int(v.num_attention_heads),
            vision_intermediate=int(v.intermediate_size),
            projector_hidden=int(config.projector_hidden_size or config.hidden_size),
            max_length=int(config.max_length),
        )

    # ---------------------------------------------------------------- derived sizes
    @property
    def hd(self) -> bool:
        return self.family == "2.5"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def qkv_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    @property
    def grid(self) -> int:
        return self.img_size // self.patch

    @property
    def projector_input(self) -> int:
        return self.vision_hidden * (4 if self.hd else 1)

    def image_tokens(self, rows: int = 1, cols: int = 1) -> int:
        """Slots of one image: the patch grid (2.0), or the 2.5 count of a ``rows x cols`` crop grid."""
        if not self.hd:
            return self.grid**2
        g = self.grid // 2
        return (rows * cols + 1) * g * g + 1 + (rows + 1) * g

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of the five decoder linears of one layer."""
        h, i = self.hidden, self.intermediate
        return {
            "attention.wqkv": (h, self.qkv_width),
            "attention.wo": (self.heads * self.head_dim, h),
            "feed_forward.w1": (h, i),
            "feed_forward.w3": (h, i),
            "feed_forward.w2": (i, h),
        }

    # ---------------------------------------------------------------- parameter counts
    def base_linear_params(self) -> int:
        """Weights of the five decoder linears, all layers (what --bits quantizes)."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    def plora_params(self) -> int:
        return self.layers * sum(self.plora_r * (a + b) for a, b in self.linears().values())

    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        return self.vocab * self.hidden

    def vision_params(self) -> int:
        """The CLIP tower (embeddings, encoder, both layer norms)."""
        d, f, p = self.vision_hidden, self.vision_intermediate, self.patch
        layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
        return 3 * p * p * d + d + (self.grid**2 + 1) * d + 2 * d + self.vision_layers * layer + 2 * d

    def projector_params(self) -> int:
        pin, ph = self.projector_input, self.projector_hidden
        seps = 2 * pin if self.hd else 0
        return pin * ph + ph + ph * self.hidden + self.hidden + seps

    def total_params(self) -> int:
        return (
            self.base_linear_params()
            + self.plora_params()
            + self.norm_params()
            + self.embedding_params()
            + self.head_params()
            + self.vision_params()
            + self.projector_params()
        )


@dataclass(frozen=True)
class PlanSettings:
    """The options of a run that change its memory (taken from ``xcft train``'s options)."""

    use_lora: bool = False
    lora_r: int = 64
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    fix_vit: bool = True
    fix_sampler: bool = False
    model_dtype: str = "float32"
    bits: int = 16
    double_quant: bool = True
    amp: str | None = None  # "bf16" / "fp16" (mixed precision) or None
    checkpointing: bool = False
    optim: str = "adamw_torch_fused"
    zero_stage: int = 0  # 0: no DeepSpeed
    offload_optimizer: bool = False
    offload_params: bool = False
    gpus: int = 1
    batch: int = 1  # rows per device and step
    packing: bool = False
    max_length: int | None = None
    hd_num: int | None = None
    device: str = "cuda"  # "cuda" or "cpu"
    attention_mask: bool = False  # rows carry a mask (packing, or padded rows of different lengths)
    flash_attention: bool = False  # flash_attention_2 (no mask tensor; xcft train uses SDPA)


@dataclass(frozen=True)
class SampleShape:
    """The largest step's shape per row: positions, image slots, views (images or crops), supervised targets."""

    positions: int
    image_slots: int
    views: int
    targets: int
    source: str = "worst case from the options"


@dataclass
class Part:
    name: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    """A plan: the peak and what makes it up; ``required_bytes`` adds the device's overhead."""

    settings: PlanSettings
    sample: SampleShape
    parts: list[Part]
    peak_bytes: int  # live tensors at the peak (what torch.cuda.max_memory_allocated measures)
    phase: str  # where the peak is: forward end, backward or optimizer step
    phases: dict[str, int]
    overhead_bytes: int
    params: dict[str, int] = field(default_factory=dict)

    @property
    def required_bytes(self) -> int:
        return self.peak_bytes + self.overhead_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "required_bytes": self.required_bytes,
            "peak_gib": round(self.peak_bytes / GIB, 3),
            "required_gib": round(self.required_bytes / GIB, 3),
            "phase": self.phase,
            "phases_bytes": self.phases,
            "overhead_bytes": self.overhead_bytes,
            "parts": [dataclasses.asdict(p) for p in self.parts],
            "params": self.params,
            "sample": dataclasses.asdict(self.sample),
            "settings": dataclasses.asdict(self.settings),
        }


# ============================================================================ sample shape


def worst_hd_grid(hd_num: int, view_size: int, fits: Any = None) -> tuple[int, int] | None:
    """The 2.5 crop grid (rows, cols) an image can get at ``hd_num`` with the most crops, then the most
    rows (so the most slots), among those ``fits(grid)`` accepts; None when none does.

    The grids are those the training transform really produces (:func:`hd_crop_grid` over every aspect ratio).
    """
    from xcft.model.image_processing_xcomposer2 import hd_crop_grid

    grids = {
        hd_crop_grid(view_size * cols, view_size * rows, hd_num, view_size=view_size)
        for rows in range(1, hd_num + 1)
        for cols in range(1, hd_num // rows + 1)
    }
    allowed = [g for g in grids if fits is None or fits(g)]
    return max(allowed, key=lambda g: (g[0] * g[1], g[0])) if allowed else None


def default_sample(shape: ModelShape, settings: PlanSettings) -> SampleShape:
    """Without data: every row is ``max_length`` positions holding one image (the largest crop grid for
    2.5) and every other position is a supervised target."""
    length = int(settings.max_length or shape.max_length)
    room = length - 8
    slots, views, note = 0, 0, "no image fits"
    if shape.hd:
        hd_num = int(settings.hd_num or DEFAULT_HD_NUM)
        grid = worst_hd_grid(hd_num, shape.img_size, lambda g: shape.image_tokens(*g) <= room)
        if grid is not None:
            slots, views = shape.image_tokens(*grid), 1 + grid[0] * grid[1]
            note = f"one image of {grid[0]}x{grid[1]} crops"
    elif shape.image_tokens() <= room:
        slots, views, note = shape.image_tokens(), 1, "one image"
    return SampleShape(length, slots, views, max(1, length - slots - 1), f"worst case: {length} positions, {note}")


def sample_from_lengths(
    lengths: list[int], slots: list[int], views: list[int], settings: PlanSettings, max_length: int
) -> SampleShape:
    """The largest row of real data (per-sample token counts, image slots and views)."""
    if not lengths:
        raise XcftError("the data has no usable sample to plan for")
    if settings.packing:
        density = max(s / max(n, 1) for s, n in zip(slots, lengths))
        view_density = max(v / max(n, 1) for v, n in zip(views, lengths))
        s = min(max_length, math.ceil(density * max_length))
        return SampleShape(
            max_length,
            s,
            math.ceil(view_density * max_length),
            max(1, max_length - s - 1),
            f"packed rows of {max_length} positions, the data's densest images",
        )
    n = max(lengths)
    s = max(slots)
    return SampleShape(n, s, max(views), max(1, n - min(s, n) - 1), f"the data's longest sample ({n} positions)")


# ============================================================================ the plan


def _optimizer_bytes_per_param(optim: str) -> float:
    name = optim.lower()
    if "8bit" in name:
        return 2.0 if "lion" not in name else 1.0
    if "lion" in name or ("sgd" in name and "momentum" in name):
        return 4.0
    if "sgd" in name:
        return 0.0
    if "adafactor" in name:
        return 0.1
    return 8.0  # AdamW / Adam: two float32 moments


def _layer_saved(sh: ModelShape, st: PlanSettings, t: int, m: int, d: _Dtypes, mask_elems: int = 0) -> int:
    """Bytes autograd keeps for one decoder layer's backward: ``t`` positions, ``m`` of them image slots.

    Counted as the modeling code runs: RMSNorm in float32 (inputs, 1/rms, the normalised input when
    the norm weight trains), fused qkv, rotated q and k, the attention output and its log-sum-exp,
    SwiGLU's three intermediates, Partial LoRA on the image rows (dropout mask and output, the
    low-rank activation) and peft LoRA on the target linears (dropout mask and output, rank activation).
    """
    full = not st.use_lora
    h, i, o = sh.hidden, sh.intermediate, sh.heads * sh.head_dim
    r, c, mask = d.residual, d.compute, d.mask
    lin_in = d.saved_input  # what a trainable linear keeps of its input
    total = 2 * t * h * r  # the two norms' inputs (residual stream)
    for _ in range(2):  # attention_norm, ffn_norm
        total += t * 4  # 1/rms in float32
        if r != 4:
            total += t * h * 4  # the float32 copy of a half-precision input
        if full:
            total += t * h * r + t * h * lin_in  # normalised input (norm weight grad) + the input the base linears keep
    total += t * sh.qkv_width * c  # qkv (v is a view of it)
    total += t * o * c + t * sh.kv_heads * sh.head_dim * c  # rotated q and k
    total += t * o * c + sh.heads * t * 4  # attention output + log-sum-exp
    if st.attention_mask and not st.flash_attention:
        # SDPA with a mask: the mask as an additive bias in the matmul dtype, and k / v repeated per query head
        total += mask_elems * c
        if sh.kv_heads < sh.heads:
            total += 2 * t * o * c - t * sh.kv_heads * sh.head_dim * c
    total += 3 * t * i * c  # w1 out, w3 out, silu(w1 out)
    if full:
        total += t * i * lin_in  # silu * w3: the input w2 keeps
    for name, (fan_in, _fan_out) in sh.linears().items():
        if m:  # Partial LoRA on the image rows
            if sh.plora_dropout > 0:
                total += m * fan_in * mask
                if full:
                    total += m * fan_in * lin_in
            elif full:
                total += m * fan_in * lin_in
            if full:
                total += m * sh.plora_r * c
        if st.use_lora and name in st.lora_targets:
            if st.lora_dropout > 0:
                total += t * fan_in * mask + t * fan_in * lin_in
            elif name in ("attention.wqkv", "feed_forward.w2"):  # inputs nothing else keeps
                total += t * fan_in * lin_in
            total += t * st.lora_r * c
    if st.use_lora and st.lora_dropout == 0 and any(n in st.lora_targets for n in ("feed_forward.w1", "feed_forward.w3")):
        total += t * h * lin_in  # the ffn norm's output, kept for lora_A
    return total


def _layer_backward_transient(sh: ModelShape, st: PlanSettings, t: int, d: _Dtypes) -> int:
    """Gradients in flight inside one layer's backward (SwiGLU's are the largest), plus a 4-bit linear's
    dequantized weight."""
    out = t * sh.hidden * d.residual + 2 * t * sh.intermediate * d.compute
    if st.bits in (4, 8):
        out += max(a * b for a, b in sh.linears().values()) * d.compute
    return out


@dataclass(frozen=True)
class _Dtypes:
    frozen: float  # bytes per frozen (unquantized) weight
    compute: int  # matmul outputs
    residual: int  # the residual stream
    saved_input: int  # the input a trainable linear keeps (the autocast copy under mixed precision)
    mask: int  # a dropout mask element


def _dtypes(sh: ModelShape, st: PlanSettings) -> _Dtypes:
    load = _DTYPE_BYTES.get(st.model_dtype, 4)
    half = 2 if st.amp else None
    frozen = float(half or load) if st.bits in (4, 8) else float(load)
    compute = half or (int(frozen) if st.use_lora else 4)
    emb = 4 if not st.use_lora else int(frozen)
    residual = max(emb, compute)
    saved_input = compute if st.amp else residual
    mask = 1 if st.device == "cuda" else residual
    return _Dtypes(frozen, compute, residual, saved_input, mask)


def _quantized_bytes(params: int, rows: int, st: PlanSettings) -> float:
    """Storage of the quantized decoder linears: bitsandbytes' bits per weight (scales included), 8 bit
    with a float32 scale per output row."""
    from xcft.model.quantization import bits_per_weight

    return params * bits_per_weight(st.bits, st.double_quant) / 8 + (rows * 4 if st.bits == 8 else 0)


def compute_plan(sh: ModelShape, st: PlanSettings, sample: SampleShape | None = None) -> MemoryPlan:
    """The memory plan of one configuration (pure arithmetic)."""
    sample = sample or default_sample(sh, st)
    d = _dtypes(sh, st)
    full = not st.use_lora
    b = max(1, st.batch)
    t, m, n_targets, views = b * sample.positions, b * sample.image_slots, b * sample.targets, b * sample.views
    h, v = sh.hidden, sh.vocab
    world = max(1, st.gpus)

    # ---- parameters: trainable (float32) and frozen
    vit, proj = sh.vision_params(), sh.projector_params()
    decoder = sh.base_linear_params() + sh.plora_params() + sh.norm_params()
    if full:
        trainable = decoder + sh.embedding_params() + sh.head_params()
        trainable += (0 if st.fix_vit else vit) + (0 if st.fix_sampler else proj)
        frozen_plain = (vit if st.fix_vit else 0) + (proj if st.fix_sampler else 0)
        quantized = 0
        copies = 0
    else:
        lora = sh.layers * sum(st.lora_r * (a + bb) for name, (a, bb) in sh.linears().items() if name in st.lora_targets)
        copies = (0 if st.fix_vit else vit) + (0 if st.fix_sampler else proj - (2 * sh.projector_input if sh.hd else 0))
        trainable = lora + copies  # peft's modules_to_save: trained copies of the tower / projector
        quantized = sh.base_linear_params() if st.bits in (4, 8) else 0
        frozen_plain = sh.total_params() - quantized
    rows_quant = sh.layers * sum(bb for _, bb in sh.linears().values())
    if st.amp and st.zero_stage:  # DeepSpeed runs the module in the half dtype, master weights apart
        weight_bytes = (trainable + frozen_plain) * 2 + (_quantized_bytes(quantized, rows_quant, st) if quantized else 0)
    else:
        weight_bytes = trainable * 4 + frozen_plain * d.frozen + (_quantized_bytes(quantized, rows_quant, st) if quantized else 0)
    opt_per_param = _optimizer_bytes_per_param(st.optim)
    grad_bytes_per = 2 if (st.amp and st.zero_stage) else 4
    master = 4 * trainable if (st.amp and st.zero_stage) else 0
    states = opt_per_param * trainable + master
    grads: float = grad_bytes_per * trainable
    zero_buffers = 0
    if st.zero_stage:
        if st.zero_stage >= 1:
            states /= world
        if st.zero_stage >= 2:
            grads /= world
            zero_buffers += int(2 * 2e8 * grad_bytes_per)  # reduce buckets (configs: reduce_bucket_size 2e8)
        if st.zero_stage >= 3:
            largest = max(sh.embedding_params(), max(a * bb for a, bb in sh.linears().values()) * 5)
            weight_bytes = weight_bytes / world
            zero_buffers += int(2 * (2e8 + largest) * 2)  # gathered layers in flight (prefetch bucket)
        if st.offload_optimizer:
            states = 0
        if st.offload_params and st.zero_stage >= 3:
            weight_bytes = 0
    elif world > 1:
        zero_buffers += int(grads)  # DDP's gradient buckets

    # ---- the batch: during a step the data loader holds the next one (fetched ahead); while it
    # collates that one, the previous step's batch is still referenced and the items exist too
    one_batch = t * (8 + 8 + 8 + 1) + views * 3 * sh.img_size**2 * 4
    batch_bytes = 2 * one_batch

    # ---- activations
    mask_elems = b * sample.positions**2 if st.attention_mask and not st.flash_attention else 0
    layer = _layer_saved(sh, st, t, m, d, mask_elems)
    residual = t * h * d.residual
    proj_saved = 0 if st.fix_sampler else m * (sh.projector_input * d.saved_input + 2 * sh.projector_hidden * d.compute)
    vit_saved = 0
    if not st.fix_vit:  # trained tower: its activations per view (about 12 tensors of width d, 4 of the MLP)
        vt = views * (sh.grid**2 + 1)
        vit_saved = sh.vision_layers * vt * (12 * sh.vision_hidden + 4 * sh.vision_intermediate) * d.compute
    rope = 2 * t * sh.head_dim * d.residual  # cos and sin of every position, kept by every layer
    around = proj_saved + vit_saved + rope  # alive from the forward until the end of the backward
    final_norm = residual + t * 4 + residual * (2 if full else 1)  # its input, 1/rms, normalised input, output
    head_inputs = 2 * n_targets * h * d.residual  # the supervised rows and their gradient
    head_weight_grad = 4 * v * h if full else 0
    chunk = min(n_targets, _head_chunk_rows())
    head_chunk = chunk * v * (4 + (d.compute if d.compute != 4 else 0)) + chunk * h * d.compute
    head_weight_bytes = 4 if full else d.frozen
    if d.compute != head_weight_bytes:
        head_chunk += v * h * d.compute  # the head weight cast to the matmul dtype, for the whole loop
    if full and d.compute != 4:
        head_chunk += v * h * (d.compute + 4)  # a chunk's weight gradient in the matmul dtype and as float32

    # checkpointing keeps each layer's input (the first one is the embeddings); without it each layer's saved set
    layers_saved = sh.layers * (residual if st.checkpointing else layer)
    trans = _layer_backward_transient(sh, st, t, d)
    layer_grads = (grads - (4 * 2 * v * h if full else 0)) / max(1, sh.layers)
    recomputed = layer - residual  # its input is the checkpoint
    # Mixed precision on float32 decoder weights: autocast casts each matmul weight to the half dtype
    # and the matmul keeps the copy for its backward. Trained weights' copies are also cached until
    # the forward ends (checkpointing or not); frozen ones live only while a layer's graph does.
    linear_weights = sh.base_linear_params() + sh.plora_params()
    casts_all = casts_forward = 0.0
    if st.amp and not st.zero_stage and (full or (d.frozen == 4 and st.bits == 16)):
        casts_all = 2 * linear_weights
        casts_forward = casts_all if (full or not st.checkpointing) else 0
    casts_layer = casts_all / max(1, sh.layers)
    saved_casts = 0 if st.checkpointing else casts_all
    common = {"weights": weight_bytes, "optimizer state": states, "communication buffers": zero_buffers}
    phases: dict[str, dict[str, float]] = {
        "forward end": {
            **common,
            "batch": batch_bytes,
            "activations": layers_saved + final_norm + around + casts_forward,
            "output head": head_inputs + head_weight_grad + head_chunk,
        },
        # the head's backward only scales what its forward computed: a scaled copy of each gradient
        "head backward": {
            **common,
            "batch": batch_bytes,
            "activations": layers_saved + final_norm + around + saved_casts,
            "output head": n_targets * h * d.residual * 2,
            "gradients": 2 * head_weight_grad,
        },
        "optimizer step": {**common, "batch": batch_bytes, "gradients": grads},
        "data loading": {**common, "batch": 4 * one_batch},
    }
    if st.checkpointing:
        phases["backward, top layer"] = {
            **common,
            "batch": batch_bytes,
            "activations": layers_saved + around,
            "backward working set": recomputed + trans + casts_layer,
            "gradients": head_weight_grad,
        }
        phases["backward, first layer"] = {
            **common,
            "batch": batch_bytes,
            "activations": residual + around,
            "backward working set": recomputed + trans + casts_layer,
            "gradients": grads - layer_grads - (4 * v * h if full else 0),
        }
    else:
        phases["backward"] = {
            **common,
            "batch": batch_bytes,
            "activations": layers_saved + around + saved_casts,
            "backward working set": trans,
            "gradients": head_weight_grad + layer_grads,
        }
    totals = {k: int(sum(v.values())) for k, v in phases.items()}
    phase = max(totals, key=lambda k: totals[k])
    peak = totals[phase]
    notes = {
        "weights": _weights_note(st, d, quantized, trainable, frozen_plain),
        "optimizer state": _states_note(st, trainable, opt_per_param, world),
        "gradients": f"of {trainable:,} trainable parameters, {grad_bytes_per} bytes each"
        + (f", ZeRO-{st.zero_stage} shard" if st.zero_stage >= 2 else ""),
        "activations": (
            f"{'each layer input (checkpointing)' if st.checkpointing else f'{sh.layers} layers x {layer / MIB:.1f} MiB'}"
            f", {t:,} positions ({m:,} image slots)"
        ),
        "backward working set": (
            "one decoder layer recomputed + its gradients in flight"
            if st.checkpointing
            else "one decoder layer's gradients in flight"
        ),
        "output head": f"{n_targets:,} targets: rows + their gradient, one {chunk}-row float32 logits chunk",
        "batch": f"{views} views of {sh.img_size} px; the next batch is fetched during a step",
        "communication buffers": "ZeRO buckets / gathered layers" if st.zero_stage else "DDP gradient buckets",
    }
    parts = [Part(name, int(value), notes.get(name, "")) for name, value in phases[phase].items() if value]
    overhead = int(peak * ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES if st.device == "cuda" else HOST_RUNTIME_BYTES
    params = {"total": sh.total_params(), "trainable": int(trainable), "quantized": int(quantized)}
    return MemoryPlan(st, sample, parts, int(peak), phase, totals, overhead, params)


def _weights_note(st: PlanSettings, d: _Dtypes, quantized: int, trainable: int, frozen: int) -> str:
    bits = f"{quantized:,} in {st.bits} bit, " if quantized else ""
    return f"{bits}{frozen:,} frozen at {d.frozen:g} bytes, {trainable:,} trainable in float32"


def _states_note(st: PlanSettings, trainable: int, per: float, world: int) -> str:
    where = f", ZeRO-{st.zero_stage} over {world}" if st.zero_stage else ""
    off = ", offloaded to the CPU" if st.offload_optimizer else ""
    return f"{st.optim}: {per:g} bytes per trainable parameter{where}{off}"


# ============================================================================ verdict and fixes


@dataclass
class Alternative:
    change: str  # the flags to add
    plan: MemoryPlan
    fits: bool


def alternatives(sh: ModelShape, st: PlanSettings, sample: SampleShape | None, budget: int) -> list[Alternative]:
    """The single changes (and one pair) that lower the peak, each planned anew.

    Those that fit come first, in order of what they cost the run (speed, then what is trained, then
    hardware); then the others, lowest requirement first.
    """
    cands: list[tuple[str, PlanSettings, SampleShape | None]] = []
    rep = dataclasses.replace
    if not st.checkpointing:
        cands.append(("--gradient_checkpointing true", rep(st, checkpointing=True), sample))
    if st.use_lora and st.bits == 16 and st.model_dtype == "float32":
        cands.append(("--model_dtype bfloat16", rep(st, model_dtype="bfloat16"), sample))
    if st.batch > 1:
        fitting = largest_batch(sh, rep(st, batch=1), sample, budget, limit=st.batch - 1) or 1
        cands.append(
            (
                f"--per_device_train_batch_size {fitting} --gradient_accumulation_steps {math.ceil(st.batch / fitting)}",
                rep(st, batch=fitting),
                sample,
            )
        )
    if st.bits == 16 and st.zero_stage < 3:
        flags = "--bits 4" if st.use_lora else "--use_lora true --bits 4"
        cands.append((flags, rep(st, use_lora=True, bits=4), sample))
        if not st.checkpointing:
            cands.append((flags + " --gradient_checkpointing true", rep(st, use_lora=True, bits=4, checkpointing=True), sample))
    if sh.hd and (st.hd_num or DEFAULT_HD_NUM) > 9 and (sample is None or "worst case" in sample.source):
        cands.append(("--hd_num 9", rep(st, hd_num=9), None))
    length = int(st.max_length or sh.max_length)
    if length >= 2048:
        cands.append((f"--max_length {length // 2}", rep(st, max_length=length // 2), None))
    if not st.use_lora:
        cands.append(("--use_lora true --model_dtype bfloat16", rep(st, use_lora=True, model_dtype="bfloat16"), sample))
    if st.zero_stage < 3 and st.bits == 16:
        n = st.gpus if st.gpus > 1 else 8
        cands.append(
            (f"--deepspeed configs/ds_zero3.json on {n} GPUs", rep(st, zero_stage=3, gpus=n, amp=st.amp or "bf16"), sample)
        )
        cands.append(
            (
                f"--deepspeed configs/ds_zero3_offload.json on {n} GPUs (CPU offload)",
                rep(st, zero_stage=3, gpus=n, offload_optimizer=True, offload_params=True, amp=st.amp or "bf16"),
                sample,
            )
        )
    out = []
    for rank, (change, alt, smp) in enumerate(cands):
        p = compute_plan(sh, alt, smp)
        out.append((rank, Alternative(change, p, p.required_bytes <= budget)))
    out.sort(key=lambda ra: (0, ra[0]) if ra[1].fits else (1, ra[1].plan.required_bytes))
    return [a for _, a in out]


def largest_batch(sh: ModelShape, st: PlanSettings, sample: SampleShape | None, budget: int, limit: int = 64) -> int:
    """The largest per-device batch (rows) whose plan fits ``budget``; 0 when batch 1 does not fit."""
    best = 0
    for b in (1, 2, 4, 8, 16, 32, 64):
        if b > limit:
            break
        if compute_plan(sh, dataclasses.replace(st, batch=b), sample).required_bytes <= budget:
            best = b
        else:
            break
    return best


# ============================================================================ from xcft train's options


def settings_from_config(cfg: Any, shape: ModelShape, *, device: str, gpus: int) -> PlanSettings:
    """:class:`PlanSettings` of a parsed :class:`~xcft.train.args.TrainConfig`."""
    args = cfg.training
    stage, off_opt, off_par = 0, False, False
    ds = getattr(args, "deepspeed", None)
    if ds:
        conf = ds if isinstance(ds, dict) else _read_json(ds)
        zero = conf.get("zero_optimization", {}) or {}
        stage = int(zero.get("stage", 0) or 0)
        off_opt = str((zero.get("offload_optimizer") or {}).get("device", "none")) not in ("none", "None")
        off_par = str((zero.get("offload_param") or {}).get("device", "none")) not in ("none", "None")
    amp = "bf16" if getattr(args, "bf16", False) else ("fp16" if getattr(args, "fp16", False) else None)
    ckpt = bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False))
    optim = getattr(args.optim, "value", args.optim)
    return PlanSettings(
        use_lora=bool(cfg.model.use_lora),
        lora_r=int(cfg.lora.lora_r),
        lora_dropout=float(cfg.lora.lora_dropout),
        lora_targets=tuple(cfg.lora.lora_target_modules),
        fix_vit=bool(cfg.model.fix_vit),
        fix_sampler=bool(cfg.model.fix_sampler),
        model_dtype=str(cfg.model.model_dtype),
        bits=int(cfg.model.bits),
        double_quant=bool(cfg.model.double_quant),
        amp=amp,
        checkpointing=ckpt,
        optim=str(optim),
        zero_stage=stage,
        offload_optimizer=off_opt,
        offload_params=off_par,
        gpus=gpus,
        batch=int(args.per_device_train_batch_size),
        packing=bool(cfg.data.packing),
        attention_mask=bool(cfg.data.packing),
        max_length=int(cfg.data.max_length or shape.max_length),
        hd_num=(int(cfg.data.hd_num) if cfg.data.hd_num else DEFAULT_HD_NUM) if shape.hd else None,
        device=device,
    )


PRESET_PREFIX = "preset:"


def model_shape(path: str) -> tuple[ModelShape, Any]:
    """(shape, configuration) of a model folder or ``preset:NAME``, from config.json and the weight names only."""
    if path.startswith(PRESET_PREFIX):
        from xcft.model.presets import preset_config

        config = preset_config(path[len(PRESET_PREFIX) :])
        return ModelShape.from_config(config), config
    from xcft.data.sizes import _weight_shapes, model_family
    from xcft.model.loading import load_config, read_json_object

    folder = Path(path)
    if not folder.is_dir():
        raise XcftError(
            f"--model_name_or_path {path}: no such folder (a model folder, or preset:NAME to plan for a preset shape)"
        )
    declared = read_json_object(folder / "config.json").get("family") if (folder / "config.json").is_file() else None
    family, view = model_family(folder, declared)  # official 2.5 folders say internlm2 in config.json
    overrides: dict[str, Any] = {"family": family, **({"img_size": view} if view else {})}
    # the loader takes the Partial-LoRA rank from the weights (any layer's Plora_A rows), as here
    plora = _weight_shapes(folder, ("model.layers.0.attention.wqkv.Plora_A.weight",))
    if plora:
        overrides["plora_r"] = int(next(iter(plora.values())).shape[0])
    config = load_config(folder, **overrides)
    return ModelShape.from_config(config), config


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of host RAM."""
    total = avail = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, value = line.split(":", 1)
                if key == "MemTotal":
                    total = int(value.split()[0]) * 1024
                elif key == "MemAvailable":
                    avail = int(value.split()[0]) * 1024
    except OSError:
        import os

        total = avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, avail or total


@dataclass
class RunPlan:
    """A plan for an ``xcft train`` configuration, with the memory it is checked against."""

    shape: ModelShape
    plan: MemoryPlan
    budget_bytes: int
    budget_source: str
    alternatives: list[Alternative]
    model: str
    files: Any = None  # the data files read for the plan (reused by the run)
    context_taken: bool = False  # the budget is free memory measured after this process created its CUDA context

    def needed(self, plan: MemoryPlan) -> int:
        """What ``plan`` needs of the budget: its requirement, less the CUDA context when it is already taken."""
        return plan.required_bytes - (CUDA_CONTEXT_BYTES if self.context_taken else 0)

    @property
    def needed_bytes(self) -> int:
        return self.needed(self.plan)

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "family": self.shape.family,
            "device": self.plan.settings.device,
            "fits": self.fits,
            "needed_bytes": self.needed_bytes,
            "budget_bytes": self.budget_bytes,
            "budget_gib": round(self.budget_bytes / GIB, 3),
            "budget_source": self.budget_source,
            **self.plan.to_dict(),
            "alternatives": [
                {
                    "change": a.change,
                    "peak_bytes": a.plan.peak_bytes,
                    "required_bytes": a.plan.required_bytes,
                    "needed_bytes": self.needed(a.plan),
                    "fits": a.fits,
                }
                for a in self.alternatives
            ],
        }


def plan_for_config(cfg: Any, *, read_data_files: bool = True, free_gpu_bytes: int | None = None) -> RunPlan:
    """The plan of a parsed ``xcft train`` configuration, before any weight is loaded.

    The budget is ``--gpu_memory`` when given, else ``free_gpu_bytes`` (what ``xcft train`` measured
    on its GPU), else the visible GPU's total memory, else (a CPU run) the host's available RAM.
    """
    path = str(cfg.model.model_name_or_path)
    shape, config = model_shape(path)
    mem = cfg.memory
    use_cpu = bool(getattr(cfg.training, "use_cpu", False))
    gpus = int(mem.gpus or int(__import__("os").environ.get("WORLD_SIZE", "1") or 1))
    if mem.gpu_memory:
        budget, source, device = parse_gpu_memory(mem.gpu_memory), f"--gpu_memory {mem.gpu_memory}", "cuda"
    elif free_gpu_bytes is not None:
        budget, source, device = int(free_gpu_bytes), "free memory of this GPU", "cuda"
    else:
        budget, source, device = _visible_device_budget(use_cpu)
    settings = settings_from_config(cfg, shape, device=device, gpus=gpus)
    sample, files = None, None
    stage = getattr(getattr(cfg, "preference", None), "stage", "sft")
    if stage != "sft":  # pairs: not read here; planned as one sequence per row (a lower bound for DPO / RM)
        logger.info("memory plan: --stage %s is planned as supervised finetuning of one sequence per row (a lower bound)", stage)
    elif read_data_files and cfg.data.data_path and not path.startswith(PRESET_PREFIX):
        sample, files, varied = _data_sample(cfg, config, shape, settings)
        if varied and settings.batch > 1:  # rows of different lengths are padded: SDPA gets a mask
            settings = dataclasses.replace(settings, attention_mask=True)
    plan = compute_plan(shape, settings, sample)
    taken = free_gpu_bytes is not None and not mem.gpu_memory
    alts = alternatives(shape, settings, sample, budget + (CUDA_CONTEXT_BYTES if taken else 0))
    return RunPlan(shape, plan, budget, source, alts, path, files, taken)


def _visible_device_budget(use_cpu: bool) -> tuple[int, str, str]:
    import torch

    if not use_cpu and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        return int(total), f"{torch.cuda.get_device_name(0)} ({total / GIB:.1f} GiB)", "cuda"
    total, avail = host_memory()
    return avail, f"available of {total / GIB:.1f} GiB", "cpu"


def _data_sample(cfg: Any, config: Any, shape: ModelShape, settings: PlanSettings) -> tuple[SampleShape, Any, bool]:
    """The largest row of the real data: lengths and crop grids as the data reader knows them (no decoding)."""
    from xcft.data.dataset import read_data
    from xcft.model.loading import load_tokenizer
    from xcft.train.inputs import resolve_run_sizes

    sizes = resolve_run_sizes(cfg, config)
    img_size, max_length, hd_num = sizes.img_size, sizes.max_length, sizes.hd_num
    files = read_data(
        cfg.data.data_path,
        load_tokenizer(cfg.model.model_name_or_path),
        img_size,
        max_length,
        cfg.data.given_num,
        hd_num=hd_num,
        cache=cfg.data,
    )
    lengths, slots, views = [], [], []
    for fd in files:
        counts, grids = fd.image_grids()
        if shape.hd and len(grids):
            known, which = np.unique(grids, axis=0, return_inverse=True)
            image_slots = np.asarray([shape.image_tokens(int(r), int(c)) for r, c in known], dtype=np.int64)[which.ravel()]
            image_views = 1 + grids[:, 0] * grids[:, 1]
        else:
            image_slots = np.full(len(grids), 0 if shape.hd else shape.image_tokens(), dtype=np.int64)
            image_views = np.full(len(grids), 0 if shape.hd else 1, dtype=np.int64)
        n = np.asarray(fd.lengths, dtype=np.int64)
        lengths.append(n)
        slots.append(np.minimum(_per_sample(image_slots, counts), n))
        views.append(_per_sample(image_views, counts))
    flat = [np.concatenate(x).tolist() if x else [] for x in (lengths, slots, views)]
    sample = sample_from_lengths(flat[0], flat[1], flat[2], settings, max_length)
    return sample, (files, (img_size, max_length, hd_num)), len(set(flat[0])) > 1


def _per_sample(per_image: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-image values summed per sample (``counts`` images each, in order)."""
    ends = np.cumsum(counts)
    totals = np.concatenate([[0], np.cumsum(per_image)])
    return totals[ends] - totals[ends - counts]


#: The allocator setting xcft trains with on a GPU unless the user chose one: segments that grow in
#: place instead of new blocks per size, so batches of varying size (HD crops) do not fragment memory.
ALLOCATOR_CONF = "expandable_segments:True"


def default_allocator_settings() -> bool:
    """Set ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless the user set an allocator
    configuration; must run before CUDA initialises. True when set here."""
    import os

    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return False
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_CONF
    return True


def check_memory_plan(cfg: Any) -> RunPlan:
    """Plan ``cfg``'s run before any weight is loaded, log it, and stop a GPU run that cannot fit.

    On a GPU the budget is the free memory of this process's device (``torch.cuda.mem_get_info``) or
    ``--gpu_memory``; a plan above it raises :class:`XcftError` with one line naming the plan and the
    changes that make it fit, unless ``--ignore_memory_plan true``. On a CPU the plan for host RAM is
    logged (a warning when it exceeds the available RAM) and the run goes on.
    """
    import os

    import torch

    on_gpu = not bool(getattr(cfg.training, "use_cpu", False)) and torch.cuda.is_available()
    free = None
    if on_gpu and not cfg.memory.gpu_memory:
        free, _total = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0") or 0))
    run = plan_for_config(cfg, free_gpu_bytes=free)
    main = int(os.environ.get("RANK", "0") or 0) == 0
    if main:
        logger.info("%s", format_plan(run))
    if run.fits:
        return run
    if on_gpu and not cfg.memory.ignore_memory_plan:
        raise XcftError(refusal(run))
    if main:
        logger.warning(
            "the memory plan (%s) is above %s (%s); %s",
            _size(run.needed_bytes),
            run.budget_source,
            _size(run.budget_bytes),
            "going on as --ignore_memory_plan true asks" if on_gpu else "the run may swap or be stopped by the system",
        )
    return run


def _gib(n: float) -> str:
    return f"{n / GIB:7.2f} GiB"


def describe_settings(shape: ModelShape, st: PlanSettings) -> str:
    """One line: what kind of run the plan is for."""
    mode = "full finetune" if not st.use_lora else (f"QLoRA ({st.bits} bit)" if st.bits in (4, 8) else "LoRA")
    if st.use_lora:
        mode += f" r {st.lora_r}"
    where = f"{st.gpus} GPU{'s' if st.gpus > 1 else ''}" if st.device == "cuda" else "CPU"
    zero = (
        f", ZeRO-{st.zero_stage}" + (" + offload" if st.offload_optimizer or st.offload_params else "") if st.zero_stage else ""
    )
    hd = f", hd_num {st.hd_num}" if shape.hd else ""
    frozen = {4: "float32", 2: "float16" if st.amp == "fp16" or st.model_dtype == "float16" else "bfloat16"}[
        int(_dtypes(shape, st).frozen)
    ]
    weights = f"{st.bits}-bit linears + {frozen}" if st.bits in (4, 8) else st.model_dtype
    return (
        f"{mode}, {st.amp or 'no mixed precision'}, weights {weights}, checkpointing {'on' if st.checkpointing else 'off'}, "
        f"batch {st.batch}{', packed' if st.packing else ''}{hd}, {st.optim}{zero}, {where}"
    )


def format_plan(run: RunPlan) -> str:
    """The plan as text: the breakdown at the peak, the verdict and the changes that make it fit."""
    plan, st, sh = run.plan, run.plan.settings, run.shape
    device = "GPU" if st.device == "cuda" else "host RAM"
    lines = [
        f"memory plan for {run.model} (InternLM-XComposer {sh.family}, {_count(plan.params['total'])} parameters)",
        f"  run:     {describe_settings(sh, st)}",
        f"  sample:  {plan.sample.source}; per row {plan.sample.positions:,} positions, {plan.sample.image_slots:,} image slots, "
        f"{plan.sample.targets:,} supervised targets",
        f"  peak per {'GPU' if st.device == 'cuda' else 'process'} at the {plan.phase}:",
    ]
    for part in plan.parts:
        lines.append(f"    {part.name:<22}{_gib(part.bytes)}   {part.note}")
    lines.append(f"    {'= live tensors':<22}{_gib(plan.peak_bytes)}")
    extra = "CUDA context, allocator slack" if st.device == "cuda" else "Python, torch, libraries"
    lines.append(f"    {'+ runtime':<22}{_gib(plan.overhead_bytes)}   {extra}")
    verdict = "fits" if run.fits else "does NOT fit"
    lines.append(
        f"  needs {run.needed_bytes / GIB:.2f} GiB of {run.budget_bytes / GIB:.2f} GiB {device} ({run.budget_source}): {verdict}"
    )
    shown = [a for a in run.alternatives if a.plan.required_bytes < plan.required_bytes][:8]
    if shown:
        lines.append("  changes that lower it (each planned anew):")
        lines.append(f"    {'change':<66}{'needs':>11}  fits")
        for alt in shown:
            lines.append(f"    {alt.change:<66}{run.needed(alt.plan) / GIB:7.2f} GiB  {'yes' if alt.fits else 'no'}")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if abs(n) >= GIB else f"{n / MIB:.0f} MiB"


def refusal(run: RunPlan) -> str:
    """The one line ``xcft train`` stops with when the plan does not fit the GPU's free memory."""
    fixes = [a.change for a in run.alternatives if a.fits][:3]
    fix = ("; it fits with " + " or ".join(fixes)) if fixes else "; no single change makes it fit (see xcft plan)"
    return (
        f"the memory plan needs {_size(run.needed_bytes)} per GPU ({run.plan.phase}: "
        + ", ".join(f"{p.name} {_size(p.bytes)}" for p in sorted(run.plan.parts, key=lambda p: -p.bytes)[:4])
        + f") but {run.budget_source} is {_size(run.budget_bytes)}{fix}; "
        "pass --ignore_memory_plan true to try anyway"
    )


def _read_json(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise XcftError(f"--deepspeed {path}: cannot read it as a JSON config ({exc})") from None


__all__ = [
    "GPU_MEMORY_GIB",
    "Alternative",
    "MemoryPlan",
    "ModelShape",
    "Part",
    "PlanSettings",
    "RunPlan",
    "SampleShape",
    "alternatives",
    "check_memory_plan",
    "compute_plan",
    "default_allocator_settings",
    "default_sample",
    "describe_settings",
    "format_plan",
    "host_memory",
    "largest_batch",
    "model_shape",
    "parse_gpu_memory",
    "plan_for_config",
    "refusal",
    "sample_from_lengths",
    "settings_from_config",
    "worst_hd_grid",
]

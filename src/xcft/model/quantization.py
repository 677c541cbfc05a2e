"""Load-time quantization of the decoder linears (QLoRA's frozen base): bitsandbytes 4 bit or 8 bit.

:func:`quantize_model` is a documented transformation applied right after loading, never a change
to running code: it replaces every :class:`~xcft.model.modeling_xcomposer2.PLoRALinear` of the
decoder (``attention.wqkv``, ``attention.wo``, ``feed_forward.w1/w2/w3``) by its quantized
counterpart from :mod:`xcft.model.quantized_linear`.

* Quantized: the base weight of those linears, 6.98 B of the 8.67 B parameters of the 7B models
  (13.0 GiB in bf16, 3.35 GiB in 4 bit); 4 bit = NF4 (or FP4) in blocks of 64 with a float32
  scale per block, 8-bit-quantized again with double quantization (4.127 bits per weight; 4.5
  without it); 8 bit = LLM.int8 (int8 per row, outlier columns of the activations in 16 bit).
* Not quantized, kept in the compute dtype: the Partial-LoRA branches ``Plora_A``/``Plora_B``
  (they act on image tokens exactly as in the unquantized model), embeddings, norms, the output
  head, the vision tower and the projector (trained parts are float32 master weights anyway).
  Quantizing the frozen vision tower's linears too would save 0.42 GiB (302 M weights) of the
  6.5 GiB a 4-bit 7B model holds, at the price of quantization error in every image feature.

The model then carries ``is_loaded_in_4bit`` / ``is_loaded_in_8bit``, the attributes peft and the
Trainer read, so peft puts its k-bit LoRA layers on the quantized linears. Nothing is saved in
quantized form: a LoRA adapter trained on it applies to the full-precision base.

bitsandbytes is the optional extra ``qlora``; :func:`require_bitsandbytes` turns its absence into
one line naming the extra.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, TypeVar

import torch
from torch import nn

from xcft.errors import XcftError
from xcft.model.bits import QUANT_TYPES, SUPPORTED_BITS
from xcft.model.modeling_xcomposer2 import PLoRALinear

logger = logging.getLogger(__name__)

#: Block size of bitsandbytes 4-bit quantization (one absmax scale per block).
BLOCKSIZE_4BIT = 64
#: Second-level block size of double quantization (the float32 scales quantized to 8 bit).
BLOCKSIZE_DOUBLE_QUANT = 256
INSTALL_HINT = "pip install 'xcft[qlora]' (bitsandbytes)"

ModelT = TypeVar("ModelT", bound=nn.Module)


def require_bitsandbytes(flag: str = "--bits") -> Any:
    """The bitsandbytes module; one error line naming the ``qlora`` extra when it is not installed."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == "bitsandbytes"
        state = "is not installed" if missing else f"cannot be imported ({exc})"
        raise XcftError(f"{flag} 4 and {flag} 8 need bitsandbytes, which {state}: {INSTALL_HINT}, or use {flag} 16") from None


def bits_per_weight(bits: int, double_quant: bool = True) -> float:
    """Storage of one quantized weight in bits, scales included (what the memory plan counts)."""
    if bits == 4:
        if double_quant:  # 8-bit scale per 64 weights + a float32 scale per 256 scales
            return 4 + 8 / BLOCKSIZE_4BIT + 32 / (BLOCKSIZE_4BIT * BLOCKSIZE_DOUBLE_QUANT)
        return 4 + 32 / BLOCKSIZE_4BIT
    if bits == 8:
        return 8.0  # plus one float32 scale per output row (negligible)
    return 16.0


def quantized_linears(model: nn.Module) -> list[str]:
    """Names of the linears :func:`quantize_model` replaces (every unquantized Partial-LoRA linear)."""
    return [name for name, module in model.named_modules() if type(module) is PLoRALinear]


def quantize_model(
    model: ModelT,
    *,
    bits: int,
    compute_dtype: torch.dtype,
    quant_type: str = "nf4",
    double_quant: bool = True,
    device: torch.device | str = "cpu",
    trainable: bool = False,
) -> ModelT:
    """Store the decoder linears of ``model`` in ``bits`` bit on ``device``, then move the rest of the model there.

    ``compute_dtype`` is the dtype the 4-bit weights are dequantized to in the matmul (the dtype
    of the model's other weights: bfloat16 for bf16 training, else the load dtype). The source
    weights are quantized one linear at a time, so at most one extra full-precision linear is
    alive. ``trainable``: gradients will flow through the quantized linears (QLoRA training; see
    :class:`~xcft.model.quantized_linear.PLoRALinear4bit`). ``bits`` 16 returns the model unchanged.
    Returns ``model`` (changed in place).
    """
    if bits == 16:
        return model
    if bits not in SUPPORTED_BITS:
        raise XcftError(f"--bits {bits}: use 4, 8 or 16")
    if quant_type not in QUANT_TYPES:
        raise XcftError(f"--quant_type {quant_type}: use nf4 or fp4")
    require_bitsandbytes()
    from xcft.model.quantized_linear import PLoRALinear4bit, PLoRALinear8bit

    names = quantized_linears(model)
    if not names:
        raise XcftError("--bits: the model has no unquantized decoder linear (is it quantized already?)")
    device = torch.device(device)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        source = getattr(parent, child)
        new: nn.Module
        if bits == 4:
            new = PLoRALinear4bit(
                source,
                compute_dtype=compute_dtype,
                quant_type=quant_type,
                double_quant=double_quant,
                device=device,
                trainable=trainable,
            )
        else:
            new = PLoRALinear8bit(source, device=device)
        new.train(source.training)
        setattr(parent, child, new)
        del source
    model.to(device)
    # The attributes peft (k-bit LoRA layers) and the Trainer / accelerate read on a bitsandbytes model.
    flags: Any = model  # plain attributes, not parameters or submodules
    flags.is_loaded_in_4bit = bits == 4
    flags.is_loaded_in_8bit = bits == 8
    logger.info(
        "%d decoder linears stored in %s on %s (%s); embeddings, norms, output head, Partial LoRA and vision in %s",
        len(names),
        f"4 bit ({quant_type}{', double quantization' if double_quant else ''})" if bits == 4 else "8 bit (LLM.int8)",
        device,
        f"{bits_per_weight(bits, double_quant):.3f} bits per weight",
        str(compute_dtype).replace("torch.", ""),
    )
    return model


def model_bits(model: nn.Module) -> int:
    """4 or 8 for a model :func:`quantize_model` changed, else 16."""
    if getattr(model, "is_loaded_in_4bit", False):
        return 4
    if getattr(model, "is_loaded_in_8bit", False):
        return 8
    return 16


__all__ = [
    "INSTALL_HINT",
    "QUANT_TYPES",
    "SUPPORTED_BITS",
    "bits_per_weight",
    "model_bits",
    "quantize_model",
    "quantized_linears",
    "require_bitsandbytes",
]

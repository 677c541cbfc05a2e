"""Partial-LoRA linears whose base weight is stored by bitsandbytes (4-bit NF4/FP4 or 8-bit LLM.int8).

Each class derives from :class:`~xcft.model.modeling_xcomposer2.PLoRALinear` first and from the
bitsandbytes layer second. ``PLoRALinear.forward`` takes its base output from ``super().forward``,
which in these classes is the bitsandbytes quantized matmul; the Partial-LoRA branch
(``Plora_A``/``Plora_B``, kept in the compute dtype) is added at image positions by the very same
code as in the unquantized model. Because they are bitsandbytes layers, peft's k-bit LoRA layers
wrap them as they wrap any ``Linear4bit`` / ``Linear8bitLt``, and their extra ``plora_index``
argument passes through peft's forward.

This module imports bitsandbytes; import it through :mod:`xcft.model.quantization`, which checks
that the ``qlora`` extra is installed first.
"""

from __future__ import annotations

from typing import Any, cast

import bitsandbytes as bnb
import torch

from xcft.model.modeling_xcomposer2 import PLoRALinear

#: Output rows per block of bitsandbytes' packed CPU layout of 4-bit weights (AVX512-BF16 inference).
CPU_PACK_BLOCK = 32
#: Input columns per scale block that layout needs (the 4-bit quantization block size).
CPU_PACK_COLUMNS = 64
#: LLM.int8 outlier threshold: activation columns above it are multiplied in 16 bit (the value of
#: the LLM.int8 paper and of transformers' BitsAndBytesConfig default).
INT8_THRESHOLD = 6.0


def _take_partial_lora(target: PLoRALinear, source: PLoRALinear) -> None:
    """Move the Partial-LoRA branch, its settings and the bias of ``source`` onto ``target`` (same tensors)."""
    target.lora_r = source.lora_r
    target.lora_alpha = source.lora_alpha
    target.lora_scaling = source.lora_scaling
    target.lora_dropout = source.lora_dropout
    target.Plora_A = source.Plora_A
    target.Plora_B = source.Plora_B
    target.bias = source.bias


class PLoRALinear4bit(PLoRALinear, bnb.nn.Linear4bit):
    """A :class:`PLoRALinear` whose base weight is quantized to 4 bit (blockwise NF4 or FP4, block size 64).

    Built from an unquantized ``source``: the weight is quantized on ``device`` (where it then
    lives); the Partial-LoRA branch and the bias are the source's own tensors.

    ``trainable``: gradients must flow through this layer (QLoRA training). bitsandbytes repacks a
    4-bit weight for its AVX512-BF16 CPU inference kernel the first time the layer runs in eval mode
    without gradients (a reference or evaluation pass), and from then on multiplies with that
    kernel (``gemv_4bit``) even in training; it has no backward, so autograd warns "an autograd
    kernel was not registered" and the gradient through the frozen weight to the layer's input is
    dropped (every LoRA gradient below it is wrong). Training layers therefore never repack.
    """

    def __init__(
        self,
        source: PLoRALinear,
        *,
        compute_dtype: torch.dtype,
        quant_type: str = "nf4",
        double_quant: bool = True,
        device: torch.device | str = "cpu",
        trainable: bool = False,
    ) -> None:
        # The bitsandbytes constructor on the meta device: no full-size weight is allocated or initialised.
        bnb.nn.Linear4bit.__init__(
            self,
            source.in_features,
            source.out_features,
            bias=False,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
            device="meta",
        )
        _take_partial_lora(self, source)
        if trainable or source.out_features % CPU_PACK_BLOCK or source.in_features % CPU_PACK_COLUMNS:
            # bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU inference kernel in blocks of 32
            # output rows and 64 input columns and fails on other shapes (tiny test models); those layers,
            # and layers that train (see the class docstring), keep the portable path.
            self.support_avx512bf16_for_cpu = False
        weight = bnb.nn.Params4bit(
            source.weight.data, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type, module=self
        )
        self.weight = cast(Any, weight).to(device)  # quantizes (bitsandbytes' overloads of to() confuse type checkers)


class PLoRALinear8bit(PLoRALinear, bnb.nn.Linear8bitLt):
    """A :class:`PLoRALinear` whose base weight is stored in int8 with per-row scales (LLM.int8, outlier threshold 6)."""

    def __init__(self, source: PLoRALinear, *, device: torch.device | str = "cpu") -> None:
        bnb.nn.Linear8bitLt.__init__(
            self,
            source.in_features,
            source.out_features,
            bias=False,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        _take_partial_lora(self, source)
        # Int8Params quantizes when it leaves the CPU copy for ``device`` (the CPU included).
        weight = bnb.nn.Int8Params(source.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
        self.weight = cast(Any, weight).to(device)


__all__ = ["INT8_THRESHOLD", "PLoRALinear4bit", "PLoRALinear8bit"]

"""``--bits``: the storage widths of the decoder linears and the option's one help text.

Torch-free, so every subcommand's parser (``xcft eval``, ``chat``, ``train`` ...) declares the
option from it without importing the model code; :mod:`xcft.model.quantization` does the work.
"""

from __future__ import annotations

__all__ = ["BITS_HELP", "QUANT_TYPES", "SUPPORTED_BITS"]

#: Storage widths of ``--bits``: 16 means "not quantized" (the weights stay in the model dtype).
SUPPORTED_BITS = (4, 8, 16)
#: 4-bit data types of bitsandbytes.
QUANT_TYPES = ("nf4", "fp4")

BITS_HELP = (
    "store the decoder linears in 4 bit (NF4, double quantization) or 8 bit (LLM.int8) with bitsandbytes; "
    "16 (default) keeps them unquantized. Training: QLoRA (LoRA adapters on the quantized base, which stays "
    "frozen); a LoRA adapter folder stays a separate branch over it. Needs the qlora extra: pip install 'xcft[qlora]'"
)

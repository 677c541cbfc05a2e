"""``xcft convert``: rewrite an official checkpoint folder as a self-contained xcft folder."""

from __future__ import annotations

from xcft.model.loading import load_pretrained, save_pretrained


def convert_command(source: str, output: str) -> int:
    """``xcft convert OFFICIAL_DIR OUT_DIR``: load with our classes, write a self-contained copy."""
    model, tokenizer = load_pretrained(source, dtype=None, device="cpu")
    out = save_pretrained(model, tokenizer, output)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"converted {source} -> {out} ({n_params / 1e6:.1f}M parameters, {model.config.dtype}, "
        f"img_size {model.config.img_size}, Partial-LoRA rank {model.config.plora_r})"
    )
    return 0

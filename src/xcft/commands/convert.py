"""``xcft convert``: rewrite an official checkpoint folder as a self-contained xcft folder."""

from __future__ import annotations

from xcft.model.loading import load_pretrained, save_pretrained
from xcft.output_dir import check_no_overlap, check_output_folder


def convert_command(source: str, output: str) -> int:
    """``xcft convert OFFICIAL_DIR OUT_DIR``: load with our classes, write a self-contained copy."""
    check_output_folder(output, flag="output folder")
    check_no_overlap(output, [("the source folder", source)], flag="output folder")
    model, tokenizer = load_pretrained(source, dtype=None, device="cpu")
    out = save_pretrained(model, tokenizer, output, command="convert")
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"converted {source} -> {out} ({n_params / 1e6:.1f}M parameters, {model.config.dtype}, "
        f"img_size {model.config.img_size}, Partial-LoRA rank {model.config.plora_r})"
    )
    return 0

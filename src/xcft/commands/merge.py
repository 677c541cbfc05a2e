"""``xcft merge``: fold a LoRA adapter into its base and prove the merged model is the same function.

The merged folder is self-contained (our model code inside). Verification: one probe batch with
an image and text goes through base + adapter (before merging) and through the merged folder
reloaded from disk; the largest absolute logit difference is printed and must be within
tolerance, otherwise the command fails and writes nothing. The result is also written, as data, to
``merge_check.json`` in the merged folder (:func:`xcft.run_files.read_merge_check` reads it).
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from PIL import Image

from xcft.errors import OutputFolderError, XcftError
from xcft.model.image_processing_xcomposer2 import load_image_tensor
from xcft.model.loading import load_adapter_model, load_pretrained, save_pretrained, unwrap_model
from xcft.output_dir import check_no_overlap, check_output_folder, read_marker, write_marker
from xcft.run_files import MERGE_CHECK_NAME, MergeCheck, write_merge_check

if TYPE_CHECKING:
    from xcft.model.modeling_xcomposer2 import XComposer2ForCausalLM

logger = logging.getLogger(__name__)

PROBE_QUERY = "<ImageHere>Describe the picture in one sentence, then count to five: one, two, three, four, five."
#: Positions whose logits are compared. The last positions depend on every weight and on the image
#: (they attend to its slots); all 1258 positions of the probe would hold 1258 x 92544 floats
#: (466 MB per copy with the real vocabulary) and dominated the memory of a small merge.
PROBE_POSITIONS = 32


def probe_image(size: int) -> Image.Image:
    """A deterministic synthetic RGB image (gradients + a square) so the probe needs no file."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([(x * 255 // max(size - 1, 1)), (y * 255 // max(size - 1, 1)), ((x + y) * 127 // max(size - 1, 1))], -1)
    rgb[size // 4 : size // 2, size // 4 : size // 2] = (250, 30, 30)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def probe_batch(model: Any, tokenizer: Any) -> dict[str, torch.Tensor]:
    """Chat-format prompt with one image: input_ids, attention_mask, image_mask, pixel_values, image_counts (+ image_grids for 2.5)."""
    base = cast("XComposer2ForCausalLM", unwrap_model(model))
    extra: dict[str, torch.Tensor] = {}
    if base.config.hd:
        pixel_values, grids = base.hd_chat_images([probe_image(2 * base.config.img_size)])
        slots = base.image_token_counts(grids, 1)
        extra["image_grids"] = grids
    else:
        pixel_values = load_image_tensor(probe_image(base.config.img_size), base.config.img_size).unsqueeze(0)
        slots = None
    input_ids, image_mask = base.build_chat_inputs(tokenizer, PROBE_QUERY, [], None, num_images=1, image_slots=slots)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "image_mask": image_mask,
        "pixel_values": pixel_values,
        "image_counts": torch.tensor([1]),
        **extra,
    }


@torch.no_grad()
def probe_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float32 logits of the last :data:`PROBE_POSITIONS` positions of the probe batch."""
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False, logits_to_keep=PROBE_POSITIONS)
    return out.logits.float().cpu()


def tolerance(reference: torch.Tensor) -> float:
    """Allowed max |diff|: float32 rounding of W x + B(A x) vs (W + BA) x, relative to the logit scale."""
    return 1e-4 * max(1.0, float(reference.abs().max()))


def _record_check(folder: Path, check: MergeCheck) -> None:
    """Write ``merge_check.json`` into the (not yet published) merged folder and list it as xcft's."""
    write_merge_check(folder, check)
    entries = set((read_marker(folder) or {}).get("entries") or [])
    write_marker(folder, "merge", entries | {MERGE_CHECK_NAME})


def merge_command(*, adapter: str, output: str, base: str | None = None) -> int:
    """``xcft merge``: :func:`merge_model`, then the exit status."""
    merge_model(adapter=adapter, output=output, base=base)
    return 0


def merge_model(*, adapter: str, output: str, base: str | None = None) -> MergeCheck:
    """Merge ``adapter`` into its base (or ``base``), verify, write ``output``; returns the verification.

    Raises :class:`~xcft.errors.XcftError` (nothing written) when the merged model is not the same
    function as base + adapter.
    """
    out = Path(output).resolve()
    check_output_folder(out, flag="--output")
    if out.is_dir() and any(out.iterdir()):
        raise OutputFolderError(f"--output {out} already holds an earlier xcft output; choose a new or empty folder")
    inputs = [("the adapter folder", Path(adapter))]
    if base:
        inputs.append(("the base model folder", Path(base)))
    check_no_overlap(out, inputs, flag="--output")
    peft_model, tokenizer, base_path = load_adapter_model(adapter, base=base, dtype=torch.float32, device="cpu")
    check_no_overlap(out, [("the base model folder", base_path)], flag="--output")
    print(f"base:    {base_path}")
    print(f"adapter: {Path(adapter).resolve()}")
    batch = probe_batch(peft_model, tokenizer)
    reference = probe_logits(peft_model, batch)
    merged = peft_model.merge_and_unload().eval()
    # Write next to the destination, verify from disk, then move into place.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
    try:
        written = save_pretrained(merged, tokenizer, tmp_root / "model", command="merge")
        # Only one copy of the weights at a time: the merged model goes before the reload.
        del merged, peft_model
        gc.collect()
        reloaded, _ = load_pretrained(written, dtype=torch.float32, device="cpu")
        got = probe_logits(reloaded, batch)
        check = MergeCheck(
            max_abs_logit_diff=float((got - reference).abs().max()),
            tolerance=tolerance(reference),
            probe_tokens=int(batch["input_ids"].shape[1]),
            probe_images=1,
            positions=PROBE_POSITIONS,
            adapter=str(Path(adapter).resolve()),
            base=str(Path(base_path).resolve()),
        )
        print(check.line())
        if not check.ok:
            raise XcftError(
                f"merged model differs from base + adapter by {check.max_abs_logit_diff:.3e} > {check.tolerance:.1e} "
                "on the probe batch; nothing was written. Check that --base is the model the adapter was trained on"
            )
        _record_check(written, check)
        if out.exists():
            out.rmdir()
        written.rename(out)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    print(f"merged model written to {out}")
    return check

"""``xcft init-model``: a randomly initialised, self-contained model folder of a preset shape."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from xcft.data.spm_builder import build_tokenizer
from xcft.errors import OutputFolderError, XcftError
from xcft.model.loading import save_pretrained
from xcft.model.presets import SMALL_TOKENIZER_VOCAB, build_model
from xcft.model.tokenization_internlm2 import InternLM2Tokenizer
from xcft.output_dir import check_output_folder

logger = logging.getLogger(__name__)


def _tokenizer_for(tokenizer: str | None, workdir: Path):
    """The tokenizer to ship: the given ``tokenizer.model``, or a small one built on the spot."""
    if tokenizer:
        path = Path(tokenizer)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise XcftError(f"--tokenizer {tokenizer}: no such tokenizer.model file")
        local = workdir / "tokenizer.model"
        shutil.copyfile(path, local)
    else:
        local = build_tokenizer(workdir, vocab_size=SMALL_TOKENIZER_VOCAB)
    try:
        return InternLM2Tokenizer.from_model_file(local)
    except (ValueError, RuntimeError, OSError) as exc:
        raise XcftError(f"{tokenizer or local}: not a usable InternLM2 SentencePiece model ({exc})") from exc


def init_model_command(
    output: str, *, preset: str = "tiny", img_size: int | None = None, tokenizer: str | None = None, seed: int = 0
) -> int:
    """``xcft init-model``: write a randomly initialised, self-contained model folder."""
    out = Path(output)
    check_output_folder(out, flag="output folder")
    if out.is_dir() and any(out.iterdir()):
        raise OutputFolderError(f"output folder {out} already holds an earlier xcft output; choose a new or empty folder")
    with tempfile.TemporaryDirectory(prefix="xcft-tok-") as work:
        tok = _tokenizer_for(tokenizer, Path(work))
        vocab = int(tok.vocab_size)
        if not preset.startswith("tiny") and tokenizer is None:
            logger.info("no --tokenizer given: the %s preset uses a %d-piece tokenizer built on the spot", preset, vocab)
        device = "cuda" if preset.startswith("7b") and torch.cuda.is_available() else "cpu"
        try:
            model = build_model(preset, img_size, vocab, seed=seed, device=device)
        except ValueError as exc:  # e.g. an img_size the 2.5 patch merge cannot use
            raise XcftError(f"--preset {preset}: {exc}") from exc
        if device != "cpu":
            # transformers wraps PreTrainedModel.to with functools.wraps, whose stub takes the arguments for ``self``
            model = model.to("cpu")  # type: ignore[arg-type]
        path = save_pretrained(model, tok, out, command="init-model")
    n_params = sum(p.numel() for p in model.parameters())
    config = model.config
    if config.hd:
        images = f"2.5, {config.img_size} px views ({config.hd_image_tokens(1, 1)} slots for a 1x1 crop grid)"
    else:
        images = f"img_size {config.img_size} ({config.image_tokens} slots per image)"
    print(f"wrote {path}: preset {preset}, {n_params / 1e6:.1f}M parameters, vocab {vocab}, {images}, {config.dtype}")
    return 0

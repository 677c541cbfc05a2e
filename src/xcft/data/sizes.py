"""Image size, token limit, crop budget and family of a run: one set of options, one resolver.

``check-data``, ``inspect``, ``eval``, ``chat``, ``train`` and the web page take the same three
options (:class:`SizeOptions`) and settle them against the model with :func:`resolve_sizes`, so
they agree on the same flags. The rules:

* **family** comes from the model (its weights; ``config.json`` only as a cross-check).
* **img_size** (``--resolution`` for train, the official 2.5 name) defaults to the model's; any
  other value is an error, since the vision position table is built for the model's size (a 2.0
  folder whose config.json has no img_size takes the flag, else 490, with a note).
* **max_length** defaults to the model's (16384 for a 2.5 config without one, the official value).
* **hd_num** is the crop budget of a 2.5 model: default 18 (the official training default), at
  least 1. Given for an InternLM-XComposer2 (2.0) model it is an **error** in every command: a 2.0
  model sees one fixed-size view, so the flag would be silently meaningless.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xcft.errors import ModelFolderError, XcftError
from xcft.options import option

__all__ = ["DEFAULT_IMG_SIZE", "ModelSizes", "SizeOptions", "Sizes", "folder_sizes", "model_sizes", "resolve_sizes"]

#: A 2.0 folder whose config.json has no img_size: the vl-7b size.
DEFAULT_IMG_SIZE = 490


@dataclass
class SizeOptions:
    """The size options shared by every command that encodes samples (help text written here only)."""

    img_size: int | None = option(
        None, "Image (2.0) or view (2.5) side in pixels; must be the model's (default: the model's; 490 for vl-7b, 560 for 2.5)."
    )
    max_length: int | None = option(
        None,
        "Token limit per sample, image slots included (default: the model's max_length; 16384 for a 2.5 "
        "checkpoint whose config has none, the official value).",
    )
    hd_num: int | None = option(
        None,
        "InternLM-XComposer-2.5: crop budget per image (default 18, the official training default); each image "
        "becomes a global view plus up to hd_num crops. An error for an InternLM-XComposer2 (2.0) model.",
    )


@dataclass(frozen=True)
class ModelSizes:
    """What a model says about sizes: its family, image (view) side and token limit (None where unknown)."""

    family: str
    img_size: int | None
    max_length: int | None
    where: str = "the model"  # names the model in messages
    config_path: str | None = None  # for the notes about values the folder's config.json lacks


@dataclass(frozen=True)
class Sizes:
    """The settled sizes of a run (``hd_num`` None for a 2.0 model, or for chat's own default)."""

    family: str
    img_size: int
    max_length: int
    hd_num: int | None
    notes: tuple[str, ...] = field(default=())

    @property
    def image_spec(self) -> Any:
        from xcft.data.encode import ImageSpec  # lazy: keeps this module (and the CLI parser) light

        return ImageSpec(self.img_size, self.hd_num)


def _flag(name: str, style: str) -> str:
    return "--" + (name if style == "_" else name.replace("_", "-"))


def resolve_sizes(
    model: ModelSizes,
    img_size: int | None = None,
    max_length: int | None = None,
    hd_num: int | None = None,
    *,
    style: str = "-",
    img_flag: str | None = None,
    default_hd_num: int | None = -1,
) -> Sizes:
    """Settle the options against ``model`` (rules in the module docstring); XcftError names the flag and the fix.

    ``style``: ``-`` for ``--img-size`` style flags in messages, ``_`` for train's ``--img_size``;
    ``img_flag`` names the flag the image size came from (``--resolution``). ``default_hd_num``:
    the crop budget when none is given (-1: the training default; None: leave it to the caller,
    as chat does).
    """
    from xcft.model.configuration_xcomposer2 import DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH_2_5, FAMILY_2_5
    from xcft.model.image_processing_xcomposer2 import HD_NUM_TRAIN, HD_VIEW_SIZE

    img_flag = img_flag or _flag("img_size", style)
    hd_flag = _flag("hd_num", style)
    notes: list[str] = []
    hd = model.family == FAMILY_2_5
    if hd_num is not None and not hd:
        raise XcftError(
            f"{hd_flag} {hd_num}: {model.where} is an InternLM-XComposer2 (2.0) model, whose images are one fixed-size "
            f"view; {hd_flag} applies to 2.5 models only. Drop it"
        )
    if hd_num is not None and int(hd_num) < 1:
        raise XcftError(f"{hd_flag} must be at least 1 (crops per image), got {hd_num}")
    own_img = model.img_size or (HD_VIEW_SIZE if hd else None)
    if own_img is not None and img_size is not None and int(img_size) != own_img:
        what = "InternLM-XComposer-2.5 model whose views (each crop and the global view) are" if hd else "model built for"
        raise XcftError(
            f"{img_flag} {img_size}: {model.where} is an {what} {own_img} px images, and its vision position table "
            f"has that size. Drop {img_flag} or pass {own_img}"
        )
    if own_img is None and img_size is None:
        notes.append(f"{model.config_path or model.where} has no img_size; using {DEFAULT_IMG_SIZE} (pass {img_flag} to choose)")
    final_img = int(img_size or own_img or DEFAULT_IMG_SIZE)
    if max_length is None and model.max_length is None:
        max_length = DEFAULT_MAX_LENGTH_2_5 if hd else DEFAULT_MAX_LENGTH
        notes.append(
            f"{model.config_path or model.where} has no max_length; using {max_length} (the official code would silently "
            f"cut every sample to 20 tokens; pass {_flag('max_length', style)} to choose)"
        )
    final_length = int(max_length or model.max_length or 0)
    if final_length <= 0:
        raise XcftError(f"{_flag('max_length', style)} must be positive, got {max_length}")
    if hd:
        crops = int(hd_num) if hd_num is not None else (HD_NUM_TRAIN if default_hd_num == -1 else default_hd_num)
    else:
        crops = None
    sizes = Sizes(model.family, final_img, final_length, crops, tuple(notes))
    try:
        sizes.image_spec  # noqa: B018 - validates img_size against the patch size
    except ValueError as exc:
        raise XcftError(f"{img_flag} {final_img}: {exc}") from exc
    return sizes


def model_sizes(config: Any, where: str = "the model") -> ModelSizes:
    """The sizes of a loaded model's config (``XComposer2Config``)."""
    return ModelSizes(config.family, int(config.img_size), int(config.max_length), where)


class _Shape:
    """A tensor stand-in that has only its shape (what family detection reads)."""

    def __init__(self, shape: Any) -> None:
        self.shape = tuple(shape)


def _weight_shapes(folder: Path, wanted: tuple[str, ...]) -> dict[str, _Shape]:
    """Shapes of the ``wanted`` tensors, from the weight files' headers (safetensors) or a memory map (.bin)."""
    import torch
    from safetensors import safe_open

    from xcft.model import loading

    shapes: dict[str, _Shape] = {}
    for path in loading.weight_files(folder):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as fh:
                    present = set(fh.keys())
                    for key in wanted:
                        if key in present:
                            shapes[key] = _Shape(fh.get_slice(key).get_shape())
            else:
                part = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                shapes.update({k: _Shape(v.shape) for k, v in part.items() if k in wanted})
        except Exception as exc:  # a truncated or corrupt weight file: one line naming it
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise ModelFolderError(
                f"{path} cannot be read ({type(exc).__name__}: {first}): the file is truncated or corrupt; re-download or re-save it"
            ) from None
    return shapes


def model_family(folder: str | os.PathLike[str], declared: str | None = None) -> tuple[str, int | None]:
    """``(family, view size or None)`` of a checkpoint folder, from its weight files' headers.

    Only tensor names and shapes are read, so a 7B checkpoint costs milliseconds. A folder without
    weights keeps the declared family (2.0 when none).
    """
    # lazy: loading imports the modeling code, which check-data and the CLI parser never need
    from xcft.model import loading
    from xcft.model.configuration_xcomposer2 import FAMILY_2_0

    folder = Path(folder)
    try:
        loading.weight_files(folder)
    except XcftError:
        return declared or FAMILY_2_0, None
    wanted = (*loading.SEPARATOR_KEYS, loading.PROJECTOR_KEY, loading.PATCH_KEY, loading.POSITION_KEY)
    return loading.detect_family(_weight_shapes(folder, wanted), declared, source=str(folder))  # type: ignore[arg-type]


def folder_sizes(folder: str | os.PathLike[str]) -> ModelSizes:
    """The sizes of a model folder without loading it: config.json read as JSON, the family from the weights."""
    from xcft.model.loading import read_json_object

    d = Path(folder)
    if not d.is_dir():
        raise XcftError(
            f"model folder {d} not found; --model must be a checkpoint folder holding tokenizer.model and config.json"
        )
    cfg_path = d / "config.json"
    config: dict[str, Any] = read_json_object(cfg_path) if cfg_path.is_file() else {}
    for key in ("img_size", "max_length"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ModelFolderError(
                f"{cfg_path}: {key} is {value!r} ({type(value).__name__}); expected a positive integer. Fix the file"
            )
    family, view = model_family(d, config.get("family"))
    return ModelSizes(family, view or config.get("img_size"), config.get("max_length"), str(d), str(cfg_path))

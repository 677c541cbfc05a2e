"""Load official InternLM-XComposer2 folders and our own outputs; save self-contained folders.

``load_pretrained`` never executes a folder's ``.py`` files and never downloads: it reads
``config.json`` with :class:`XComposer2Config`, builds :class:`XComposer2ForCausalLM` on the
meta device, reads the weights (``.safetensors`` or ``.bin`` with ``weights_only=True``,
sharded or not), adapts the things official folders may differ in (the model family, 2.0 or
2.5, read from the weights because an official 2.5 ``config.json`` only says ``internlm2``; the
Partial-LoRA rank, read from the weights; a 577-row CLIP-336 position table, interpolated to the
2.0 model's grid; the unused CLIP ``post_layernorm``, which official 2.5 finetunes drop), and
assigns them with no other missing or unexpected key allowed.

``save_pretrained`` writes a folder that a process without xcft can load with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``: config with
``auto_map``, the self-contained model/tokenizer/image files copied in, safetensors with the
official tensor names, tokenizer files. It writes to a temporary sibling folder and renames.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig

from xcft.errors import ModelFolderError, OutputFolderError, XcftError
from xcft.model.configuration_xcomposer2 import FAMILY_2_0, FAMILY_2_5, VISION_CONFIG_FILE, XComposer2Config
from xcft.model.modeling_xcomposer2 import XComposer2ForCausalLM, materialize_non_persistent_buffers
from xcft.model.tokenization_internlm2 import InternLM2Tokenizer
from xcft.output_dir import check_output_folder, foreign_entries, save_errors, staging_dir, write_marker

logger = logging.getLogger(__name__)


def register_auto_classes() -> None:
    """Register our classes with the transformers Auto classes (idempotent).

    Lets our own output folders load through ``AutoModelForCausalLM`` inside an xcft process
    without ``trust_remote_code``.
    """
    AutoConfig.register(XComposer2Config.model_type, XComposer2Config, exist_ok=True)
    AutoModel.register(XComposer2Config, XComposer2ForCausalLM, exist_ok=True)
    AutoModelForCausalLM.register(XComposer2Config, XComposer2ForCausalLM, exist_ok=True)


register_auto_classes()

MODEL_DIR = Path(__file__).resolve().parent
#: The self-contained files copied into every saved folder (remote code for trust_remote_code).
SELF_CONTAINED_FILES = (
    "configuration_xcomposer2.py",
    "modeling_xcomposer2.py",
    "tokenization_internlm2.py",
    "image_processing_xcomposer2.py",
    "template_xcomposer2.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_xcomposer2.XComposer2Config",
    "AutoModel": "modeling_xcomposer2.XComposer2ForCausalLM",
    "AutoModelForCausalLM": "modeling_xcomposer2.XComposer2ForCausalLM",
}
ADAPTER_CONFIG = "adapter_config.json"
POSITION_KEY = "vit.vision_tower.vision_model.embeddings.position_embedding.weight"
PATCH_KEY = "vit.vision_tower.vision_model.embeddings.patch_embedding.weight"
PROJECTOR_KEY = "vision_proj.0.weight"
SEPARATOR_KEYS = ("plora_glb_GN", "plora_sub_GN")
#: CLIP's post-layernorm only feeds the pooled output, which no feature uses; official 2.5 full
#: finetunes (fix_vit false) replace it by an identity, so their folders lack these two tensors.
POST_LAYERNORM_KEYS = (
    "vit.vision_tower.vision_model.post_layernorm.weight",
    "vit.vision_tower.vision_model.post_layernorm.bias",
)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


# ============================================================================ small helpers


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """``"bfloat16"``/``torch.bfloat16``/None -> a torch dtype."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise XcftError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise XcftError(f"device {device} was asked for but CUDA is not available; use --device cpu")
    return device


def default_attn_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """flash_attention_2 on CUDA in half precision when the package is installed, else SDPA."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """True for a peft adapter folder (it has adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The XComposer2ForCausalLM inside a peft and/or DDP/DeepSpeed wrapper (or the model itself)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    get_base_model = getattr(model, "get_base_model", None)  # a peft model
    return get_base_model() if get_base_model is not None else model


# ============================================================================ reading weights


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder (index-listed shards, or a single file)."""
    for index_name in INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ModelFolderError(f"{index} is not a valid shard index (no weight_map of file names); re-download it")
            files = sorted({folder / name for name in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise XcftError(f"{index} lists shards that are missing: {missing}; re-download the checkpoint")
            return files
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if found:
        return found
    raise XcftError(f"no weights in {folder}: expected model.safetensors, pytorch_model.bin or a sharded *.index.json")


def read_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder on CPU, in their stored dtype (``.bin`` with ``weights_only``)."""
    folder = Path(folder)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        part = _read_weight_file(path)
        dup = set(part) & set(state)
        if dup:
            raise XcftError(f"{path} repeats tensors already read from another shard: {sorted(dup)[:5]}")
        state.update(part)
    return state


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one ``.safetensors`` or ``.bin`` file; a truncated, corrupt or unsafe file is one error line."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for bad files
            raise ModelFolderError(
                f"{path} cannot be read as safetensors ({_first_line(exc)}): the file is truncated or corrupt; "
                "re-download or re-save it"
            ) from None
    try:
        part = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:  # weights_only refuses anything but tensors: never unpickled
        raise ModelFolderError(
            f"{path} could not be read with torch.load(weights_only=True) ({_first_line(exc)}); "
            "convert it to safetensors in a trusted environment"
        ) from None
    except Exception as exc:  # a truncated zip archive, a file that is not a checkpoint at all
        raise ModelFolderError(
            f"{path} cannot be read as a PyTorch checkpoint ({_first_line(exc)}): the file is truncated or corrupt; "
            "re-download or re-save it"
        ) from None
    if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
        raise ModelFolderError(f"{path} does not hold a state dict of tensors; re-download or re-save it")
    return part


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def plora_rank_from_weights(state: dict[str, torch.Tensor]) -> int | None:
    """The Partial-LoRA rank stored in the weights (rows of any ``Plora_A``), or None when absent."""
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("Plora_A.weight")}
    if not ranks:
        return None
    if len(ranks) > 1:
        raise XcftError(f"the checkpoint mixes Partial-LoRA ranks {sorted(ranks)}; every Plora_A must have the same rows")
    return ranks.pop()


def resize_position_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """A CLIP position table ``[1 + g*g, D]`` resized to ``[1 + grid*grid, D]``.

    The class row stays first; the g x g part is interpolated bicubically (align_corners
    False) in float32, as the official code does for the 577-row CLIP-336 table.
    """
    rows, dim = table.shape
    old = math.isqrt(rows - 1)
    if old * old != rows - 1:
        raise XcftError(f"the CLIP position table has {rows} rows, not a square grid plus a class row")
    if old == grid:
        return table
    cls_row, grid_rows = table[:1], table[1:]
    pos = grid_rows.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
    pos = pos.permute(0, 2, 3, 1).reshape(grid * grid, dim).to(table.dtype)
    return torch.cat([cls_row, pos], dim=0)


def detect_family(
    state: dict[str, torch.Tensor], declared: str | None = None, source: str = "checkpoint"
) -> tuple[str, int | None]:
    """``(family, img_size)`` of a checkpoint, read from its tensors.

    2.5 checkpoints have the two separators ``plora_glb_GN``/``plora_sub_GN`` and a projector
    whose input is four tower widths (2x2 merged patches); 2.0 checkpoints have neither. Both
    signs must agree. For 2.5 the view size follows from the position table (used as stored:
    1601 rows = 40 x 40 patches of 14 px = 560 px); for 2.0 ``img_size`` stays the config's
    (None). ``declared`` is a ``family`` already in ``config.json`` (our own folders): it must match.
    A state without vision tensors keeps the declared family (2.0 when none).
    """
    present = [k for k in SEPARATOR_KEYS if k in state]
    if len(present) == 1:
        raise XcftError(f"{source} has {present[0]} but not its partner: a 2.5 checkpoint has both {list(SEPARATOR_KEYS)}")
    signs: dict[str, str] = {}
    if present:
        signs["separator tensors"] = FAMILY_2_5
    elif PROJECTOR_KEY in state:
        signs["no separator tensors"] = FAMILY_2_0
    if PROJECTOR_KEY in state and PATCH_KEY in state:
        tower, proj_in = state[PATCH_KEY].shape[0], state[PROJECTOR_KEY].shape[1]
        if proj_in == 4 * tower:
            signs[f"projector input {proj_in} = 4 x tower width {tower}"] = FAMILY_2_5
        elif proj_in == tower:
            signs[f"projector input {proj_in} = tower width"] = FAMILY_2_0
        else:
            raise XcftError(f"{source}: projector input width {proj_in} is neither the tower width {tower} (2.0) nor 4x it (2.5)")
    families = set(signs.values())
    if len(families) > 1:
        raise XcftError(f"{source} mixes 2.0 and 2.5 signs: {signs}; the checkpoint is inconsistent")
    if not families:
        return declared or FAMILY_2_0, None
    family = families.pop()
    if declared is not None and declared != family:
        raise XcftError(f"{source}: config.json says family {declared!r} but the weights are {family} ({', '.join(signs)})")
    img_size = None
    if family == FAMILY_2_5 and POSITION_KEY in state and PATCH_KEY in state:
        rows = state[POSITION_KEY].shape[0]
        grid = math.isqrt(rows - 1)
        if grid * grid != rows - 1 or grid % 2:
            raise XcftError(f"{source}: the 2.5 position table has {rows} rows; it needs an even square grid plus a class row")
        img_size = grid * state[PATCH_KEY].shape[-1]
    logger.info("model family %s (%s)%s", family, ", ".join(signs), f", view {img_size} px" if img_size else "")
    return family, img_size


# ============================================================================ config + model


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json and friends); anything else is one error line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFolderError(f"{path} is not UTF-8 text (byte offset {exc.start}); re-download or fix the file") from None
    except OSError as exc:
        raise ModelFolderError(f"{path} cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFolderError(
            f"{path} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); re-download or fix the file"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise ModelFolderError(f"{path} cannot be parsed ({_first_line(exc)}); re-download or fix the file") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(type(data), "null")
        raise ModelFolderError(f"{path} holds {kind}, not a JSON object; re-download or fix the file")
    return data


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "dict": (dict,),
    "PreTrainedConfig": (dict,),
    "None": (type(None),),
}


def check_config_types(raw: dict[str, Any], path: str | os.PathLike) -> None:
    """Every field of :class:`XComposer2Config` present in ``raw`` has a JSON value of its declared type.

    Catches ``"hidden_size": "4096"`` or ``"img_size": [490]`` as one line naming the field,
    instead of a failure deep inside model construction.
    """
    for key, annotation in XComposer2Config.__annotations__.items():
        if key not in raw or not isinstance(annotation, str):
            continue
        names = [part.strip() for part in annotation.split("|")]
        allowed: tuple[type, ...] = ()
        for name in names:
            base = name.split("[", 1)[0]
            if base == "list":
                allowed += (list,)
            elif base in _JSON_TYPES:
                allowed += _JSON_TYPES[base]
            else:
                allowed = ()
                break
        if not allowed:
            continue
        value = raw[key]
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed)
        if not ok:
            expected = " or ".join(
                "null" if n == "None" else "an object" if n in ("dict", "PreTrainedConfig") else n for n in names
            )
            raise ModelFolderError(
                f"{path}: field {key!r} is {json.dumps(value)[:80]} ({type(value).__name__}); expected {expected}. "
                "Fix the file or re-download the checkpoint"
            )


def load_config(folder: str | os.PathLike, **overrides: Any) -> XComposer2Config:
    """Our configuration for an official or own folder; any problem with the files is one error line.

    ``overrides`` replace ``config.json`` values before the configuration is built, so derived
    values (the vision tower's image size from ``img_size``) follow them.
    """
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFolderError(f"{folder} has no config.json; pass a model folder (official checkpoint or xcft output)")
    raw = read_json_object(path)
    check_config_types(raw, path)
    if raw.get("vision_config") is None and (folder / VISION_CONFIG_FILE).is_file():
        read_json_object(folder / VISION_CONFIG_FILE)
    try:
        config_dict, _ = XComposer2Config.get_config_dict(str(folder))
        config_dict.update(overrides)
        return XComposer2Config.from_dict(config_dict)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelFolderError(f"{path}: {_first_line(exc)}; fix the file or re-download the checkpoint") from None


def build_from_state_dict(
    config: XComposer2Config,
    state: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device,
    source: str = "checkpoint",
) -> XComposer2ForCausalLM:
    """Build the model on the meta device and assign ``state`` (adapted) with strict key checks.

    ``state`` is consumed: each tensor leaves the dict as its converted copy is made, so a dtype
    change never holds two full copies of the weights.
    """
    if POSITION_KEY in state:
        state[POSITION_KEY] = resize_position_table(state[POSITION_KEY], config.vision_grid)
    if any(k in state for k in (PATCH_KEY, POSITION_KEY)):
        for key in POST_LAYERNORM_KEYS:  # never applied and always frozen: the identity LayerNorm init
            if key not in state:
                assert isinstance(config.vision_config, PreTrainedConfig), "XComposer2Config builds it"
                width = config.vision_config.hidden_size
                state[key] = torch.ones(width) if key.endswith("weight") else torch.zeros(width)
    with torch.device("meta"):
        model = XComposer2ForCausalLM(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise XcftError(
            f"{source} does not match the XComposer2 layout of its config.json: "
            f"{len(missing)} missing tensors {missing[:6]}, {len(unexpected)} unexpected tensors {unexpected[:6]}"
        )
    own = model.state_dict()
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise XcftError(
                f"{source}: tensor {key} has shape {tuple(value.shape)} but config.json implies {tuple(own[key].shape)}"
            )
    converted = {}
    for key in list(state):
        value = state.pop(key)
        converted[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        del value
    model.load_state_dict(converted, strict=True, assign=True)
    materialize_non_persistent_buffers(model, device)
    return model.eval()


def load_model(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
) -> XComposer2ForCausalLM:
    """The model of an official folder or an xcft output folder (no remote code, no download)."""
    folder = Path(path)
    config = load_config(folder)  # checks config.json before any weight is read
    state = read_state_dict(folder)
    raw = read_json_object(folder / "config.json")
    family, img_size = detect_family(state, raw.get("family"), source=str(folder))
    overrides: dict[str, Any] = {}
    if family != config.family:
        overrides["family"] = family
    if img_size is not None:
        if raw.get("img_size") not in (None, img_size):
            raise XcftError(
                f"{folder / 'config.json'} says img_size {raw['img_size']} but the 2.5 position table is for {img_size} px"
            )
        overrides["img_size"] = img_size
    if overrides:
        config = load_config(folder, **overrides)
    rank = plora_rank_from_weights(state)
    if rank is not None and rank != config.plora_r:
        logger.info("Partial-LoRA rank %d read from the weights (config said %d)", rank, config.plora_r)
        config.plora_r = rank
    if rank is not None and "plora_alpha" not in raw:
        config.plora_alpha = float(rank)  # released models: alpha == r (scale 1.0)
    torch_dtype = resolve_dtype(dtype, default=_stored_dtype(config))
    dev = resolve_device(device)
    config._attn_implementation = attn_implementation or default_attn_implementation(dev, torch_dtype)
    model = build_from_state_dict(config, state, dtype=torch_dtype, device=dev, source=str(folder))
    model.config.dtype = torch_dtype
    return model


def _stored_dtype(config: XComposer2Config) -> torch.dtype:
    stored = getattr(config, "dtype", None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def load_tokenizer(path: str | os.PathLike):
    """The InternLM2 tokenizer of a folder (its ``tokenizer.model``)."""
    model_file = Path(path) / "tokenizer.model"
    if not model_file.is_file():
        raise ModelFolderError(f"{path} has no tokenizer.model; copy the InternLM2 tokenizer.model into the folder")
    try:
        return InternLM2Tokenizer.from_model_file(model_file)
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError for a file it cannot parse
        raise ModelFolderError(
            f"{model_file} is not a usable SentencePiece model ({_first_line(exc)}); copy the InternLM2 tokenizer.model again"
        ) from None


def load_pretrained(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    bits: int = 16,
):
    """``(model, tokenizer)`` from an official checkpoint folder or an xcft output folder.

    ``dtype`` None keeps the stored dtype (float32 when unknown); ``device`` None picks cuda
    when available. The model is in eval mode. A LoRA adapter folder (``adapter_config.json``)
    gives its base with the adapter merged in (:func:`load_adapter_folder`). ``bits`` 4 or 8
    stores the decoder linears with bitsandbytes (:mod:`xcft.model.quantization`, NF4 with double
    quantization for 4; ``dtype`` is then the compute dtype); an adapter then stays a separate
    branch on the quantized model instead of being merged.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist")
    if is_adapter_folder(folder):
        return load_adapter_folder(folder, dtype=dtype, device=device, bits=bits)
    load_config(folder)  # the cheap checks first: a broken config or a missing tokenizer costs no weight load
    tokenizer = load_tokenizer(folder)
    model = _load_model_bits(folder, dtype=dtype, device=device, attn_implementation=attn_implementation, bits=bits)
    return model, tokenizer


def _load_model_bits(
    folder: Path,
    *,
    dtype: str | torch.dtype | None,
    device: str | torch.device | None,
    attn_implementation: str | None = None,
    bits: int = 16,
) -> XComposer2ForCausalLM:
    """:func:`load_model`; with ``bits`` 4/8 read on the CPU, then quantized onto ``device`` linear by linear.

    The full-precision weights never reach the accelerator in one piece.
    """
    if bits == 16:
        return load_model(folder, dtype=dtype, device=device, attn_implementation=attn_implementation)
    from xcft.model.quantization import quantize_model, require_bitsandbytes

    require_bitsandbytes()
    dev = resolve_device(device)
    model = load_model(folder, dtype=dtype, device="cpu", attn_implementation=attn_implementation)
    if attn_implementation is None:
        model.set_attn_implementation(default_attn_implementation(dev, model.dtype))
    return quantize_model(model, bits=bits, compute_dtype=model.dtype, device=dev).eval()


# ============================================================================ LoRA adapter folders


def adapter_base_path(adapter_dir: str | os.PathLike, base: str | None = None) -> Path:
    """The base model folder of an adapter: ``base`` when given, else the one its adapter_config.json names.

    A relative name is tried against the current directory, then against the adapter folder.
    """
    adapter_dir = Path(adapter_dir)
    conf_path = adapter_dir / ADAPTER_CONFIG
    if not conf_path.is_file():
        raise XcftError(f"{adapter_dir} is not a LoRA adapter folder (no {ADAPTER_CONFIG}); pass the output of a --use_lora run")
    if base:
        chosen = Path(base)
    else:
        named = read_json_object(conf_path).get("base_model_name_or_path")
        if named is not None and not isinstance(named, str):
            raise ModelFolderError(
                f"{conf_path}: base_model_name_or_path is {named!r}, not a folder name; pass the base folder with --base"
            )
        if not named:
            raise XcftError(f"{conf_path} names no base model (base_model_name_or_path); pass the base folder with --base")
        chosen = Path(named)
        if not chosen.is_absolute() and not chosen.is_dir() and (adapter_dir / chosen).is_dir():
            chosen = adapter_dir / chosen
    if not chosen.is_dir():
        raise XcftError(f"base model folder {chosen} of adapter {adapter_dir} does not exist; pass the base folder with --base")
    return chosen.resolve()


def load_adapter_model(
    adapter_dir: str | os.PathLike,
    *,
    base: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    bits: int = 16,
) -> tuple[Any, Any, Path]:
    """``(peft_model, tokenizer, base_path)``: the base read with our classes, the adapter on top (eval mode).

    Works for any base folder, including an official checkpoint whose own remote code would need
    an old transformers: the base is read by our classes and peft applies the adapter on top.
    ``bits`` 4/8 quantizes the base's decoder linears first (peft's k-bit LoRA layers go on top).
    """
    adapter_dir = Path(adapter_dir)
    base_path = adapter_base_path(adapter_dir, base)
    model = _load_model_bits(base_path, dtype=dtype, device=device, bits=bits)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # peft: ValueError/KeyError for mismatches; safetensors errors for a broken file
        raise ModelFolderError(f"cannot apply the adapter {adapter_dir} to the base {base_path}: {_first_line(exc)}") from None
    peft_model.to(model.device)
    tok_dir = adapter_dir if (adapter_dir / "tokenizer.model").is_file() else base_path
    return peft_model.eval(), load_tokenizer(tok_dir), base_path


def load_adapter_folder(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    bits: int = 16,
) -> tuple[XComposer2ForCausalLM, Any]:
    """``(model, tokenizer)`` for an adapter folder: base + adapter merged into a plain XComposer2 model.

    Merging gives a model with ``chat``/``generate`` and the same outputs as base + adapter. On a
    quantized base (``bits`` 4/8) the adapter is not merged (that would round it into the quantized
    weights): the returned XComposer2 model holds peft's LoRA layers, as in QLoRA training.
    """
    peft_model, tokenizer, base_path = load_adapter_model(path, dtype=dtype, device=device, bits=bits)
    if bits != 16:
        logger.info("loaded LoRA adapter %s on base %s (%d-bit base, adapter kept as a separate branch)", path, base_path, bits)
        return peft_model.get_base_model().eval(), tokenizer
    logger.info("loaded LoRA adapter %s on base %s (merged for inference)", path, base_path)
    return peft_model.merge_and_unload().eval(), tokenizer


# ============================================================================ saving


def name_model_code(config: Any) -> None:
    """Make the config.json that ``save_pretrained`` writes point at our model code (``auto_map``)."""
    config.architectures = ["XComposer2ForCausalLM"]
    config.auto_map = dict(AUTO_MAP)


def write_model_code(folder: str | os.PathLike) -> None:
    """Copy the self-contained model/config/tokenizer/image files into a saved folder."""
    for name in SELF_CONTAINED_FILES:
        src = MODEL_DIR / name
        if not src.is_file():
            raise XcftError(f"cannot write a self-contained folder: {src} is missing from the xcft installation")
        shutil.copyfile(src, Path(folder) / name)


def save_pretrained(
    model: XComposer2ForCausalLM,
    tokenizer: Any,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    command: str = "save",
) -> Path:
    """Write a self-contained model folder (see module docstring); returns its path.

    The folder appears complete or not at all: everything goes to a temporary sibling first,
    starting with xcft's marker (:mod:`xcft.output_dir`). ``output`` must be new or empty;
    ``overwrite`` replaces an earlier xcft output, never a folder holding anything else. A full
    disk or another I/O failure is one :class:`~xcft.errors.SaveError` line and leaves nothing behind.
    """
    out = Path(output).resolve()
    check_output_folder(out, flag="output folder")
    if out.is_dir() and any(out.iterdir()):
        foreign = foreign_entries(out)
        if not overwrite or foreign:
            raise OutputFolderError(
                f"output folder {out} already holds an earlier xcft output"
                + (f" and files xcft did not write ({', '.join(foreign[:3])})" if foreign else "")
                + "; choose a new or empty folder"
            )
    tmp = staging_dir(out.parent, out.name)
    try:
        with save_errors(
            "the model folder",
            out,
            remains=lambda: f"nothing was written to {out}",
            cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True),
        ):
            write_marker(tmp, command)  # first, so that even a half-written folder is recognisably xcft's
            name_model_code(model.config)
            model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
            write_model_code(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            _check_saved_names(model, tmp)
            write_marker(tmp, command, [c.name for c in tmp.iterdir() if not c.name.startswith(".xcft")])
            _set_default_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved model folder %s", out)
    return out


def _set_default_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the result the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _check_saved_names(model: XComposer2ForCausalLM, folder: Path) -> None:
    """The written tensors carry exactly the model's (official) state-dict names."""
    names: set[str] = set()
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as fh:
            names.update(fh.keys())
    expected = set(model.state_dict())
    if names != expected:
        raise RuntimeError(
            f"saved tensor names differ from the model's: missing {sorted(expected - names)[:5]}, "
            f"extra {sorted(names - expected)[:5]}"
        )


__all__ = [
    "adapter_base_path",
    "build_from_state_dict",
    "check_config_types",
    "detect_family",
    "is_adapter_folder",
    "load_adapter_model",
    "load_config",
    "load_model",
    "load_pretrained",
    "load_tokenizer",
    "name_model_code",
    "plora_rank_from_weights",
    "read_json_object",
    "read_state_dict",
    "resize_position_table",
    "resolve_device",
    "resolve_dtype",
    "save_pretrained",
    "unwrap_model",
    "write_model_code",
]

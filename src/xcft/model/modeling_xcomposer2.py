"""InternLM-XComposer2: InternLM2 decoder with Partial LoRA, CLIP vision tower and projector.

Self-contained (standard library, torch, PIL, transformers and relative imports only):
``save_pretrained`` copies this file into model folders loaded with ``trust_remote_code``.

Read top to bottom in dependency order: RMSNorm -> rotary embedding (dynamic NTK) -> Partial-LoRA linear ->
attention -> MLP -> decoder layer -> decoder -> vision tower -> XComposer2ForCausalLM.
State-dict names are exactly the official ones, so official checkpoint folders load with no
missing or unexpected key.

One class serves both families (``config.family``). 2.0: one view per image, one token per
patch. 2.5: per image a global view and a grid of crops, 2x2 patch merge, separator tokens
``plora_glb_GN`` / ``plora_sub_GN`` (only 2.5 models have them), dynamic-NTK RoPE.

Batch contract (docs/ARCHITECTURE.md): ``input_ids`` hold the pad id at image slots,
``image_mask`` is True there (and selects where Partial LoRA applies), ``pixel_values`` holds
every image (2.0) or every view (2.5, with ``image_grids``) of the batch in row order, and the
model checks that the slot count equals the images' token counts before splicing the projected
features in with ``masked_scatter``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_xcomposer2 import XComposer2Config
from .template_xcomposer2 import (
    FAMILY_DEFAULT,
    IMAGE_PLACEHOLDER,
    OFFICIAL_GENERATION,
    TURN_END,
    bos_per_piece_default,
    chat_prompt,
    default_system_prompt,
    place_images,
)

logger = logging.getLogger(__name__)


def _cache_name(names: Any) -> str:
    """``cache`` where the installed transformers has it, else ``past_key_values`` (its name up to 5.17).

    Detected from signatures / output fields rather than the version string (compat with 5.17).
    """
    return "cache" if "cache" in names else "past_key_values"


_MASK_CACHE_ARG = _cache_name(inspect.signature(create_causal_mask).parameters)
_BASE_OUTPUT_CACHE = _cache_name({f.name for f in dataclasses.fields(BaseModelOutputWithPast)})
_LM_OUTPUT_CACHE = _cache_name({f.name for f in dataclasses.fields(CausalLMOutputWithPast)})

IGNORE_INDEX = -100


# ============================================================================ norm


class XComposer2RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as the official InternLM2), scaled in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


# ============================================================================ rotary


def _rope_inv_freq(base: float, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``1 / base^(2i/d)`` in float32, as the official InternLM2 computes it."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))


def dynamic_ntk_base(theta: float, dim: int, factor: float, max_positions: int, seq_len: int) -> float:
    """The official dynamic-NTK RoPE base for a sequence of ``seq_len`` positions (theta itself up to ``max_positions``)."""
    if seq_len <= max_positions:
        return theta
    return theta * ((factor * seq_len / max_positions) - (factor - 1)) ** (dim / (dim - 2))


def segment_lengths(position_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per position, the length of the sequence it belongs to: the largest ``position + 1`` of its segment.

    A segment is a run of increasing positions (packed rows restart at 0); positions where ``valid``
    is False (padding) do not count, so a padded row gets the length it has alone.
    """
    pos = position_ids
    restart = torch.ones_like(pos, dtype=torch.bool)
    restart[:, 1:] = pos[:, 1:] <= pos[:, :-1]
    segment = restart.long().cumsum(dim=1) - 1
    ends = pos + 1 if valid is None else (pos + 1) * valid.to(pos.dtype)
    longest = torch.zeros_like(pos).scatter_reduce(1, segment, ends, reduce="amax", include_self=True)
    return longest.gather(1, segment).clamp(min=1)


class XComposer2RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with inverse frequencies 1/theta^(2i/d), computed in float32.

    With ``rope_type: dynamic`` (the 2.5 release: factor 2 above 24576 positions) the base grows
    with the sequence length as in the official code. Unlike the official code, which keeps the
    enlarged base for every later call, the length is that of the current call's own sequence
    (per packed sample, padding excluded), so a result never depends on earlier calls.
    """

    def __init__(self, config: XComposer2Config, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        inv_freq, self.attention_scaling = self._init_parameters(device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(
        config: XComposer2Config, device: torch.device | str | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, float]:
        params = config.rope_parameters
        assert params is not None, "XComposer2Config.__post_init__ always sets rope_parameters"
        return _rope_inv_freq(params["rope_theta"], config.head_dim, device), 1.0

    def _init_parameters(self, device: torch.device | str | None) -> tuple[torch.Tensor, float]:
        """The frequencies at short lengths (dynamic NTK starts from the plain ones)."""
        if self.rope_type in ("default", "dynamic"):
            return self.compute_default_rope_parameters(self.config, device)
        return ROPE_INIT_FUNCTIONS[self.rope_type](self.config, device)

    def reset_inv_freq(self, device: torch.device | str | None = None) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building the model on the meta device."""
        inv_freq, self.attention_scaling = self._init_parameters(device)
        self.inv_freq = inv_freq
        self.original_inv_freq = inv_freq.clone()

    def _dynamic_inv_freq(self, position_ids: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Per position ``[B, L, d/2]`` frequencies from the NTK base of the sequence each position is in."""
        params = self.config.rope_parameters
        assert params is not None, "XComposer2Config.__post_init__ always sets rope_parameters"
        lengths = segment_lengths(position_ids, valid)
        unique, inverse = torch.unique(lengths, return_inverse=True)
        table = torch.stack(
            [
                _rope_inv_freq(
                    dynamic_ntk_base(
                        params["rope_theta"],
                        self.config.head_dim,
                        float(params["factor"]),
                        self.config.max_position_embeddings,
                        int(n),
                    ),
                    self.config.head_dim,
                    position_ids.device,
                )
                for n in unique.tolist()
            ]
        )
        return table[inverse]

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, total_len: int | None = None, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at ``position_ids``. ``total_len`` (cached + current positions) and ``valid``
        ([B, L] attention mask of the current positions) matter only for dynamic NTK, which, as in
        the official code, acts only when ``total_len`` exceeds ``max_position_embeddings``."""
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32)
        if self.rope_type == "dynamic" and total_len is not None and total_len > self.config.max_position_embeddings:
            inv_freq = self._dynamic_inv_freq(position_ids.expand(x.shape[0], -1), valid)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


# ============================================================================ Partial LoRA


# -- row gather / add for the unique, sorted image indices. Same values as
# index_select / index_add, but the backward of index_select (and index_add itself) accumulate
# through a serial scatter-add on CPU (~7x slower than a copy); unique indices need no accumulation.
class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` for unique ``index``; backward copies rows back (index_copy)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        return grad.new_zeros((ctx.rows, grad.shape[1])).index_copy_(0, index, grad), None


class _AddRows(torch.autograd.Function):
    """``out.index_add(0, index, delta)`` for unique ``index`` (bit-identical: the same one addition per element)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        return out.index_copy(0, index, out.index_select(0, index) + delta)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        (index,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, index)


# -- end bench/perf


class PLoRALinear(nn.Linear):
    """A linear layer whose output gets ``Plora_B(Plora_A(dropout(x))) * alpha / r`` added at image positions.

    ``plora_index`` holds the flat (batch * seq) indices of image positions; ``None`` means no
    image position, and text positions never get the branch. In training without any image
    position, a zero-weighted branch on one position keeps ``Plora_A``/``Plora_B`` in the
    autograd graph, so DDP (without ``find_unused_parameters``) and ZeRO see a gradient for
    every parameter on every rank, as the official code does.

    The base output comes from ``super().forward``: ``nn.Linear`` here, the bitsandbytes 4-/8-bit
    matmul in the quantized subclasses of :mod:`xcft.model.quantized_linear` (``--bits 4``), so the
    Partial-LoRA branch below is the same code for both.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        lora_r: int = 256,
        lora_alpha: float = 256.0,
        lora_dropout: float = 0.05,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_scaling = float(lora_alpha) / float(lora_r)
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.Plora_A = nn.Linear(in_features, lora_r, bias=False)
        self.Plora_B = nn.Linear(lora_r, out_features, bias=False)

    def forward(self, x: torch.Tensor, plora_index: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x)
        if plora_index is None:
            if self.training and torch.is_grad_enabled():
                out = out + 0.0 * self.Plora_B(self.Plora_A(x[..., :1, :])).sum()
            return out
        shape = out.shape
        selected = _GatherRows.apply(x.reshape(-1, x.shape[-1]), plora_index)
        delta = self.Plora_B(self.Plora_A(self.lora_dropout(selected))) * self.lora_scaling
        return _AddRows.apply(out.reshape(-1, shape[-1]), plora_index, delta.to(out.dtype)).view(shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_r={self.lora_r}, lora_alpha={self.lora_alpha}"


# ============================================================================ attention


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, L, D] -> [B, kv_heads * n_rep, L, D]."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention (float32 softmax), the fallback when no other backend is chosen."""
    n_rep = cast(int, module.num_key_value_groups)  # an int attribute; nn.Module's stubs type it Tensor | Module
    key_states = repeat_kv(key, n_rep)
    value_states = repeat_kv(value, n_rep)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class XComposer2Attention(nn.Module):
    """Grouped-query attention with a fused ``wqkv``.

    For each key/value head the fused rows hold its G = heads / kv_heads query heads, then its
    key, then its value (head_dim rows each); query head index = kv_head * G + g.
    """

    def __init__(self, config: XComposer2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        assert config.num_key_value_heads is not None, "XComposer2Config.__post_init__ defaults it to the head count"
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        plora: dict[str, Any] = dict(lora_r=config.plora_r, lora_alpha=config.plora_alpha, lora_dropout=config.plora_dropout)
        self.wqkv = PLoRALinear(
            config.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim, bias=config.bias, **plora
        )
        self.wo = PLoRALinear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias, **plora)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        plora_index: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, q_len, _ = hidden_states.shape
        groups = self.num_key_value_groups
        qkv = self.wqkv(hidden_states, plora_index).view(bsz, q_len, self.num_key_value_heads, groups + 2, self.head_dim)
        query_states = qkv[..., :groups, :].reshape(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key_states = qkv[..., groups, :].transpose(1, 2)
        value_states = qkv[..., groups + 1, :].transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(bsz, q_len, -1).contiguous()
        return self.wo(attn_output, plora_index), attn_weights


# ============================================================================ MLP


class XComposer2MLP(nn.Module):
    """SwiGLU feed-forward: ``w2(silu(w1(x)) * w3(x))``, every linear with Partial LoRA."""

    def __init__(self, config: XComposer2Config) -> None:
        super().__init__()
        plora: dict[str, Any] = dict(lora_r=config.plora_r, lora_alpha=config.plora_alpha, lora_dropout=config.plora_dropout)
        self.w1 = PLoRALinear(config.hidden_size, config.intermediate_size, bias=False, **plora)
        self.w3 = PLoRALinear(config.hidden_size, config.intermediate_size, bias=False, **plora)
        self.w2 = PLoRALinear(config.intermediate_size, config.hidden_size, bias=False, **plora)
        self.act_fn = nn.SiLU() if config.hidden_act == "silu" else _activation(config.hidden_act)

    def forward(self, x: torch.Tensor, plora_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x, plora_index)) * self.w3(x, plora_index), plora_index)


def _activation(name: str) -> nn.Module:
    return ACT2FN[name]


# ============================================================================ decoder layer


class XComposer2DecoderLayer(GradientCheckpointingLayer):
    """``x + wo(attn(norm(x)))`` then ``x + mlp(norm(x))``; checkpointed when gradient checkpointing is on."""

    def __init__(self, config: XComposer2Config, layer_idx: int) -> None:
        super().__init__()
        self.attention = XComposer2Attention(config, layer_idx)
        self.feed_forward = XComposer2MLP(config)
        self.attention_norm = XComposer2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = XComposer2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        plora_index: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.attention(
            self.attention_norm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            plora_index=plora_index,
            position_ids=position_ids,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.feed_forward(self.ffn_norm(hidden_states), plora_index)
        return residual + hidden_states


# ============================================================================ pretrained base


class XComposer2PreTrainedModel(PreTrainedModel):
    config_class = XComposer2Config
    config: XComposer2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["XComposer2DecoderLayer", "CLIPEncoderLayer"]  # noqa: RUF012 (transformers declares it an instance attribute, so not a ClassVar)
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, XComposer2RotaryEmbedding):
            inv_freq, _ = module._init_parameters(None)
            with torch.no_grad():
                module.inv_freq.copy_(inv_freq)
                module.original_inv_freq.copy_(inv_freq)


# ============================================================================ decoder


def flat_image_index(image_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Flat (batch * seq) indices of True positions, or None when there is none (one host sync)."""
    if image_mask is None:
        return None
    index = image_mask.reshape(-1).nonzero().squeeze(1)
    return index if index.numel() else None


class XComposer2Model(XComposer2PreTrainedModel):
    """The InternLM2 decoder (embeddings, layers, final norm); Partial LoRA acts where ``image_mask`` is True."""

    def __init__(self, config: XComposer2Config) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([XComposer2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = XComposer2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = XComposer2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    # The base class takes any nn.Module; the decoder needs an nn.Embedding (its .weight is read).
    def set_input_embeddings(self, value: nn.Embedding) -> None:  # type: ignore[override]
        self.tok_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        image_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """``image_mask`` must have the shape of the current input ([B, q_len]); it only selects Partial LoRA."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_seen = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            positions = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)
            position_ids = cast(torch.LongTensor, positions)  # torch's stubs have no integer-tensor type

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_MASK_CACHE_ARG: cache},
        )
        plora_index = flat_image_index(image_mask)
        hidden_states = inputs_embeds
        q_len = inputs_embeds.shape[1]
        valid = attention_mask[:, -q_len:] if attention_mask is not None and attention_mask.dim() == 2 else None
        position_embeddings = self.rotary_emb(hidden_states, position_ids, past_seen + q_len, valid)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                plora_index=plora_index,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        cache_output: dict[str, Any] = {_BASE_OUTPUT_CACHE: cache if use_cache else None}
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **cache_output)


# ============================================================================ vision


class XComposer2VisionTower(nn.Module):
    """CLIP vision transformer; features = last encoder layer, class token dropped, no post-layernorm.

    The CLIP position grid is built for ``config.img_size`` (the configuration keeps the vision
    ``image_size`` equal to ``img_size``); loaders interpolate a stored 577-row CLIP-336 table.
    ``post_layernorm`` only feeds CLIP's pooled output, which no feature uses; in training its
    output joins the graph with weight zero, so that DDP without ``find_unused_parameters``
    sees a (zero) gradient for it when the tower is trainable. Features are unchanged.
    """

    def __init__(self, config: XComposer2Config) -> None:
        super().__init__()
        assert isinstance(config.vision_config, CLIPVisionConfig), "XComposer2Config.__post_init__ builds it"
        self.vision_tower = _CLIPHolder(CLIPVisionModel(config.vision_config))

    @property
    def clip(self) -> CLIPVisionModel:
        return self.vision_tower.vision_model

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.embeddings.patch_embedding.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # A frozen tower needs no graph: without one, activation checkpointing (which wraps the CLIP
        # layers too) would still keep every layer's input until the backward.
        frozen = not pixel_values.requires_grad and not any(p.requires_grad for p in self.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            outputs = self.clip(pixel_values=pixel_values.to(self.dtype))
        features = outputs.last_hidden_state[:, 1:]
        if self.training and torch.is_grad_enabled():
            features = features + 0.0 * outputs.pooler_output.sum()
        return features


class _CLIPHolder(nn.Module):
    """Holds the CLIP model under ``vision_model`` so state-dict names are the official
    ``vit.vision_tower.vision_model.*`` (transformers 5's CLIPVisionModel has its layers at top level)."""

    def __init__(self, vision_model: CLIPVisionModel) -> None:
        super().__init__()
        self.vision_model = vision_model


# ============================================================================ causal LM


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Cross-entropy of ``logits[:, :-1]`` against ``labels[:, 1:]`` (float32), ignoring -100.

    Mean over the supervised tokens of the batch, or their sum divided by
    ``num_items_in_batch`` when given (the Trainer's count over all micro-batches / ranks).
    A batch with no supervised token gives 0 (with a graph) rather than NaN.
    """
    shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    return _reduce_ce(shift_logits, shift_labels, num_items_in_batch)


def _logit_group_losses(logits: torch.Tensor, labels: torch.Tensor, loss_groups: torch.Tensor) -> torch.Tensor:
    """``[G, 2]``: per group of ``loss_groups`` (at the target positions) the summed cross-entropy and target count."""
    with torch.no_grad():
        flat = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
        targets = labels[:, 1:].reshape(-1).to(flat.device)
        token_ce = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="none")
        groups = loss_groups[:, 1:].reshape(-1).to(flat.device)
        keep = (targets != IGNORE_INDEX) & (groups >= 0)
        groups, token_ce = groups[keep], token_ce[keep]
        table = torch.zeros(int(groups.max()) + 1 if groups.numel() else 0, 2, device=flat.device)
        table[:, 0].index_add_(0, groups, token_ce)
        table[:, 1].index_add_(0, groups, torch.ones_like(token_ce))
        return table


def _ce_denominator(targets: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor | int:
    """What the summed token cross-entropy is divided by: the Trainer's count, else this batch's targets."""
    if num_items_in_batch is None:
        return (targets != IGNORE_INDEX).sum().clamp(min=1)
    return num_items_in_batch.to(targets.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch


def _reduce_ce(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / _ce_denominator(targets, num_items_in_batch)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, computed by row chunks.

    Why: the plain head keeps a float32 ``[rows, vocab]`` logits tensor, its log-softmax and their
    gradient alive until backward (three 1.5 GB tensors for 4k supervised targets at the real
    vocabulary). Here each chunk's logits turn into ``softmax - onehot`` in place and are consumed
    at once by the two gradient matmuls, so at most one ``[chunk_rows, vocab]`` float32 tensor
    exists at a time; backward only scales the stored gradients. Same FLOPs as the plain head.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = None  # the weight in the matmul dtype (autocast may differ from the stored dtype)
        for start in range(0, hidden.shape[0], chunk_rows):
            x = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            raw = F.linear(x, weight)
            mm_dtype = raw.dtype
            logits = raw.float()
            del raw
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            # log-sum-exp in place (max, exp(logits - max), sum): the chunk's memory is reused and
            # the exponentials are the softmax numerators needed for the gradient below.
            row_max = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(row_max).exp_()
            row_sum = exps.sum(dim=-1, keepdim=True)
            total += (row_max.squeeze(1) + row_sum.log().squeeze(1) - target_logit).sum()
            if not (need_hidden or need_weight):
                del logits, exps
                continue
            # d(sum of token losses) / d(logits) = softmax - onehot, built in place;
            # then cast to the matmul dtype, as the plain head's backward does.
            grad_logits = exps.div_(row_sum)
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            g = grad_logits.to(mm_dtype)
            if w is None:
                w = weight.to(mm_dtype)
            if need_hidden:
                assert grad_hidden is not None  # allocated above when need_hidden
                grad_hidden[start : start + chunk_rows] = g @ w
            if need_weight:
                assert grad_weight is not None  # allocated above when need_weight
                xs = x.to(mm_dtype)
                if mm_dtype == torch.float32:
                    grad_weight.addmm_(g.t(), xs)
                else:
                    grad_weight += (g.t() @ xs).float()
            # free this chunk before the next one's logits exist (one chunk alive, not two)
            del logits, exps, grad_logits, g
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


class OutputHead(nn.Linear):
    """The untied output projection (official name ``output``; no bias).

    ``head(hidden)`` gives logits like any ``nn.Linear``. ``head(hidden, targets)`` gives the summed
    token cross-entropy through :class:`_LinearCrossEntropy` (the training head: no full logits
    tensor). Going through the module call keeps ZeRO-3's parameter gathering hooks working.
    """

    #: Rows per chunk of the training head: a float32 [1024, 92544] chunk is 380 MB.
    chunk_rows: int = 1024

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        if self.bias is not None:
            raise ValueError("the fused training head has no bias; the XComposer2 output layer never has one")
        return _LinearCrossEntropy.apply(hidden, self.weight, targets, self.chunk_rows)


@dataclasses.dataclass
class XComposer2CausalLMOutput(CausalLMOutputWithPast):
    """The causal-LM output, and ``group_losses`` [G, 2] when the forward was given ``loss_groups``."""

    group_losses: torch.Tensor | None = None


class XComposer2ForCausalLM(XComposer2PreTrainedModel, GenerationMixin):
    """InternLM-XComposer2 (VL): decoder + untied ``output`` head + ``vit`` + ``vision_proj``.

    ``accepts_loss_kwargs = True``: the Trainer passes ``num_items_in_batch`` and the loss is
    the summed token cross-entropy divided by it (no world-size scaling here).
    """

    accepts_loss_kwargs = True
    _tied_weights_keys: dict[str, str] = {}  # noqa: RUF012 (transformers declares it an instance attribute, so not a ClassVar)
    # Every save_pretrained of this class writes a self-contained folder: transformers copies this
    # file and the files it imports relatively (configuration, template, image processing) and
    # records them in config.json's auto_map, so AutoModelForCausalLM.from_pretrained(dir,
    # trust_remote_code=True) loads the folder in a process that never imported xcft.
    _auto_class = "AutoModelForCausalLM"

    def __init__(self, config: XComposer2Config) -> None:
        super().__init__(config)
        self.model = XComposer2Model(config)
        self.vocab_size = config.vocab_size
        # Typed as the base class: peft or resize_token_embeddings may put a plain nn.Linear here.
        self.output: nn.Linear = OutputHead(config.hidden_size, config.vocab_size, bias=False)
        self.vit = XComposer2VisionTower(config)
        projector_hidden = config.projector_hidden_size
        assert projector_hidden is not None, "XComposer2Config.__post_init__ defaults it to hidden_size"
        self.vision_proj = nn.Sequential(
            nn.Linear(config.projector_input_size, projector_hidden),
            nn.GELU(),
            nn.Linear(projector_hidden, config.hidden_size),
        )
        if config.hd:
            # The 2.5 separators: glb_GN between the global view and the crops, sub_GN after every
            # token row. Zeros at construction, as the official code (its init never touches them).
            width = config.projector_input_size
            self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, width))
            self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, width))
        self.post_init()
        generation_config = getattr(self, "generation_config", None)
        if generation_config is not None and generation_config.max_length == config.max_length:
            # The official config's max_length is the training token limit, not a generation length.
            generation_config.max_length = None

    # ------------------------------------------------------------------ accessors
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    # The base class takes any nn.Module; the decoder needs an nn.Embedding (its .weight is read).
    def set_input_embeddings(self, value: nn.Embedding) -> None:  # type: ignore[override]
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.output = new_embeddings

    @property
    def image_tokens(self) -> int:
        """Slots (feature vectors) per image."""
        return self.config.image_tokens

    # ------------------------------------------------------------------ images
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """2.0: [N, 3, S, S] pixels -> [N, image_tokens, hidden] projected features."""
        features = self.vit(pixel_values)
        return self.vision_proj(features.to(self._projector_dtype()))

    def _projector_dtype(self) -> torch.dtype:
        # a Linear's weight; nn.Sequential's stubs type its items' attributes Tensor | Module
        return cast(torch.Tensor, self.vision_proj[0].weight).dtype

    def merge_hd_tokens(self, pixel_values: torch.Tensor, image_grids: torch.Tensor) -> torch.Tensor:
        """2.5: all views of all images -> ``[tokens, 4 * tower width]`` merged tokens with separators, unprojected.

        ``pixel_values`` [V, 3, S, S] holds, image after image, its global view then its crops in
        row-major order; ``image_grids`` [N, 2] the (rows, cols) of each image. One tower call for
        every view. Per view the G x G patch features become (G/2) x (G/2) tokens of four patches,
        channels ordered (row offset, column offset, channel). Per image: the global view's token
        rows each followed by ``plora_sub_GN``, one ``plora_glb_GN``, then the crops stitched into
        one (rows*G/2) x (cols*G/2) grid whose rows are each followed by ``plora_sub_GN``.
        """
        grids = self._checked_grids(pixel_values, image_grids)
        features = self.vit(pixel_values)
        views, patches, width = features.shape
        grid = self.config.vision_grid
        if patches != grid * grid:
            raise ValueError(
                f"the tower gave {patches} patches per view, expected {grid * grid} (img_size {self.config.img_size})"
            )
        g = grid // 2
        merged = features.reshape(views, g, 2, g, 2, width).permute(0, 1, 3, 2, 4, 5).reshape(views, g, g, 4 * width)
        merged = merged.to(self.plora_sub_GN.dtype)
        sub_gn = self.plora_sub_GN.reshape(1, 1, 4 * width)
        glb_gn = self.plora_glb_GN.reshape(1, 4 * width)
        pieces: list[torch.Tensor] = []
        start = 0
        for h, w in grids:
            glb = torch.cat([merged[start], sub_gn.expand(g, 1, -1)], dim=1).reshape(-1, 4 * width)
            crops = merged[start + 1 : start + 1 + h * w].reshape(h, w, g, g, -1).permute(0, 2, 1, 3, 4)
            crops = crops.reshape(h * g, w * g, -1)
            sub = torch.cat([crops, sub_gn.expand(h * g, 1, -1)], dim=1).reshape(-1, 4 * width)
            pieces += [glb, glb_gn, sub]
            start += 1 + h * w
        return torch.cat(pieces, dim=0)

    @staticmethod
    def _checked_grids(pixel_values: torch.Tensor, image_grids: torch.Tensor) -> list[tuple[int, int]]:
        """``image_grids`` as a list, after checking that ``pixel_values`` holds exactly their views."""
        grids = [(int(h), int(w)) for h, w in image_grids.reshape(-1, 2).tolist()]
        expected_views = sum(1 + h * w for h, w in grids)
        if pixel_values.shape[0] != expected_views or min((min(g) for g in grids), default=1) < 1:
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} views but image_grids {grids} need {expected_views} "
                "(per image its global view, then rows x cols crops, each at least 1)"
            )
        return grids

    def get_hd_image_features(self, pixel_values: torch.Tensor, image_grids: torch.Tensor) -> torch.Tensor:
        """2.5: ``[tokens, hidden]``: :meth:`merge_hd_tokens` through the projector (separators included)."""
        tokens = self.merge_hd_tokens(pixel_values, image_grids)
        return self.vision_proj(tokens.to(self._projector_dtype()))

    def image_token_counts(self, image_grids: torch.Tensor | None, num_images: int) -> list[int]:
        """Token slots of each image: fixed for 2.0, from each crop grid for 2.5."""
        if not self.config.hd:
            return [self.image_tokens] * num_images
        assert image_grids is not None, "a 2.5 (HD) model's image sizes come from image_grids"
        return [self.config.hd_image_tokens(int(h), int(w)) for h, w in image_grids.tolist()]

    def splice_image_features(
        self,
        inputs_embeds: torch.Tensor,
        pixel_values: torch.Tensor,
        image_mask: torch.Tensor | None,
        image_counts: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Put the projected features of ``pixel_values`` (batch row order) at the ``image_mask`` slots.

        ``image_index`` [M]: for each image occurrence of the batch in row order, the index of its
        image in ``pixel_values`` (``image_grids``); an image used by several rows (the two answers
        of a preference pair) is then encoded once. Default: every image once, in order.
        """
        if image_mask is None:
            raise ValueError("pixel_values given without image_mask: the model cannot tell where the images go")
        hd = self.config.hd
        if hd and image_grids is None:
            raise ValueError("a 2.5 (HD) model needs image_grids [images, 2] (rows, cols) with pixel_values")
        if not hd and image_grids is not None:
            raise ValueError("image_grids is only for 2.5 (HD) models; this is a 2.0 model (config.family)")
        # From here on ``image_grids is not None`` exactly when ``hd``.
        if image_grids is not None:
            self._checked_grids(pixel_values, image_grids)
        num_encoded = int(image_grids.shape[0]) if image_grids is not None else int(pixel_values.shape[0])
        encoded_sizes = self.image_token_counts(image_grids, num_encoded)
        occurrences = list(range(num_encoded)) if image_index is None else [int(i) for i in image_index.tolist()]
        if any(not 0 <= i < num_encoded for i in occurrences):
            raise ValueError(f"image_index {occurrences} points outside the {num_encoded} images of pixel_values")
        per_image = [encoded_sizes[i] for i in occurrences]
        num_images = len(occurrences)
        slots = int(image_mask.sum())
        if slots != sum(per_image):
            what = (
                f"images with crop grids {image_grids.tolist()}"
                if image_grids is not None
                else f"images of {self.image_tokens} slots each"
            )
            raise ValueError(
                f"image_mask marks {slots} slots but pixel_values holds {num_images} {what} ({sum(per_image)}); "
                f"every image needs exactly its number of consecutive slots (img_size {self.config.img_size})"
            )
        if image_counts is not None:
            per_row = image_mask.sum(dim=1).to(image_counts.device)
            counts = [int(n) for n in image_counts.tolist()]
            if sum(counts) != num_images:
                raise ValueError(f"image_counts {counts} add up to {sum(counts)} but the batch has {num_images} images")
            wanted: list[int] = []
            start = 0
            for n in counts:
                wanted.append(sum(per_image[start : start + n]))
                start += n
            if per_row.tolist() != wanted:
                raise ValueError(f"image slots per row {per_row.tolist()} do not match the images of each row {wanted}")
        if image_grids is not None:
            features = self.get_hd_image_features(pixel_values, image_grids)
        else:
            features = self.get_image_features(pixel_values)
        features = features.to(inputs_embeds.dtype)
        if image_index is not None:
            pieces = features.reshape(-1, features.shape[-1]).split(encoded_sizes)
            features = torch.cat([pieces[i] for i in occurrences])
        mask = image_mask.to(inputs_embeds.device).unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, features.reshape(-1))

    @staticmethod
    def _align_image_mask(image_mask: torch.Tensor | None, past_len: int, q_len: int) -> torch.Tensor | None:
        """The image mask for the current input positions [past_len, past_len + q_len).

        Accepts a mask over the current input only, or over the whole sequence so far (as
        ``generate`` keeps passing the prompt's mask): a shorter mask is extended with False
        (generated tokens are text), then the last ``q_len`` columns are taken.
        """
        if image_mask is None:
            return None
        total = past_len + q_len
        if image_mask.shape[-1] == q_len:
            return image_mask.bool()
        if image_mask.shape[-1] < total:
            pad = image_mask.new_zeros((image_mask.shape[0], total - image_mask.shape[-1]))
            image_mask = torch.cat([image_mask, pad], dim=-1)
        return image_mask[:, -q_len:].bool()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        cache: Cache | None = None,
        supervised_logits_only: bool = False,
        loss_groups: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> XComposer2CausalLMOutput:
        """Loss = token cross-entropy of ``logits[:, :-1]`` vs ``labels[:, 1:]`` (see :func:`causal_lm_loss`).

        Images: see :meth:`splice_image_features` (2.5 models also take ``image_grids``; ``image_index``
        reuses an encoded image in several rows).
        ``cache`` is transformers 5's name for ``past_key_values``; either works. With
        ``supervised_logits_only`` in training (the trainer's choice), logits are computed only
        at supervised positions (the returned ``logits`` is then None). ``loss_groups`` ([B, L], the
        group of each position, -1 none; e.g. the data file a sample came from): the output's
        ``group_losses`` holds each group's summed cross-entropy and target count (the loss is unchanged).
        """
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = False if self.training else bool(self.config.use_cache or cache is not None)
        for key in ("return_dict", "output_attentions", "output_hidden_states"):
            kwargs.pop(key, None)
        outputs = self._decode(
            input_ids,
            attention_mask,
            position_ids,
            cache,
            inputs_embeds,
            pixel_values,
            image_mask,
            image_counts,
            use_cache,
            image_grids=image_grids,
            image_index=image_index,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        assert hidden_states is not None, "the decoder always returns its hidden states"

        loss = None
        logits = None
        group_losses = None
        if labels is not None and self.training and supervised_logits_only:
            if loss_groups is None:
                loss = self.supervised_loss(hidden_states, labels, num_items_in_batch)
            else:
                loss, group_losses = self.grouped_supervised_loss(hidden_states, labels, loss_groups, num_items_in_batch)
        else:
            slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.output(hidden_states[:, slice_indices, :])
            if labels is not None:
                if logits.shape[1] != labels.shape[1]:
                    raise ValueError("labels need logits at every position: do not combine labels with logits_to_keep")
                loss = causal_lm_loss(logits, labels, num_items_in_batch)
                if loss_groups is not None:
                    group_losses = _logit_group_losses(logits, labels, loss_groups)
        return XComposer2CausalLMOutput(
            loss=loss,
            logits=logits,
            group_losses=group_losses,
            **{_LM_OUTPUT_CACHE: getattr(outputs, _BASE_OUTPUT_CACHE)},
        )

    def _decode(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        image_counts: torch.Tensor | None,
        use_cache: bool | None,
        image_grids: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Embed, splice the images in, run the decoder: the final-norm hidden states."""
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("pass input_ids or inputs_embeds, not both")
        source = input_ids if input_ids is not None else inputs_embeds
        if source is None:
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        q_len = source.shape[1]
        past_len = cache.get_seq_length() if cache is not None else 0
        image_mask = self._align_image_mask(image_mask, past_len, q_len)
        if inputs_embeds is None:
            inputs_embeds = self.model.tok_embeddings(input_ids)
            if pixel_values is not None and pixel_values.shape[0] > 0:
                inputs_embeds = self.splice_image_features(
                    inputs_embeds, pixel_values, image_mask, image_counts, image_grids, image_index
                )
            elif image_mask is not None and bool(image_mask.any()):
                raise ValueError(
                    "image_mask marks image slots but no pixel_values were given; pass the images, or pass "
                    "inputs_embeds with the features already in place"
                )
        elif pixel_values is not None:
            raise ValueError("pixel_values cannot be combined with inputs_embeds (splice the features yourself)")
        return self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            image_mask=image_mask,
            **kwargs,
        )

    def last_hidden_states(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, L, hidden] of a batch, images spliced in (what a score head reads)."""
        hidden = self._decode(
            input_ids,
            attention_mask,
            position_ids,
            None,
            None,
            pixel_values,
            image_mask,
            image_counts,
            False,
            image_grids=image_grids,
            image_index=image_index,
        ).last_hidden_state
        assert hidden is not None, "the decoder always returns its hidden states"
        return hidden

    @torch.no_grad()
    def sample_losses(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of a batch: (summed token cross-entropy [B] float64, supervised token count [B]).

        ``sum / count`` is each sample's official loss; the output head runs only at supervised
        positions, so no [B, L, vocab] tensor is made.
        """
        hidden = self._decode(
            input_ids,
            attention_mask,
            kwargs.get("position_ids"),
            None,
            None,
            pixel_values,
            image_mask,
            image_counts,
            False,
            image_grids=image_grids,
            image_index=kwargs.get("image_index"),
        ).last_hidden_state
        assert hidden is not None, "the decoder always returns its hidden states"
        shift_labels = labels[:, 1:].to(hidden.device)
        keep = shift_labels != IGNORE_INDEX
        rows = keep.nonzero()[:, 0]
        logits = self.output(hidden[:, :-1][keep]).float()
        nll = F.cross_entropy(logits, shift_labels[keep], reduction="none").double()
        sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=hidden.device).index_add(0, rows, nll)
        return sums, keep.sum(dim=1)

    def supervised_loss(
        self, hidden_states: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """The same loss as :func:`causal_lm_loss`, computing the output head only where a label is set.

        Saves the [B, L, vocab] logits tensor (1.5 GB per 4k-token sample in float32 at the real vocabulary).
        """
        shift_labels = labels[:, 1:].to(hidden_states.device)
        keep = shift_labels != IGNORE_INDEX
        selected = hidden_states[:, :-1][keep]
        targets = shift_labels[keep]
        if isinstance(self.output, OutputHead):  # not when peft or resize_token_embeddings replaced the head
            return self.output(selected, targets) / _ce_denominator(targets, num_items_in_batch)
        logits = self.output(selected).float()
        return _reduce_ce(logits, targets, num_items_in_batch)

    def grouped_supervised_loss(
        self,
        hidden_states: torch.Tensor,
        labels: torch.Tensor,
        loss_groups: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`supervised_loss`, and ``[G, 2]`` (summed cross-entropy, targets) per group of ``loss_groups``.

        The head runs once per group over that group's targets; the loss is the groups' sum over the
        same denominator (equal to the ungrouped loss up to float summation order).
        """
        shift_labels = labels[:, 1:].to(hidden_states.device)
        keep = shift_labels != IGNORE_INDEX
        selected = hidden_states[:, :-1][keep]
        targets = shift_labels[keep]
        groups = loss_groups[:, 1:].to(hidden_states.device)[keep].clamp(min=-1)
        ids = [int(g) for g in torch.unique(groups).tolist()]
        table = torch.zeros(max(ids, default=-1) + 1, 2, device=hidden_states.device, dtype=torch.float32)
        total: torch.Tensor = hidden_states.new_zeros((), dtype=torch.float32)
        for g in ids:
            rows = groups == g
            if isinstance(self.output, OutputHead):
                part = self.output(selected[rows], targets[rows])
            else:
                part = F.cross_entropy(self.output(selected[rows]).float(), targets[rows], reduction="sum")
            total = total + part
            if g >= 0:
                table[g, 0] = part.detach().float()
                table[g, 1] = rows.sum()
        return total / _ce_denominator(targets, num_items_in_batch), table

    # ------------------------------------------------------------------ generation
    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict[str, Any]:
        """GenerationMixin's preparation; ``image_mask`` is kept whole and aligned in :meth:`forward`."""
        image_mask = kwargs.pop("image_mask", None)
        image_counts = kwargs.pop("image_counts", None)
        image_grids = kwargs.pop("image_grids", None)
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if image_mask is not None:
            model_inputs["image_mask"] = image_mask
        if model_inputs.get("pixel_values") is not None:
            if image_counts is not None:
                model_inputs["image_counts"] = image_counts
            if image_grids is not None:
                model_inputs["image_grids"] = image_grids
        return model_inputs

    def _chat_placement(self, query: str, history: Sequence[tuple[str, str]], num_images: int) -> tuple[str, bool]:
        """``(query, lead)``: where images given without any ``<ImageHere>`` go, as the official chat of the family puts them.

        2.5 with one such image: before the whole prompt (``lead``). Otherwise at the start of the query:
        one placeholder per image (2.0), or ``Image1 <ImageHere>; Image2 <ImageHere>; `` (2.5).
        """
        unplaced = num_images and IMAGE_PLACEHOLDER not in query and not any(IMAGE_PLACEHOLDER in q for q, _ in history)
        if self.config.hd and unplaced and num_images == 1:
            return query, True
        return place_images(query, history, num_images, numbered=self.config.hd), False

    def chat_text(
        self,
        query: str,
        history: Sequence[tuple[str, str]] = (),
        meta_instruction: str | Any | None = FAMILY_DEFAULT,
        num_images: int = 0,
        prompt_layout: str | None = None,
    ) -> str:
        """The prompt text :meth:`build_chat_inputs` tokenizes, ``<ImageHere>`` where the images go."""
        layout = prompt_layout or self.config.prompt_layout
        if meta_instruction is FAMILY_DEFAULT:
            meta_instruction = default_system_prompt(bool(self.config.hd), layout)
        query, lead = self._chat_placement(query, history, num_images)
        prompt = chat_prompt(query, history, meta_instruction)
        return IMAGE_PLACEHOLDER + prompt if lead else prompt

    def build_chat_inputs(
        self,
        tokenizer: Any,
        query: str,
        history: Sequence[tuple[str, str]] = (),
        meta_instruction: str | Any | None = FAMILY_DEFAULT,
        num_images: int = 0,
        bos_per_piece: bool | None = None,
        image_slots: Sequence[int] | None = None,
        prompt_layout: str | None = None,
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Prompt ids (image slots hold the pad id) and image mask, as the official chat of the family builds them.

        The text is :func:`chat_prompt` (system turn when there is a system prompt, history, query,
        answer header), split at ``<ImageHere>``. ``bos_per_piece`` (the 2.0 default): every non-empty
        piece is tokenized with its own ``<s>``, so one also follows each image; otherwise (the 2.5
        default, and how training encodes samples) ``<s>`` comes once, before the first piece even
        when it is empty. The system prompt defaults to the family's (2.0: the official one; 2.5:
        none). ``prompt_layout`` (default: ``config.prompt_layout``) "training" changes both defaults
        to training's layout: no system prompt, one ``<s>``. Images given without any placeholder: see :meth:`_chat_placement` (the official 2.0
        code puts them after the answer header, where the model never saw images in training).
        ``image_slots`` gives each image's slot count (2.5: from its crop grid; 2.0: fixed).
        """
        hd = bool(self.config.hd)
        if bos_per_piece is None:
            bos_per_piece = bos_per_piece_default(hd, prompt_layout or self.config.prompt_layout)
        pieces = self.chat_text(query, history, meta_instruction, num_images, prompt_layout).split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != num_images:
            raise ValueError(
                f"the prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders (history included) but {num_images} "
                "images were given; pass all of the conversation's images with every turn"
            )
        if image_slots is None:
            if hd and num_images:
                raise ValueError("a 2.5 model needs image_slots (each image's slot count from its crop grid)")
            image_slots = [self.image_tokens] * num_images if num_images else []
        pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else tokenizer.pad_token_id
        ids: list[int] = []
        mask: list[bool] = []
        for k, piece in enumerate(pieces):
            if piece or (k == 0 and not bos_per_piece):
                bos = [tokenizer.bos_token_id] if bos_per_piece or k == 0 else []
                piece_ids = bos + (tokenizer.encode_text(piece) if piece else [])
                ids += piece_ids
                mask += [False] * len(piece_ids)
            if k < num_images:
                ids += [pad_id] * int(image_slots[k])
                mask += [True] * int(image_slots[k])
        # torch's stubs have no integer / boolean tensor types: torch.tensor gives a plain Tensor
        id_rows = cast(torch.LongTensor, torch.tensor([ids], dtype=torch.long))
        mask_rows = cast(torch.BoolTensor, torch.tensor([mask], dtype=torch.bool))
        return id_rows, mask_rows

    def _images_to_pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """Paths / PIL images / [3, S, S] tensors -> [N, 3, S, S] float32 with the official preprocessing."""
        from .image_processing_xcomposer2 import load_image

        rows = []
        for image in images:
            if torch.is_tensor(image):
                rows.append(image.float() if image.dim() == 3 else image.float().squeeze(0))
            else:
                rows.append(torch.as_tensor(load_image(image, self.config.img_size)).float())
        return torch.stack(rows)

    def hd_chat_images(self, images: Sequence[Any], hd_num: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """2.5: paths / PIL images -> ``(pixel_values [V, 3, S, S], image_grids [N, 2])`` for chat.

        The official 2.5 chat preprocessing: the inference HD transform (no x1.5 factor, padding at
        the bottom / right) with ``hd_num`` 24 for one image and 6 each for several, unless given.
        """
        from .image_processing_xcomposer2 import chat_hd_num, load_hd_views

        if not self.config.hd:
            raise ValueError("hd_chat_images is for 2.5 (HD) models; this is a 2.0 model (config.family)")
        budget = chat_hd_num(len(images)) if hd_num is None else hd_num
        views, grids = [], []
        for image in images:
            v, grid = load_hd_views(image, budget, inference=True, view_size=self.config.img_size)
            views.append(v)
            grids.append(grid)
        size = self.config.img_size
        pixel_values = torch.cat(views) if views else torch.zeros(0, 3, size, size)
        return pixel_values, torch.tensor(grids, dtype=torch.long).reshape(-1, 2)

    def chat_inputs(
        self,
        tokenizer: Any,
        query: str,
        images: Sequence[Any] | Any | None = None,
        history: Sequence[tuple[str, str]] | None = None,
        meta_instruction: str | Any | None = FAMILY_DEFAULT,
        bos_per_piece: bool | None = None,
        hd_num: int | None = None,
        prompt_layout: str | None = None,
    ) -> ChatInputs:
        """One chat turn as model inputs: the prompt of :meth:`build_chat_inputs` and the images' pixels.

        What :meth:`chat` answers; :meth:`answer_batch` answers several at once. The query comes back
        with any placeholders :meth:`_chat_placement` added, so the history keeps the images where they were.
        """
        history = [cast("tuple[str, str]", tuple(turn)) for turn in (history or [])]
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        images = list(images or [])
        query, _ = self._chat_placement(query, history, len(images))
        image_grids = image_slots = None
        pixel_values: torch.Tensor | None
        if self.config.hd and images:
            pixel_values, image_grids = self.hd_chat_images(images, hd_num)
            image_slots = self.image_token_counts(image_grids, len(images))
        else:
            pixel_values = self._images_to_pixels(images) if images else None
        prompt_ids, prompt_mask = self.build_chat_inputs(
            tokenizer,
            query,
            history,
            meta_instruction,
            len(images),
            bos_per_piece=bos_per_piece,
            image_slots=image_slots,
            prompt_layout=prompt_layout,
        )
        text = self.chat_text(query, history, meta_instruction, len(images), prompt_layout)
        return ChatInputs(prompt_ids[0], prompt_mask[0], pixel_values, image_grids, query, len(images), text)

    @torch.no_grad()
    def answer_batch(
        self,
        tokenizer: Any,
        prompts: Sequence[ChatInputs],
        max_new_tokens: int = 1024,
        do_sample: bool = True,
        use_cache: bool = True,
        **generate_kwargs: Any,
    ) -> list[tuple[str, list[int]]]:
        """``(answer, its new tokens without the stop tokens)`` per prompt, generated together in one left-padded batch.

        Left padding keeps every prompt's last token at the end of its row, where generation
        continues; the attention mask hides the padding and the positions count only real tokens
        (``generate`` derives them from the mask), so each row sees what it would see alone.
        Sampling settings as :meth:`chat`. Stops at EOS or ``[UNUSED_TOKEN_145]``.
        """
        if do_sample:
            generate_kwargs = {**{k: v for k, v in OFFICIAL_GENERATION.items() if k != "do_sample"}, **generate_kwargs}
        device = self.model.tok_embeddings.weight.device
        pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else tokenizer.pad_token_id
        batch = collate_chat_inputs(prompts, int(pad_id if pad_id is not None else 0))
        if batch["image_grids"] is not None:
            generate_kwargs["image_grids"] = batch["image_grids"].to(device)
        if batch["pixel_values"] is not None:
            generate_kwargs["image_counts"] = batch["image_counts"].to(device)
        eos_ids = [tokenizer.eos_token_id, tokenizer.turn_end_id]
        input_ids = batch["input_ids"].to(device)
        out = self.generate(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"].to(device),
            pixel_values=batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None,
            image_mask=batch["image_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            use_cache=use_cache,
            eos_token_id=eos_ids,
            pad_token_id=tokenizer.eos_token_id,
            **generate_kwargs,
        )
        answers = []
        for row in out[:, input_ids.shape[1] :].tolist():
            new_tokens = [t for t in row if t not in eos_ids]
            response = tokenizer.decode(new_tokens, skip_special_tokens=True).split(TURN_END)[0].strip()
            answers.append((response, new_tokens))
        return answers

    @torch.no_grad()
    def chat(
        self,
        tokenizer: Any,
        query: str,
        images: Sequence[Any] | Any | None = None,
        history: Sequence[tuple[str, str]] | None = None,
        meta_instruction: str | Any | None = FAMILY_DEFAULT,
        max_new_tokens: int = 1024,
        do_sample: bool = True,
        use_cache: bool = True,
        bos_per_piece: bool | None = None,
        hd_num: int | None = None,
        prompt_layout: str | None = None,
        **generate_kwargs: Any,
    ) -> tuple[str, list[tuple[str, str]]]:
        """Answer ``query`` about ``images``; returns ``(response, history + [(query, response)])``.

        The prompt layout the model folder records (``config.prompt_layout``: the official prompt of
        the family, or for models xcft created from scratch the layout training encodes) and the
        official generation settings by default (sampling with temperature 1.0, top_p 0.8,
        repetition penalty 1.005); ``do_sample=False`` decodes greedily (no penalty).
        ``prompt_layout``, ``meta_instruction`` and ``bos_per_piece`` override the layout (see
        :meth:`build_chat_inputs`). 2.5 images go through the official inference HD transform
        (``hd_num`` 24 for one image, 6 for several, unless given).
        Generation stops at EOS or ``[UNUSED_TOKEN_145]``.
        """
        history = [cast("tuple[str, str]", tuple(turn)) for turn in (history or [])]
        prompt = self.chat_inputs(tokenizer, query, images, history, meta_instruction, bos_per_piece, hd_num, prompt_layout)
        [(response, _)] = self.answer_batch(
            tokenizer, [prompt], max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=use_cache, **generate_kwargs
        )
        return response, [*history, (prompt.query, response)]


@dataclasses.dataclass
class ChatInputs:
    """One chat prompt as model inputs (see :meth:`XComposer2ForCausalLM.chat_inputs`)."""

    input_ids: torch.Tensor  # [L]; the pad id at image slots
    image_mask: torch.Tensor  # [L] bool
    pixel_values: torch.Tensor | None  # [images or views, 3, S, S]
    image_grids: torch.Tensor | None  # 2.5: [images, 2]
    query: str  # with the placeholders chat placed
    num_images: int
    text: str = ""  # the whole prompt text, placeholders where the images go


def collate_chat_inputs(prompts: Sequence[ChatInputs], pad_id: int) -> dict[str, Any]:
    """Left-padded rows (pad id, attention 0, no image slot) and the images of all rows in row order."""
    if not prompts:
        raise ValueError("no prompt to collate")
    width = max(int(p.input_ids.shape[0]) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    image_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, p in enumerate(prompts):
        n = int(p.input_ids.shape[0])
        ids[row, width - n :] = p.input_ids
        attention[row, width - n :] = 1
        image_mask[row, width - n :] = p.image_mask
    pixels = [p.pixel_values for p in prompts if p.pixel_values is not None and p.pixel_values.shape[0]]
    grids = [p.image_grids for p in prompts if p.image_grids is not None and p.image_grids.shape[0]]
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "image_mask": image_mask,
        "pixel_values": torch.cat(pixels) if pixels else None,
        "image_grids": torch.cat(grids) if grids else None,
        "image_counts": torch.tensor([p.num_images for p in prompts], dtype=torch.long),
    }


def materialize_non_persistent_buffers(model: XComposer2ForCausalLM, device: torch.device | str) -> None:
    """Recompute buffers that are not in checkpoints (RoPE frequencies, CLIP position ids).

    Needed after building the model on the meta device and loading weights with ``assign=True``.
    """
    model.model.rotary_emb.reset_inv_freq(device)
    embeddings = model.vit.clip.embeddings
    # nn.Module.__setattr__ stores a tensor assigned to a buffer's name as that buffer (keeping it non-persistent)
    embeddings.position_ids = torch.arange(embeddings.num_positions, device=device).expand((1, -1))  # type: ignore[assignment]


__all__ = [
    "ChatInputs",
    "PLoRALinear",
    "XComposer2CausalLMOutput",
    "XComposer2ForCausalLM",
    "XComposer2Model",
    "XComposer2PreTrainedModel",
    "causal_lm_loss",
    "collate_chat_inputs",
    "materialize_non_persistent_buffers",
]

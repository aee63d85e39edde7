"""The attention function registered with transformers' ``AttentionInterface`` under our name.

transformers' attention modules compute q, k, v (RoPE applied, cache updated) and then call
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)(module, q, k, v, mask, **kw)``. With
our name set on the config, that call lands in :func:`prefix_attention_forward`, which reads the module's own
prefix slot and calls :func:`prefix_kernels.prefix_attention` with the prefix as a second source of keys and
values: nothing is concatenated, nothing enters the cache.

A module whose slot is a :class:`~.state.DelegateSlot` (a cross-attention the prefix does not cover), or any
module while the handle is disabled or the forward's KV cache holds the prefix (:mod:`.cached_generate`), is
served by the implementation named on its slot (the one that served it before), with the mask that
implementation expects.
"""

from __future__ import annotations

import sys

import torch

from ...ops.attention import plan_prefix_attention, prefix_attention
from .masks import PrefixMask

SLOT_ATTR = "_prefix_kernels_slot"
IMPLEMENTATION = "prefix_kernels"  # the name registered with transformers (registration.NAME)


MAX_PLANS = 4  # per module: a prefill and a decode step of a generate() loop, and a few more kinds of call


def planned_attention(slot, q, k, v, prefix_k, prefix_v, **options) -> torch.Tensor:
    """``prefix_attention(q, k, v, prefix_k, prefix_v, **options)``, through the plan the slot keeps for calls of
    q's shape when the call matches it (a decode step like the slot's earlier ones, the cache longer; the prefill
    of a prompt of a length seen before), else in full, after which the slot plans calls like this one (training
    calls are never planned). A slot keeps the plans of its last ``MAX_PLANS`` kinds of call."""
    plans = slot.plans
    plan = plans.get(q.shape)
    if plan is not None:
        out = plan.run(q, k, v, prefix_k, prefix_v, **options)
        if out is not None:
            return out
    out = prefix_attention(q, k, v, prefix_k, prefix_v, **options)
    plan = plan_prefix_attention(q, k, v, prefix_k, prefix_v, **options)
    plans.pop(q.shape, None)
    if plan is not None:
        if len(plans) >= MAX_PLANS:
            del plans[next(iter(plans))]
        plans[q.shape] = plan
    return out


def previous_attention(module: torch.nn.Module, name: str):
    """The function transformers would call for ``name`` in ``module`` (its modeling file's eager attention for
    "eager", as the module itself would pick)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if name == "eager" or name not in ALL_ATTENTION_FUNCTIONS:
        if eager is None:
            raise RuntimeError(f"{type(module).__name__} has no prefix and its modeling file defines no "
                               f"eager_attention_forward to fall back to for attention implementation {name!r}")
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, eager)


def _delegate(module, previous: str, query, key, value, attention_mask, **kwargs):
    if isinstance(attention_mask, PrefixMask):
        attention_mask = attention_mask.for_implementation(previous)
    return previous_attention(module, previous)(module, query, key, value, attention_mask, **kwargs)


def dense_prefix_attention(query, key, value, prefix_k, prefix_v, mask: torch.Tensor, *, scale: float,
                           dropout_p: float, softcap: float | None, prefix_index: torch.Tensor | None = None,
                           prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit attention over ``[prefix ; input]`` with an arbitrary 4D mask over the input keys (bool, True =
    attend, or additive float), for patterns the kernels do not take. Copies the prefix per batch row and
    materialises the scores, as PEFT's path does; the prefix columns are visible to every query.

    query ``[B, Hq, Lq, D]``; key, value ``[B, Hkv, Lk, D]``; prefix ``[Hkv, P, D]``, or a bank ``[N, Hkv, P, D]``
    with ``prefix_index`` ``[B]`` (-1: no prefix for that row) and optional ``prefix_lengths`` ``[N]`` (columns
    past a prefix's length are masked); mask ``[B or 1, 1 or Hq, Lq, Lk]``. Returns ``[B, Hq, Lq, D]``.
    """
    B, Hq, Lq, _ = query.shape
    Hkv, P = key.shape[1], prefix_k.shape[-2]
    visible = None  # [B, P] prefix columns each row sees, with a selection
    if prefix_index is not None:
        rows = prefix_index.long()
        safe = rows.clamp(min=0)
        if prefix_k.dim() == 3:
            prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
        pk, pv = prefix_k[safe], prefix_v[safe]
        length = torch.full_like(rows, P) if prefix_lengths is None else prefix_lengths.long()[safe]
        length = torch.where(rows >= 0, length, torch.zeros_like(length))
        visible = torch.arange(P, device=rows.device).unsqueeze(0) < length.unsqueeze(1)
    else:
        pk, pv = prefix_k.unsqueeze(0).expand(B, -1, -1, -1), prefix_v.unsqueeze(0).expand(B, -1, -1, -1)
    keys = torch.cat([pk, key], dim=2).repeat_interleave(Hq // Hkv, 1)
    values = torch.cat([pv, value], dim=2).repeat_interleave(Hq // Hkv, 1)
    scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = mask[..., :key.shape[2]]
    if mask.dtype != torch.bool:
        mask = mask.float()
    lead = mask.shape[:-1] if visible is None else torch.broadcast_shapes(mask.shape[:-1], (B, 1, 1))
    mask = mask.expand(*lead, mask.shape[-1])
    if mask.dtype == torch.bool:
        prefix_cols = mask.new_ones(*lead, P)
        if visible is not None:
            prefix_cols = prefix_cols & visible.view(B, 1, 1, P)
        scores = scores.masked_fill(~torch.cat([prefix_cols, mask], dim=-1), float("-inf"))
    else:
        prefix_cols = mask.new_zeros(*lead, P)
        if visible is not None:
            prefix_cols = prefix_cols.masked_fill(~visible.view(B, 1, 1, P), float("-inf"))
        scores = scores + torch.cat([prefix_cols, mask], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a row that sees nothing
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs.to(values.dtype), values)


def compute_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    """The one dtype the op computes in: the autocast dtype under autocast (RoPE tables are fp32, so q and k
    arrive promoted while v stays in the autocast dtype, and eager attention's matmuls run in the autocast
    dtype), else the promotion of the three."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtype = query.dtype
    if key.dtype is dtype and value.dtype is dtype:
        return dtype
    return torch.promote_types(torch.promote_types(dtype, key.dtype), value.dtype)


def prefix_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """transformers' attention-function signature: q ``[B, Hq, Lq, D]``, k and v ``[B, Hkv, Lk, D]`` (any
    strides), the mask from :func:`~.masks.prefix_mask_interface`. Returns ``(out [B, Lq, Hq, D], None)``."""
    slot = getattr(module, SLOT_ATTR, None)
    if slot is None:
        raise RuntimeError(f"attention implementation {IMPLEMENTATION!r} was called for a {type(module).__name__} "
                           "that prefix tuning did not set up (set config._attn_implementation back to what it was, "
                           "or apply_prefix_tuning to the model)")
    if slot.state is None or not slot.state.enabled or slot.state.prefix_in_cache():
        return _delegate(module, slot.previous, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         sliding_window=sliding_window, softcap=softcap, **kwargs)
    dtype = compute_dtype(query, key, value)
    if not (query.dtype is dtype and key.dtype is dtype and value.dtype is dtype):
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    prefix_k, prefix_v, prefix_index, prefix_lengths = slot.fetch(dtype, query.shape[0])
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    dense = attention_mask if isinstance(attention_mask, torch.Tensor) else None
    if isinstance(attention_mask, PrefixMask):
        dense = attention_mask.dense
    position_bias = kwargs.pop("position_bias", None)  # T5's relative bias (an additive [1 or B, Hq, Lq, Lk])
    if position_bias is not None and dense is not None:
        raise NotImplementedError(f"{type(module).__name__}: a position bias with a mask pattern the kernels do not "
                                  "take (a 4D mask given by the caller) is not served; pass the 2D padding mask")
    if dense is not None:  # a 4D mask given by the caller, or a pattern the kernels do not take
        out = dense_prefix_attention(query, key, value, prefix_k, prefix_v, dense, scale=float(scaling),
                                     dropout_p=dropout, softcap=softcap, prefix_index=prefix_index,
                                     prefix_lengths=prefix_lengths)
        return out.transpose(1, 2), None
    if isinstance(attention_mask, PrefixMask):
        key_padding_mask, causal = attention_mask.key_padding_mask, attention_mask.causal
        window = attention_mask.sliding_window
        if attention_mask.kv_end < key.shape[2]:
            key, value = key[:, :, :attention_mask.kv_end], value[:, :, :attention_mask.kv_end]
    else:  # no mask at all: the module's own causality, the window it passes
        key_padding_mask, window = None, sliding_window
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    extra = {}
    if position_bias is not None:
        if not hasattr(slot, "attention_bias"):
            raise NotImplementedError(f"{type(module).__name__} passes a position bias, which its family's adapter "
                                      "does not declare")
        extra["attn_bias"] = slot.attention_bias(position_bias, query, key.shape[2], prefix_k.shape[-2])
    out = planned_attention(slot, query, key, value, prefix_k, prefix_v, causal=causal,
                            key_padding_mask=key_padding_mask, softmax_scale=float(scaling), dropout_p=float(dropout),
                            sliding_window=window if causal else None, softcap=softcap, prefix_index=prefix_index,
                            prefix_lengths=prefix_lengths, backend=slot.state.backend, **extra)
    return out.transpose(1, 2), None

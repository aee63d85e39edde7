"""Bloom: attention that is not on transformers' AttentionInterface, so its modules get an instance-level forward.

``BloomAttention.forward`` adds a precomputed ALiBi bias and a 4D mask itself. :func:`bloom_attention_forward` is
bound to each attention module instance (``remove()`` deletes the instance attribute, which uncovers the class's
forward again) and computes the same thing through ``prefix_attention``, with the ALiBi slopes and per-row
offsets the op takes: with P ones prepended to the mask (PEFT) Bloom puts prefix column p at position p and the
real key j of a row with ``pads`` leading pad tokens at ``P + j - pads``, which is ``alibi_offsets = -pads``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import SLOT_ATTR, compute_dtype, planned_attention
from .masks import PrefixMask


def _leading_pads(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the number of masked keys before the first kept one ([B] int64; 0 for a row with none kept)."""
    return key_padding_mask.to(torch.int8).argmax(dim=-1)


def _offsets(state, key_padding_mask: torch.Tensor | None, batch: int, device: torch.device):
    """The op's ``alibi_offsets`` ``[B]`` (or None), made once per forward for its padding mask: every layer reads
    the same mask and the same rows' prefix lengths."""
    extras = state.current().extras
    made = extras.get("bloom_offsets")
    if made is not None and made[0] is key_padding_mask:
        return made[1]
    offsets = None
    if key_padding_mask is not None:
        offsets = -_leading_pads(key_padding_mask)
    if not state.shift_positions:
        offsets = (torch.zeros(batch, dtype=torch.int64, device=device) if offsets is None else offsets) \
            - state.position_offsets()
    extras["bloom_offsets"] = (key_padding_mask, offsets)
    return offsets


def bloom_attention_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                            output_attentions=False, **kwargs):
    """Drop-in for ``BloomAttention.forward`` (same arguments and returns), bound to one module instance."""
    slot = getattr(self, SLOT_ATTR)
    if not slot.state.enabled or slot.state.prefix_in_cache():
        if isinstance(attention_mask, PrefixMask):  # (the prefix in the cache: the mask Bloom itself would get)
            attention_mask = attention_mask.for_implementation(slot.previous)
        return type(self).forward(self, hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                  use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    batch, length, _ = hidden_states.shape
    qkv = self.query_key_value(hidden_states).view(batch, length, self.num_heads, 3, self.head_dim)
    query, key, value = (qkv.select(3, i).transpose(1, 2) for i in range(3))
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)

    key_padding_mask = None
    if isinstance(attention_mask, PrefixMask) and attention_mask.dense is None:
        key_padding_mask = attention_mask.key_padding_mask
        if attention_mask.kv_end < key.shape[2]:
            key, value = key[:, :, :attention_mask.kv_end], value[:, :, :attention_mask.kv_end]
    elif attention_mask is not None:
        raise ValueError("prefix tuning of Bloom takes a 2D attention_mask (padding), not a 4D or custom mask")
    # the op puts input key j at P_b + j + offset, P_b the row's prefix length (P; 0 for a row without a prefix)
    offsets = _offsets(slot.state, key_padding_mask, batch, query.device)
    slopes = slot.alibi_slopes(self.num_heads, query.device)
    dtype = compute_dtype(query, key, value)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    prefix_k, prefix_v, prefix_index, prefix_lengths = slot.fetch(dtype, batch)
    dropout = self.attention_dropout.p if self.training else 0.0
    out = planned_attention(slot, query, key, value, prefix_k, prefix_v, causal=True,
                            key_padding_mask=key_padding_mask, softmax_scale=float(self.inv_norm_factor),
                            alibi_slopes=slopes, alibi_offsets=offsets, dropout_p=dropout, prefix_index=prefix_index,
                            prefix_lengths=prefix_lengths, backend=slot.state.backend)
    out = self.dense(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))
    return residual + F.dropout(out, p=self.hidden_dropout, training=self.training), None

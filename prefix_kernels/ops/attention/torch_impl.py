"""The torch backend: prefix attention from stock PyTorch ops, for CPUs and as the universal fallback.

Forward: one ``scaled_dot_product_attention`` call over ``[prefix ; input]`` (the prefix is broadcast
into one concatenated K/V, the mask is built once at its broadcastable size, GQA goes through SDPA's
``enable_gqa`` without repeating K/V). When the log-sum-exp is asked for, or an optional feature
(ALiBi, dropout, sliding window, softcap) is on, an explicit fp32 softmax is used instead: SDPA
returns no LSE and cannot reproduce our dropout mask or the softcap.

Backward: the explicit softmax gradient in fp32, with the query heads of a group folded into one
matmul so that K/V are never repeated; the prefix gradient is reduced over the batch by a sum.

The dropout mask is drawn from a torch.Generator seeded with the call's seed, so the backward
regenerates the forward's mask (it differs from the Triton backend's Philox stream).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .inputs import NO_FEATURES, Features
from .reference import alibi_positions, visibility_mask


def _concat_prefix(x: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    if prefix is None or prefix.shape[1] == 0:
        return x
    return torch.cat([prefix.unsqueeze(0).expand(x.shape[0], -1, -1, -1), x], dim=2)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads_q: int, len_q: int, n_cols: int, dropout_p: float,
                      device: torch.device) -> torch.Tensor:
    """The keep mask ``[B, Hq, Lq, P + Lk]`` bool this backend uses for ``seed`` (an int64 scalar tensor)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed.item()) & (2**63 - 1))
    return torch.rand((batch, heads_q, len_q, n_cols), generator=gen, device=device) >= dropout_p


class _Logits:
    """Scores of ``[prefix ; input]`` with queries grouped per kv head: [B, Hkv, G, Lq, P + Lk] in fp32."""

    def __init__(self, q, k_all, key_padding_mask, causal, scale, features: Features, len_k: int):
        B, Hq, Lq, _ = q.shape
        Hkv, n_cols = k_all.shape[1], k_all.shape[2]
        G = Hq // Hkv
        P = n_cols - len_k
        self.shape5 = (B, Hkv, G, Lq, n_cols)
        raw = torch.matmul(q.unflatten(1, (Hkv, G)), k_all.unsqueeze(2).transpose(-1, -2)) * scale
        self.tanh = None
        if features.softcap is not None:
            self.tanh = torch.tanh(raw / features.softcap)
            raw = features.softcap * self.tanh
        if features.alibi_slopes is not None:
            pos = alibi_positions(B, len_k, P, features.alibi_offsets, q.device).to(raw.dtype)
            raw = raw + features.alibi_slopes.to(raw.dtype).view(1, Hkv, G, 1, 1) * pos.view(B, 1, 1, 1, n_cols)
        mask = visibility_mask(Lq, len_k, P, causal=causal, key_padding_mask=key_padding_mask, device=q.device,
                               sliding_window=features.sliding_window)
        if mask is not None:
            raw = raw.masked_fill(~mask.unsqueeze(2), float("-inf"))
        self.lse = torch.logsumexp(raw, dim=-1)
        probs = torch.softmax(raw, dim=-1)
        if mask is not None:
            # softmax of a row with no visible key is 0/0; such rows are defined as zero.
            probs = probs.masked_fill(torch.isneginf(self.lse).unsqueeze(-1), 0.0)
        self.probs = probs
        self.keep = None
        self.keep_scale = 1.0
        if features.dropout_p > 0:
            self.keep = dropout_keep_mask(features.dropout_seed, B, Hq, Lq, n_cols, features.dropout_p,
                                          q.device).unflatten(1, (Hkv, G))
            self.keep_scale = 1.0 / (1.0 - features.dropout_p)

    def dropped(self, x):
        """Apply the dropout keep mask and rescaling to a [B, Hkv, G, Lq, P + Lk] tensor."""
        if self.keep is None:
            return x
        return torch.where(self.keep, x * self.keep_scale, torch.zeros_like(x))


def _into(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``result`` in ``like``'s dtype and memory layout (what the fake implementation promises)."""
    out = torch.empty_like(like)
    out.copy_(result)
    return out


def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, need_lse, features=NO_FEATURES):
    """out [B, Hq, Lq, D] (laid out like q), lse [B, Hq, Lq] fp32 (or [B, Hq, 0] if not need_lse)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[1]
    k_all = _concat_prefix(k, prefix_k)
    v_all = _concat_prefix(v, prefix_v)
    plain = (features.alibi_slopes is None and features.dropout_p == 0 and features.sliding_window is None
             and features.softcap is None)
    if need_lse or not plain:
        cdt = _compute_dtype(q.dtype)
        logits = _Logits(q.to(cdt), k_all.to(cdt), key_padding_mask, causal, scale, features, Lk)
        out = torch.matmul(logits.dropped(logits.probs), v_all.to(cdt).unsqueeze(2)).flatten(1, 2)
        lse = logits.lse.flatten(1, 2).float() if need_lse else q.new_empty((B, Hq, 0), dtype=torch.float32)
        return _into(out, q), lse
    mask = visibility_mask(Lq, Lk, P, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
    if mask is not None and P == 0:
        # Rows that see no key at all are defined as zeros; not every SDPA kernel agrees on them.
        out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return _into(out, q), q.new_empty((B, Hq, 0), dtype=torch.float32)


def backward(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale,
             features=NO_FEATURES):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v); the prefix ones are None when there is no prefix.

    The softmax is recomputed in fp32, so the forward's ``out`` and ``lse`` are not needed.
    """
    Hq = q.shape[1]
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    P = 0 if prefix_k is None else prefix_k.shape[1]
    cdt = _compute_dtype(q.dtype)
    k_all = _concat_prefix(k, prefix_k).to(cdt)
    v_all = _concat_prefix(v, prefix_v).to(cdt)
    q5 = q.unflatten(1, (Hkv, G)).to(cdt)
    do5 = dout.unflatten(1, (Hkv, G)).to(cdt)

    logits = _Logits(q.to(cdt), k_all, key_padding_mask, causal, scale, features, Lk)
    probs = logits.probs
    dv_all = torch.matmul(logits.dropped(probs).transpose(-1, -2), do5).sum(dim=2)
    dprobs = logits.dropped(torch.matmul(do5, v_all.unsqueeze(2).transpose(-1, -2)))
    delta = (probs * dprobs).sum(dim=-1, keepdim=True)
    if dlse is not None and dlse.numel() > 0:
        delta = delta - dlse.unflatten(1, (Hkv, G)).to(cdt).unsqueeze(-1)
    dscores = probs * (dprobs - delta)
    if logits.tanh is not None:
        dscores = dscores * (1.0 - logits.tanh.square())
    dq = torch.matmul(dscores, k_all.unsqueeze(2)).flatten(1, 2) * scale
    dk_all = torch.matmul(dscores.transpose(-1, -2), q5).sum(dim=2) * scale

    dq = _into(dq, q)
    dk = _into(dk_all[:, :, P:], k)
    dv = _into(dv_all[:, :, P:], v)
    if P == 0:
        return dq, dk, dv, None, None
    dpk = dk_all[:, :, :P].sum(dim=0).to(prefix_k.dtype)
    dpv = dv_all[:, :, :P].sum(dim=0).to(prefix_v.dtype)
    return dq, dk, dv, dpk, dpv

"""The torch backend: prefix attention from stock PyTorch ops, for CPUs and as the universal fallback.

Forward: one ``scaled_dot_product_attention`` call over ``[prefix ; input]`` (the prefix is broadcast
into one concatenated K/V, the mask is built once at its broadcastable size, GQA goes through SDPA's
``enable_gqa`` without repeating K/V). When the log-sum-exp is asked for, an explicit fp32 softmax is
used instead, since SDPA does not return it.

Backward: the explicit softmax gradient in fp32, with the query heads of a group folded into one
matmul so that K/V are never repeated; the prefix gradient is reduced over the batch by a sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import visibility_mask


def _concat_prefix(x: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    if prefix is None or prefix.shape[1] == 0:
        return x
    return torch.cat([prefix.unsqueeze(0).expand(x.shape[0], -1, -1, -1), x], dim=2)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _probs(q5, k_all, mask, scale):
    """Softmax over ``[prefix ; input]`` with queries grouped per kv head.

    q5: [B, Hkv, G, Lq, D]; k_all: [B, Hkv, P + Lk, D]; mask: [B|1, 1, Lq|1, P + Lk] or None.
    Returns probs [B, Hkv, G, Lq, P + Lk] and lse [B, Hkv, G, Lq] (-inf for rows that see nothing).
    """
    scores = torch.matmul(q5, k_all.unsqueeze(2).transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        # softmax of a row with no visible key is 0/0; such rows are defined as zero.
        probs = probs.masked_fill(torch.isneginf(lse).unsqueeze(-1), 0.0)
    return probs, lse


def _into(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``result`` in ``like``'s dtype and memory layout (what the fake implementation promises)."""
    out = torch.empty_like(like)
    out.copy_(result)
    return out


def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, need_lse):
    """out [B, Hq, Lq, D] (laid out like q), lse [B, Hq, Lq] fp32 (or [B, Hq, 0] if not need_lse)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[1]
    k_all = _concat_prefix(k, prefix_k)
    v_all = _concat_prefix(v, prefix_v)
    mask = visibility_mask(Lq, Lk, P, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    if need_lse:
        cdt = _compute_dtype(q.dtype)
        probs, lse = _probs(q.unflatten(1, (Hkv, Hq // Hkv)).to(cdt), k_all.to(cdt), mask, scale)
        out = torch.matmul(probs, v_all.to(cdt).unsqueeze(2)).flatten(1, 2)
        return _into(out, q), lse.flatten(1, 2).float()
    out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
    if mask is not None and P == 0:
        # Rows that see no key at all are defined as zeros; not every SDPA kernel agrees on them.
        out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return _into(out, q), q.new_empty((B, Hq, 0), dtype=torch.float32)


def backward(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v); the prefix ones are None when there is no prefix.

    The softmax is recomputed in fp32, so the forward's ``out`` and ``lse`` are not needed.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    P = 0 if prefix_k is None else prefix_k.shape[1]
    cdt = _compute_dtype(q.dtype)
    k_all = _concat_prefix(k, prefix_k).to(cdt)
    v_all = _concat_prefix(v, prefix_v).to(cdt)
    q5 = q.unflatten(1, (Hkv, G)).to(cdt)
    do5 = dout.unflatten(1, (Hkv, G)).to(cdt)
    mask = visibility_mask(Lq, Lk, P, causal=causal, key_padding_mask=key_padding_mask, device=q.device)

    probs, _ = _probs(q5, k_all, mask, scale)
    dv_all = torch.matmul(probs.transpose(-1, -2), do5).sum(dim=2)
    dprobs = torch.matmul(do5, v_all.unsqueeze(2).transpose(-1, -2))
    delta = (probs * dprobs).sum(dim=-1, keepdim=True)
    if dlse is not None and dlse.numel() > 0:
        delta = delta - dlse.unflatten(1, (Hkv, G)).to(cdt).unsqueeze(-1)
    dscores = probs * (dprobs - delta)
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

"""The eager reference of prefix attention: explicit concatenation and an explicit softmax.

This is the truth every backend is tested against. It is written for clarity, not speed: it copies
the prefix B times, repeats K/V over the query heads of each group and materialises the full score
matrix. It is differentiable with ordinary autograd (all five gradients).
"""

from __future__ import annotations

import torch


def visibility_mask(
    len_q: int,
    len_k: int,
    prefix_len: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Which keys of ``[prefix ; input]`` each query sees, or None when every key is visible.

    Returns a bool mask of shape ``[B or 1, 1, Lq or 1, P + Lk]`` that broadcasts over the scores
    ``[B, H, Lq, P + Lk]``. Every prefix column is visible. Input column j is visible to query i iff
    ``key_padding_mask[b, j]``; when causal, ``j <= i + (Lk - Lq)`` (bottom-right alignment); with a
    sliding window W, also ``j > i + (Lk - Lq) - W``. The prefix stays visible through any window.
    """
    if not causal and key_padding_mask is None:
        return None
    rows = len_q if causal else 1
    inp = torch.ones(1, 1, rows, len_k, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(len_q, device=device).view(len_q, 1)
        j = torch.arange(len_k, device=device).view(1, len_k)
        diag = i + (len_k - len_q)
        inp = j <= diag
        if sliding_window is not None:
            inp = inp & (j > diag - sliding_window)
        inp = inp.view(1, 1, len_q, len_k)
    if key_padding_mask is not None:
        inp = inp & key_padding_mask.view(-1, 1, 1, len_k)
    pre = torch.ones(inp.shape[0], 1, rows, prefix_len, dtype=torch.bool, device=device)
    return torch.cat([pre, inp], dim=-1)


def alibi_positions(batch: int, len_k: int, prefix_len: int, offsets: torch.Tensor | None,
                    device: torch.device) -> torch.Tensor:
    """ALiBi key positions ``[B, P + Lk]``: prefix column p at p, input key j at ``P + j + offsets[b]``.

    With ``offsets[b] = -(number of leading pad tokens)`` this equals HF Bloom's
    ``(mask.cumsum(-1) - 1) * mask`` over ``[P ones ; attention_mask]`` at every kept key of a left- or
    right-padded row (padded keys are masked, so their position does not matter).
    """
    cols = torch.arange(prefix_len + len_k, device=device).view(1, -1).expand(batch, -1)
    if offsets is None:
        return cols
    shift = torch.cat([torch.zeros(batch, prefix_len, dtype=offsets.dtype, device=device),
                       offsets.view(batch, 1).expand(batch, len_k)], dim=1)
    return cols + shift


def prefix_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    alibi_offsets: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    dropout_keep: torch.Tensor | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference prefix attention. Returns ``(out [B, Hq, Lq, D] in q.dtype, lse [B, Hq, Lq])``.

    lse is float32, or float64 when computing in float64.

    ``upcast=True`` computes in float32 (float64 for float64 inputs): the truth. ``upcast=False``
    computes in the inputs' own dtype: what plain PyTorch gets at that precision, the yardstick of the
    tolerance rule. Rows that see no key at all (P = 0, every key masked) give out = 0 and lse = -inf.

    Logits: ``S = softcap * tanh(scale * q.k / softcap)`` (or ``scale * q.k``), plus
    ``alibi_slopes[h] * position`` with prefix column p at position p and input key j at
    ``P + j + alibi_offsets[b]``. Dropout: ``dropout_keep [B, Hq, Lq, P + Lk]`` bool is the keep mask
    (the probabilities of kept entries are divided by ``1 - dropout_p``, dropped ones are zero); the
    LSE is that of S, before dropout.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    P = 0 if prefix_k is None else prefix_k.shape[1]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    cdt = (torch.float64 if q.dtype == torch.float64 else torch.float32) if upcast else q.dtype

    if P > 0:
        k_all = torch.cat([prefix_k.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
        v_all = torch.cat([prefix_v.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
    else:
        k_all, v_all = k, v
    k_all = k_all.to(cdt).repeat_interleave(G, dim=1)
    v_all = v_all.to(cdt).repeat_interleave(G, dim=1)

    scores = torch.matmul(q.to(cdt), k_all.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.to(cdt).view(1, Hq, 1, 1) * alibi_positions(
            B, Lk, P, alibi_offsets, q.device).to(cdt).view(B, 1, 1, P + Lk)
    visible = visibility_mask(Lq, Lk, P, causal=causal, key_padding_mask=key_padding_mask, device=q.device,
                              sliding_window=sliding_window)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    # The row max is only a shift for stability, so it is detached; rows that see no key keep a zero
    # shift and an empty sum, which gives out = 0 and lse = -inf without NaN in value or gradient.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    nonempty = denom > 0
    denom_safe = torch.where(nonempty, denom, torch.ones_like(denom))
    lse = torch.where(nonempty, row_max + torch.log(denom_safe), torch.full_like(denom, float("-inf")))
    lse = lse.squeeze(-1).to(torch.float64 if cdt == torch.float64 else torch.float32)
    probs = probs / denom_safe
    if dropout_keep is not None:
        probs = torch.where(dropout_keep, probs / (1.0 - dropout_p), torch.zeros_like(probs))
    out = torch.matmul(probs, v_all)
    return out.to(q.dtype), lse

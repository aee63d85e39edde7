"""The eager reference of prefix attention: explicit concatenation and an explicit softmax.

This is the truth every backend is tested against. It is written for clarity, not speed: it copies
the prefix B times, repeats K/V over the query heads of each group and materialises the full score
matrix. It is differentiable with ordinary autograd (all five gradients).
"""

from __future__ import annotations

import torch

from .features import Features, with_options


def visibility_mask(
    len_q: int,
    len_k: int,
    prefix_len: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
    sliding_window: int | None = None,
    prefix_visible: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Which keys of ``[prefix ; input]`` each query sees, or None when every key is visible.

    Returns a bool mask of shape ``[B or 1, 1, Lq or 1, P + Lk]`` that broadcasts over the scores
    ``[B, H, Lq, P + Lk]``. Every prefix column is visible. Input column j is visible to query i iff
    ``key_padding_mask[b, j]``; when causal, ``j <= i + (Lk - Lq)`` (bottom-right alignment); with a
    sliding window W, also ``j > i + (Lk - Lq) - W``. The prefix stays visible through any window.
    ``prefix_visible [B, P]`` bool, when given, masks prefix columns per row (rows without a prefix of a
    bank, or columns past a shorter prefix's length).
    """
    if causal and len_q == 1 and (sliding_window is None or sliding_window >= len_k):
        causal = False  # a single query, aligned bottom-right, sees every input key (a decode step)
    if not causal and key_padding_mask is None and prefix_visible is None:
        return None
    rows = len_q if causal else 1
    if key_padding_mask is not None and not causal:
        inp = key_padding_mask.view(-1, 1, 1, len_k)
    else:
        inp = torch.ones(1, 1, rows, len_k, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(len_q, device=device).view(len_q, 1)
        j = torch.arange(len_k, device=device).view(1, len_k)
        diag = i + (len_k - len_q)
        inp = j <= diag
        if sliding_window is not None:
            inp = inp & (j > diag - sliding_window)
        inp = inp.view(1, 1, len_q, len_k)
    if key_padding_mask is not None and causal:
        inp = inp & key_padding_mask.view(-1, 1, 1, len_k)
    if prefix_visible is not None:
        batch = prefix_visible.shape[0]
        inp = inp.expand(batch, 1, rows, len_k)
        pre = prefix_visible.view(batch, 1, 1, prefix_len).expand(batch, 1, rows, prefix_len)
    else:
        pre = torch.ones(inp.shape[0], 1, rows, prefix_len, dtype=torch.bool, device=device)
    return torch.cat([pre, inp], dim=-1)


def prefix_rows(prefix_k, prefix_v, prefix_index, prefix_lengths, batch: int):
    """Each row's prefix, from a single prefix ``[Hkv, P, D]`` or a bank ``[N, Hkv, P, D]``.

    Returns ``(pk [B, Hkv, P, D], pv, visible [B, P] bool or None, lengths [B] or None)``: visible
    marks the prefix columns a row sees (none with index -1, the first lengths[index] otherwise) and
    lengths is each row's prefix length (None when every row has all P columns).
    """
    bank_k = prefix_k if prefix_k.dim() == 4 else prefix_k.unsqueeze(0)
    bank_v = prefix_v if prefix_v.dim() == 4 else prefix_v.unsqueeze(0)
    P = bank_k.shape[2]
    if prefix_index is None:
        pk = bank_k.expand(batch, -1, -1, -1)
        pv = bank_v.expand(batch, -1, -1, -1)
        if prefix_lengths is None:
            return pk, pv, None, None
        row_len = prefix_lengths.view(1).expand(batch).long()
    else:
        safe = prefix_index.long().clamp(min=0)
        pk, pv = bank_k[safe], bank_v[safe]
        full = torch.full_like(safe, P)
        row_len = prefix_lengths.long()[safe] if prefix_lengths is not None else full
        row_len = torch.where(prefix_index >= 0, row_len, torch.zeros_like(row_len))
    visible = torch.arange(P, device=prefix_k.device).view(1, P) < row_len.view(batch, 1)
    return pk, pv, visible, row_len


def alibi_positions(batch: int, len_k: int, prefix_len: int, offsets: torch.Tensor | None,
                    device: torch.device, row_prefix_len: torch.Tensor | None = None) -> torch.Tensor:
    """ALiBi key positions ``[B, P + Lk]``: prefix column p at p, input key j at ``P_b + j + offsets[b]``,
    P_b being the row's prefix length (``row_prefix_len``, default P).

    With ``offsets[b] = -(number of leading pad tokens)`` this equals HF Bloom's
    ``(mask.cumsum(-1) - 1) * mask`` over ``[P ones ; attention_mask]`` at every kept key of a left- or
    right-padded row (padded keys are masked, so their position does not matter).
    """
    cols = torch.arange(prefix_len + len_k, device=device).view(1, -1).expand(batch, -1)
    shift = torch.zeros(batch, dtype=torch.long, device=device)
    if offsets is not None:
        shift = shift + offsets.long()
    if row_prefix_len is not None:
        shift = shift + (row_prefix_len.long() - prefix_len)
    shift = torch.cat([torch.zeros(batch, prefix_len, dtype=torch.long, device=device),
                       shift.view(batch, 1).expand(batch, len_k)], dim=1)
    return cols + shift


@with_options
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
    dropout_keep: torch.Tensor | None = None,
    upcast: bool = True,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference prefix attention. Returns the pair ``(out [B, Hq, Lq, D] in q.dtype, lse [B, Hq, Lq])``, always:
    unlike ``prefix_attention``, which returns ``out`` alone unless ``return_lse=True``. Compare with
    ``out_ref, _ = prefix_attention_ref(...)``.

    lse is float32, or float64 when computing in float64.

    ``upcast=True`` computes in float32 (float64 for float64 inputs): the truth. ``upcast=False``
    computes in the inputs' own dtype: what plain PyTorch gets at that precision, the yardstick of the
    tolerance rule. Rows that see no key at all (P = 0, every key masked) give out = 0 and lse = -inf.

    Logits: ``S = softcap * tanh(scale * q.k / softcap)`` (or ``scale * q.k``), plus
    ``alibi_slopes[h] * position`` with prefix column p at position p and input key j at
    ``P + j + alibi_offsets[b]``, plus ``attn_bias[b, h, i, c]`` (broadcast over its size-1 dims; column c < P
    is prefix column c, column P + j input key j), added last: a -inf there hides that key, and masked keys
    stay masked whatever the bias holds. Dropout: ``dropout_keep [B, Hq, Lq, P + Lk]`` bool is the keep mask
    (the probabilities of kept entries are divided by ``1 - dropout_p``, dropped ones are zero); the
    LSE is that of S, before dropout. A bank ``[N, Hkv, P, D]`` with ``prefix_index [B]`` (-1: none)
    and ``prefix_lengths [N]`` gives each row its own prefix; ALiBi positions of the input then start at
    the row's prefix length. ``options``: the optional features of ``prefix_attention`` (the record of
    ``features.py``), unchecked.
    """
    f = Features(**options)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    cdt = (torch.float64 if q.dtype == torch.float64 else torch.float32) if upcast else q.dtype

    prefix_visible = row_len = None
    if P > 0:
        pk, pv, prefix_visible, row_len = prefix_rows(prefix_k, prefix_v, f.prefix_index, f.prefix_lengths, B)
        k_all = torch.cat([pk, k], dim=2)
        v_all = torch.cat([pv, v], dim=2)
    else:
        k_all, v_all = k, v
    k_all = k_all.to(cdt).repeat_interleave(G, dim=1)
    v_all = v_all.to(cdt).repeat_interleave(G, dim=1)

    scores = torch.matmul(q.to(cdt), k_all.transpose(-1, -2)) * scale
    if f.softcap is not None:
        scores = f.softcap * torch.tanh(scores / f.softcap)
    if f.alibi_slopes is not None:
        scores = scores + f.alibi_slopes.to(cdt).view(1, Hq, 1, 1) * alibi_positions(
            B, Lk, P, f.alibi_offsets, q.device, row_len).to(cdt).view(B, 1, 1, P + Lk)
    if f.attn_bias is not None:
        scores = scores + f.attn_bias.to(cdt)  # [B or 1, Hq or 1, Lq or 1, P + Lk or 1]: broadcasts
    visible = visibility_mask(Lq, Lk, P, causal=causal, key_padding_mask=key_padding_mask, device=q.device,
                              sliding_window=f.sliding_window, prefix_visible=prefix_visible)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    # The row max is only a shift for stability, so it is detached; rows that see no key keep a zero
    # shift and an empty sum, which gives out = 0 and lse = -inf without NaN in value or gradient.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    nonempty = denom != 0  # a NaN sum (a NaN logit) is not an empty row: its lse is NaN, not -inf
    denom_safe = torch.where(nonempty, denom, torch.ones_like(denom))
    lse = torch.where(nonempty, row_max + torch.log(denom_safe), torch.full_like(denom, float("-inf")))
    lse = lse.squeeze(-1).to(torch.float64 if cdt == torch.float64 else torch.float32)
    probs = probs / denom_safe
    if dropout_keep is not None:
        probs = torch.where(dropout_keep, probs / (1.0 - f.dropout_p), torch.zeros_like(probs))
    out = torch.matmul(probs, v_all)
    return out.to(q.dtype), lse

"""The torch backend: prefix attention from stock PyTorch ops, for CPUs and as the universal fallback.

Three paths, by what the call needs:

- Forward with an LSE (training: the backward uses it), on the CPU, without optional features: PyTorch's
  fused CPU flash-attention kernels over ``[prefix ; input]`` (``aten::_scaled_dot_product_flash_attention_for_cpu``
  and its backward, which SDPA itself uses), with the prefix broadcast into one concatenated K/V (repeated to
  the query heads: these kernels take no GQA) and the mask built once at its broadcastable size.
- Output only (inference) without dropout or softcap, on any device: one ``scaled_dot_product_attention``
  call over ``[prefix ; input]`` with GQA, a bool mask for padding, causality and the window (none at all
  for an unpadded decode step), and ALiBi as an additive bias in fp32 / fp64.
- Everything else (ALiBi, dropout, sliding window or softcap in training, a gradient flowing into the LSE,
  CUDA tensors that need an LSE): an explicit fp32 softmax forward and backward, with the query heads of a
  group folded into one matmul so that K/V are never repeated; the prefix gradient is reduced over the
  batch by a sum.

Non-finite inputs follow ``prefix_attention``'s rule on every path: the input keys and values that the padding
mask drops are zeroed while K/V are assembled (never read), and a query holding a NaN gets a NaN output and LSE
where the fused CPU kernel, given no mask, would report 0.

The dropout mask is drawn from a torch.Generator seeded with the call's seed, so the backward
regenerates the forward's mask (it differs from the Triton backend's Philox stream).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .inputs import NO_FEATURES, Features
from .reference import alibi_positions, prefix_rows, visibility_mask


class _Keys:
    """K/V over ``[prefix ; input]`` for every row, with the per-row prefix visibility and length
    (None when every row sees all P prefix columns).

    Input keys that ``key_padding_mask`` drops are zeroed here: masked keys are never read, so a NaN or Inf
    there reaches no output or gradient (a softmax weight of 0 times a NaN value would still be NaN). With
    ``groups`` > 1 each kv head is repeated that many times (the CPU kernels take no GQA)."""

    def __init__(self, k, v, prefix_k, prefix_v, features: Features, key_padding_mask=None, groups: int = 1):
        self.P = 0 if prefix_k is None else prefix_k.shape[-2]
        self.visible = self.row_len = None
        pk = pv = None
        if self.P > 0:
            pk, pv, self.visible, self.row_len = prefix_rows(prefix_k, prefix_v, features.prefix_index,
                                                             features.prefix_lengths, k.shape[0])
        self.k = _join(pk, k, key_padding_mask, groups)
        self.v = _join(pv, v, key_padding_mask, groups)

    def mask(self, len_q, len_k, causal, key_padding_mask, sliding_window=None):
        return visibility_mask(len_q, len_k, self.P, causal=causal, key_padding_mask=key_padding_mask,
                               device=self.k.device, sliding_window=sliding_window, prefix_visible=self.visible)


_SAME_WIDTH_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                   torch.float64: torch.int64}


def _join(prefix: torch.Tensor | None, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
          groups: int) -> torch.Tensor:
    """``[prefix ; x]`` along the keys, ``[B, H * groups, P + L, D]``: each head repeated ``groups`` times and the
    input keys that ``key_padding_mask [B, L]`` drops set to +0. ``x`` itself when there is nothing to do.

    The zeroing is a bitwise AND of the values' bits with 0 or all ones (one vectorised integer pass over the
    input keys, about 20x cheaper than ``masked_fill`` / ``where`` with a broadcast bool mask on a CPU)."""
    P = 0 if prefix is None else prefix.shape[2]
    out = torch.cat([prefix, x], dim=2) if P > 0 else x
    if key_padding_mask is not None:
        as_int = _SAME_WIDTH_INT[x.dtype]
        bits = -key_padding_mask[:, None, :, None].to(as_int)  # 0 (drop) or -1 (all bits set: keep)
        if P > 0:  # the concatenation is ours: zero in place
            out[:, :, P:].view(as_int).bitwise_and_(bits)
        else:
            out = (x.view(as_int) & bits).view(x.dtype)
    return out.repeat_interleave(groups, 1) if groups > 1 else out


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy whose last dim is unit-stride. PyTorch's fused CPU kernels allocate their output like q
    and write it, and read ``out`` in the backward, as if that dim were contiguous whatever its stride (garbage
    for a ``.transpose(-1, -2)`` view). Every other input layout, stride-0 expansions included, they read right."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _propagate_nan_queries(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None):
    """out (and lse) with NaN on the rows of queries holding a NaN. Given no mask, PyTorch's fused CPU kernel
    (SDPA's CPU choice too) returns out = 0 and lse = 0 for such a query, as if its all-NaN score row saw no key;
    the contract propagates NaN. On the CPU one sum of q screens the call (a NaN anywhere makes it NaN), and only
    a flagged call pays for the per-row search; elsewhere the rows are filled without a host sync."""
    if q.device.type == "cpu" and not bool(torch.isnan(q.sum())):
        return out, lse
    bad = torch.isnan(q).any(dim=-1)
    out = out.masked_fill(bad.unsqueeze(-1), float("nan"))
    if lse is not None:
        lse = lse.masked_fill(bad, float("nan"))
    return out, lse


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

    def __init__(self, q, keys: _Keys, k_all, key_padding_mask, causal, scale, features: Features, len_k: int):
        B, Hq, Lq, _ = q.shape
        Hkv, n_cols = k_all.shape[1], k_all.shape[2]
        G = Hq // Hkv
        P = keys.P
        self.shape5 = (B, Hkv, G, Lq, n_cols)
        raw = torch.matmul(q.unflatten(1, (Hkv, G)), k_all.unsqueeze(2).transpose(-1, -2)) * scale
        self.tanh = None
        if features.softcap is not None:
            self.tanh = torch.tanh(raw / features.softcap)
            raw = features.softcap * self.tanh
        if features.alibi_slopes is not None:
            pos = alibi_positions(B, len_k, P, features.alibi_offsets, q.device, keys.row_len).to(raw.dtype)
            raw = raw + features.alibi_slopes.to(raw.dtype).view(1, Hkv, G, 1, 1) * pos.view(B, 1, 1, 1, n_cols)
        if features.attn_bias is not None:
            raw = raw + _grouped(features.attn_bias, Hkv, G).to(raw.dtype)
        mask = keys.mask(Lq, len_k, causal, key_padding_mask, features.sliding_window)
        if mask is not None:
            raw = raw.masked_fill(~mask.unsqueeze(2), float("-inf"))
        self.lse = torch.logsumexp(raw, dim=-1)
        probs = torch.softmax(raw, dim=-1)
        if mask is not None or features.attn_bias is not None:
            # softmax of a row with no visible key (masked, or -inf in the bias) is 0/0; such rows are zero.
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


def _grouped(bias: torch.Tensor, heads_kv: int, group: int) -> torch.Tensor:
    """attn_bias [B or 1, Hq or 1, Lq or 1, n or 1] -> [B or 1, Hkv or 1, G or 1, Lq or 1, n or 1] (a view)."""
    return bias.unsqueeze(1) if bias.shape[1] == 1 else bias.unflatten(1, (heads_kv, group))


def _is_plain(features: Features) -> bool:
    return not features.scores  # no feature that changes the scores (a bank only chooses the keys)


def _sdpa_serves(q: torch.Tensor, features: Features) -> bool:
    """Whether one ``scaled_dot_product_attention`` call computes an output-only forward: plain calls, a
    sliding window (a bool mask), and ALiBi or attn_bias in fp32 / fp64 (an additive bias; in half precision the
    bias of far keys would round to steps of a whole logit, so the explicit fp32 path keeps those)."""
    if features.dropout_p > 0 or features.softcap is not None:
        return False
    additive = features.alibi_slopes is not None or features.attn_bias is not None
    return not additive or q.dtype in (torch.float32, torch.float64)


def _use_cpu_flash(q: torch.Tensor, features: Features) -> bool:
    """PyTorch's fused CPU attention kernels serve plain CPU calls (when this torch has them)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and _is_plain(features) and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"))


def _cpu_flash_operands(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, features):
    """Concatenated K/V repeated to Hq heads (the CPU kernels take no GQA), padded keys zeroed, the additive
    mask, and the bool visibility mask (None when everything is visible)."""
    Hq, Hkv, Lq, Lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    keys = _Keys(k, v, prefix_k, prefix_v, features, key_padding_mask, Hq // Hkv)
    visible = keys.mask(Lq, Lk, causal, key_padding_mask)
    additive = None
    if visible is not None:
        additive = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    return keys.k, keys.v, additive, visible


def _into(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``result`` in ``like``'s dtype and memory layout (what the fake implementation promises):
    ``result`` itself when it already is (a fresh tensor, never an input), else a copy."""
    out = torch.empty_like(like)
    if result.dtype == out.dtype and result.stride() == out.stride() and result.shape == out.shape:
        return result
    out.copy_(result)
    return out


def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, need_lse, features=NO_FEATURES):
    """out [B, Hq, Lq, D] (laid out like q), lse [B, Hq, Lq] fp32 (or [B, Hq, 0] if not need_lse)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    # With a prefix every row sees (no bank selection, no lengths), no row can be left without a key.
    keys_always_visible = prefix_k is not None and prefix_k.shape[-2] > 0 and features.prefix_index is None \
        and features.prefix_lengths is None
    if need_lse and _use_cpu_flash(q, features):
        k_all, v_all, additive, visible = _cpu_flash_operands(q, k, v, prefix_k, prefix_v, key_padding_mask, causal,
                                                              features)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(_unit_last(q), k_all, v_all,
                                                                             attn_mask=additive, scale=scale)
        if additive is None:
            out, lse = _propagate_nan_queries(q, out, lse)
        elif not keys_always_visible:
            # The kernel reports 0 for a row that sees no key; the contract says -inf.
            lse = lse.masked_fill(~visible.any(dim=-1), float("-inf"))
        return _into(out, q), lse.contiguous()
    keys = _Keys(k, v, prefix_k, prefix_v, features, key_padding_mask)
    if need_lse or not _sdpa_serves(q, features):
        cdt = _compute_dtype(q.dtype)
        logits = _Logits(q.to(cdt), keys, keys.k.to(cdt), key_padding_mask, causal, scale, features, Lk)
        out = torch.matmul(logits.dropped(logits.probs), keys.v.to(cdt).unsqueeze(2)).flatten(1, 2)
        lse = logits.lse.flatten(1, 2).float() if need_lse else q.new_empty((B, Hq, 0), dtype=torch.float32)
        return _into(out, q), lse
    mask = keys.mask(Lq, Lk, causal, key_padding_mask, features.sliding_window)
    attn_mask = mask
    additive = None
    if features.alibi_slopes is not None:
        # The bias depends on the key alone: [B, Hq, 1, P + Lk].
        pos = alibi_positions(B, Lk, keys.P, features.alibi_offsets, q.device, keys.row_len).to(q.dtype)
        additive = features.alibi_slopes.to(q.dtype).view(1, Hq, 1, 1) * pos.view(B, 1, 1, -1)
    if features.attn_bias is not None:
        bias = features.attn_bias.to(q.dtype)
        additive = bias if additive is None else additive + bias
    if additive is not None:
        attn_mask = additive if mask is None else additive.masked_fill(~mask, float("-inf"))  # -inf: not visible
    out = F.scaled_dot_product_attention(q, keys.k, keys.v, attn_mask=attn_mask, scale=scale, enable_gqa=Hq != Hkv)
    if attn_mask is None:
        out, _ = _propagate_nan_queries(q, out, None)
    elif features.attn_bias is not None:
        # Rows that see no key at all (masked, or -inf in the bias) are zeros; not every SDPA kernel agrees.
        out = out.masked_fill(torch.isneginf(attn_mask).all(dim=-1, keepdim=True), 0.0)
    elif mask is not None and not keys_always_visible:
        # Rows that see no key at all are defined as zeros; not every SDPA kernel agrees on them.
        out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return _into(out, q), q.new_empty((B, Hq, 0), dtype=torch.float32)


def backward(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale,
             features=NO_FEATURES):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v); the prefix ones are None when there is no prefix.

    The CPU kernels' backward uses the forward's ``out`` and ``lse``; the explicit path recomputes the
    softmax in fp32 and needs neither.
    """
    B, Hq = q.shape[:2]
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    if _use_cpu_flash(q, features) and (dlse is None or dlse.numel() == 0) and lse.numel() > 0:
        k_all, v_all, additive, _ = _cpu_flash_operands(q, k, v, prefix_k, prefix_v, key_padding_mask, causal,
                                                        features)
        lse_k = lse.masked_fill(torch.isneginf(lse), 0.0)  # back to the kernel's convention for empty rows
        dq, dk_all, dv_all = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k_all, v_all, _unit_last(out), lse_k, 0.0, False, attn_mask=additive, scale=scale)
        n_all = P + Lk
        dk_all = dk_all.view(B, Hkv, G, n_all, -1).sum(dim=2) if G > 1 else dk_all
        dv_all = dv_all.view(B, Hkv, G, n_all, -1).sum(dim=2) if G > 1 else dv_all
        return _split_grads(dq, dk_all, dv_all, q, k, v, prefix_k, prefix_v, P, features)
    cdt = _compute_dtype(q.dtype)
    keys = _Keys(k, v, prefix_k, prefix_v, features, key_padding_mask)
    k_all, v_all = keys.k.to(cdt), keys.v.to(cdt)
    q5 = q.unflatten(1, (Hkv, G)).to(cdt)
    do5 = dout.unflatten(1, (Hkv, G)).to(cdt)

    logits = _Logits(q.to(cdt), keys, k_all, key_padding_mask, causal, scale, features, Lk)
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
    return _split_grads(dq, dk_all, dv_all, q, k, v, prefix_k, prefix_v, P, features)


def _prefix_grad(rows: torch.Tensor, prefix: torch.Tensor, prefix_index: torch.Tensor | None) -> torch.Tensor:
    """Per-row prefix gradients [B, Hkv, P, D] -> the prefix's (or bank's) gradient: each prefix gets the sum
    over the rows that use it, in fp32, as a one-hot matmul (deterministic on every device)."""
    if prefix_index is None:
        total = rows.sum(dim=0, dtype=torch.float32)
        return total.view(prefix.shape).to(prefix.dtype)
    n = prefix.shape[0] if prefix.dim() == 4 else 1
    onehot = (prefix_index.view(-1, 1) == torch.arange(n, device=rows.device).view(1, n)).to(torch.float32)
    total = (onehot.t() @ rows.float().flatten(1)).view(n, *rows.shape[1:])
    return total.view(prefix.shape).to(prefix.dtype)


def _split_grads(dq, dk_all, dv_all, q, k, v, prefix_k, prefix_v, P, features=NO_FEATURES):
    """Gradients of [prefix ; input] K/V -> (dq, dk, dv, dprefix_k, dprefix_v) in the inputs' layouts,
    each prefix's summed over the rows that use it (accumulated in fp32)."""
    dq = _into(dq, q)
    dk = _into(dk_all[:, :, P:], k)
    dv = _into(dv_all[:, :, P:], v)
    if P == 0:
        return dq, dk, dv, None, None
    dpk = _prefix_grad(dk_all[:, :, :P], prefix_k, features.prefix_index)
    dpv = _prefix_grad(dv_all[:, :, :P], prefix_v, features.prefix_index)
    return dq, dk, dv, dpk, dpv

"""The torch backend: prefix attention from stock PyTorch ops, for CPUs and as the universal fallback.

Paths, by what the call needs:

- PyTorch's fused CPU flash-attention kernels (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its
  backward, SDPA's own CPU choice) whenever the scores need nothing but an additive mask: padding, causality, the
  sliding window, a prefix bank, and ALiBi and attn_bias in fp32 (folded into the mask). The query heads of a kv
  group are folded into the query rows (``[B, Hkv, G * Lq, D]``), so K/V are never repeated (these kernels take
  no GQA) and the kernels' dK/dV come out already summed over the group. The prefix is broadcast into one
  concatenation ``[prefix ; input]``, and the mask is built once at its broadcastable size.
- Decoding (output only, at most ``DECODE_MAX_Q`` queries, one shared prefix, on the CPU): the fused kernel
  over the cache alone and over the prefix alone (every row's queries against the one prefix in a single call),
  merged by their LSEs, so the cache is never copied.
- Training with dropout on the CPU: explicit scores in fp32 in the same folded layout; the probabilities and
  the keep mask are kept for the backward (neither the softmax nor the random mask is recomputed).
- Everything else (softcap, ALiBi in half precision, a gradient flowing into the LSE, CUDA tensors that need an
  LSE): an explicit fp32 softmax forward and backward, recomputed in the backward; the prefix gradient is reduced
  over the batch by a sum.

In eager training (no tracing, no subclass) the fused and the dropout paths run as ``torch.autograd.Function`` s
called directly (:func:`autograd_forward`), without the custom op's dispatch; otherwise the custom op runs
:func:`forward` and :func:`backward`, which recompute the operands.

``attn_bias`` (T5's position bias) is added to the fused kernels' mask beside ALiBi (fp32 calls; the dropout path's
mask is fp32 whatever q's dtype), and in :class:`_Logits` on the explicit path; a row it leaves without a key
is an empty row like any other.

Non-finite inputs follow ``prefix_attention``'s rule on every path: the input keys and values that the padding
mask drops are zeroed while K/V are assembled (never read; on the CPU without a prefix, only when the padded
span holds a non-finite value, so finite inputs are not copied), and a query holding a NaN gets a NaN output and
LSE where the fused CPU kernel, given no mask, would report 0.

The dropout mask is drawn from a torch.Generator seeded with the call's seed (:func:`dropout_keep_mask`; it
differs from the Triton backend's Philox stream); the backward of the eager path reuses the forward's mask, the
custom op's regenerates it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..memo import TensorMemo
from .inputs import NO_FEATURES, Features
from .reference import alibi_positions, prefix_rows, visibility_mask

# PyTorch's fused CPU attention (None in a torch without them).
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FLASH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Calls with at most this many queries that need no LSE attend to the prefix and the cache apart (decoding).
DECODE_MAX_Q = 16
# ... and a cache of at least this many elements in K (measured crossover on a 2-core CPU, fp32; see _decode_serves).
DECODE_MIN_CACHE = 2**16


class _Keys:
    """K/V over ``[prefix ; input]`` for every row, with the per-row prefix visibility and length
    (None when every row sees all P prefix columns).

    Input keys that ``key_padding_mask`` drops are zeroed here: masked keys are never read, so a NaN or Inf
    there reaches no output or gradient (a softmax weight of 0 times a NaN value would still be NaN)."""

    def __init__(self, k, v, prefix_k, prefix_v, features: Features, key_padding_mask=None):
        self.P = 0 if prefix_k is None else prefix_k.shape[-2]
        self.visible = self.row_len = None
        pk = pv = None
        if self.P > 0:
            pk, pv, self.visible, self.row_len = prefix_rows(prefix_k, prefix_v, features.prefix_index,
                                                             features.prefix_lengths, k.shape[0])
        self.k = _join(pk, k, key_padding_mask)
        self.v = _join(pv, v, key_padding_mask)

    def mask(self, len_q, len_k, causal, key_padding_mask, sliding_window=None):
        return visibility_mask(len_q, len_k, self.P, causal=causal, key_padding_mask=key_padding_mask,
                               device=self.k.device, sliding_window=sliding_window, prefix_visible=self.visible)


_SAME_WIDTH_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                   torch.float64: torch.int64}
_spans = TensorMemo()


def _padded_span(key_padding_mask: torch.Tensor) -> tuple[int, int]:
    """``(lo, hi)``: the key columns ``[lo, hi)`` that hold every padded key of the batch (lo == hi: none). Read
    back to the host once per mask within a memo scope (a model's layers share one mask)."""
    span = _spans.get("span", key_padding_mask)
    if span is None:
        cols = (~key_padding_mask).any(dim=0).nonzero()
        span = (0, 0) if cols.numel() == 0 else (int(cols[0]), int(cols[-1]) + 1)
        _spans.put("span", key_padding_mask, span)
    return span


def _without_full_mask(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """None for a CPU padding mask that keeps every key (generate passes one for unpadded prompts), which then
    costs no mask, no zeroing and no empty-row fix; the mask itself otherwise."""
    if key_padding_mask is None or key_padding_mask.device.type != "cpu":
        return key_padding_mask
    lo, hi = _padded_span(key_padding_mask)
    return None if lo == hi else key_padding_mask


def _padded_keys_finite(x: torch.Tensor, key_padding_mask: torch.Tensor) -> bool:
    """Whether every key of ``x [B, H, L, D]`` in the padded span is finite (a CPU check: one read of that span,
    where zeroing the padded keys would copy all of x)."""
    lo, hi = _padded_span(key_padding_mask)
    return lo == hi or bool(torch.isfinite(x[:, :, lo:hi].sum(dtype=torch.float32)))


def _join(prefix: torch.Tensor | None, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``[prefix ; x]`` along the keys, ``[B, H, P + L, D]``, with the input keys that ``key_padding_mask [B, L]``
    drops set to +0. ``x`` itself when there is nothing to do: no prefix and no padding, or (on the CPU) no prefix
    and only finite values among the padded keys, which the mask then keeps from every output and gradient.

    The zeroing is a bitwise AND of the values' bits with 0 or all ones (one vectorised integer pass over the
    input keys, about 20x cheaper than ``masked_fill`` / ``where`` with a broadcast bool mask on a CPU)."""
    P = 0 if prefix is None else prefix.shape[2]
    if P == 0 and (key_padding_mask is None or (x.device.type == "cpu" and _padded_keys_finite(x, key_padding_mask))):
        return x
    out = torch.cat([prefix, x], dim=2) if P > 0 else x
    if key_padding_mask is not None:
        as_int = _SAME_WIDTH_INT[x.dtype]
        bits = -key_padding_mask[:, None, :, None].to(as_int)  # 0 (drop) or -1 (all bits set: keep)
        if P > 0:  # the concatenation is ours: zero in place
            out[:, :, P:].view(as_int).bitwise_and_(bits)
        else:
            out = (x.view(as_int) & bits).view(x.dtype)
    return out


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
    if q.device.type == "cpu" and not math.isnan(q.sum().item()):
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


def _fused_serves(q: torch.Tensor, features: Features) -> bool:
    """Whether PyTorch's fused CPU kernels serve the call: CPU tensors of their dtypes, scores changed by nothing
    but an additive mask (padding, causality, the window, a bank; ALiBi and attn_bias in fp32 only, for the reason
    above: both are folded into the mask, which has q's dtype)."""
    return (q.device.type == "cpu" and q.dtype in _FLASH_DTYPES and _FLASH_BWD is not None
            and features.dropout_p == 0 and features.softcap is None
            and ((features.alibi_slopes is None and features.attn_bias is None) or q.dtype == torch.float32))


def _fold(x: torch.Tensor, heads_kv: int, groups: int) -> torch.Tensor:
    """``[B, Hq, L, D]`` -> ``[B, Hkv, G * L, D]``: the query heads of each kv head folded into its rows (a copy
    unless x is contiguous); x itself, with a unit-stride last dim, when G = 1."""
    if groups == 1:
        return _unit_last(x)
    B, _, L, D = x.shape
    return x.reshape(B, heads_kv, groups * L, D)


def _fold_rows(m: torch.Tensor, heads_kv: int, groups: int, len_q: int) -> torch.Tensor:
    """A per-(head, query) tensor ``[B', 1 or Hq, 1 or Lq, X]`` in the folded layout ``[B', 1 or Hkv, 1 or G * Lq,
    X]`` (it stays broadcast where it does not depend on the head or the query)."""
    Bm, Hm, Rm, X = m.shape
    if groups == 1 or (Hm == 1 and Rm == 1):
        return m
    if Hm == 1:
        return m.unsqueeze(2).expand(Bm, 1, groups, Rm, X).reshape(Bm, 1, groups * Rm, X)
    return m.expand(Bm, Hm, len_q, X).reshape(Bm, heads_kv, groups * len_q, X)


def _log_of(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of a bool visibility mask: log(1) = 0 where visible, log(0) = -inf elsewhere (through
    uint8, much cheaper on a CPU than ``masked_fill`` with a bool mask)."""
    return visible.view(torch.uint8).to(dtype).log_()


class _MaskMemo:
    """The masks of :class:`_Fused`, made once for the calls that share what they are made of.

    A mask that depends on the sizes and on small values alone (causality, the window, the ALiBi slopes and
    offsets, read into the key: a model's layers each hold their own slopes tensor and Bloom makes offsets per
    layer) is kept in a small table across calls: it is never written, and nothing but its key can change it. One
    made from the padding mask or the bank selection is remembered inside a
    :func:`~prefix_kernels.ops.memo.memo_scope` only (a model's layers in one forward), for the same tensor objects
    at the same versions; the entry holds them, so their ids cannot be reused while it lives."""

    LIMIT = 64

    def __init__(self):
        self.sized: dict = {}
        self.memo = TensorMemo()

    def get(self, key, sources):
        first = next((t for t in sources if t is not None), None)
        if first is None:
            return self.sized.get(key)
        entry = self.memo.get("mask", first, key)
        if entry is None:
            return None
        made, held, versions = entry
        if all(a is b for a, b in zip(held, sources, strict=True)) and versions == _versions(sources):
            return made
        return None

    def put(self, key, sources, made) -> None:
        first = next((t for t in sources if t is not None), None)
        if first is None:
            if len(self.sized) >= self.LIMIT:
                self.sized.clear()
            self.sized[key] = made
        else:
            self.memo.put("mask", first, (made, sources, _versions(sources)), key)


def _versions(tensors) -> tuple:
    return tuple(None if t is None or t.is_inference() else t._version for t in tensors)


_masks = _MaskMemo()


class _Fused:
    """One call's operands in the layout of the fused CPU kernels.

    ``q`` ``[B, Hkv, G * Lq, D]`` (the query heads of a group folded into its rows); ``k``, ``v`` ``[B, Hkv, P + Lk,
    D]`` over ``[prefix ; input]``, padded keys zeroed; ``mask`` the additive mask ``[B or 1, Hkv or 1, G * Lq or 1,
    P + Lk]`` in ``mask_dtype`` with ALiBi and attn_bias folded in (None when everything is visible and nothing is
    added); ``empty`` ``[B or 1, 1 or Hkv, G * Lq or 1]`` bool, the rows that see no key (by the mask or a bias of
    -inf), or None when every row sees one."""

    __slots__ = ("shape", "groups", "P", "q", "k", "v", "mask", "empty", "shared")

    def __init__(self, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, features: Features, mask_dtype,
                 folded: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """``folded``: q already folded (then ``q`` may be any tensor of q's shape, say a meta one); ``mask``: the
        mask, already made (then ``empty`` is not made)."""
        B, Hq, Lq, _ = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        self.shape, self.groups = q.shape, G
        self.q = _fold(q, Hkv, G) if folded is None else folded
        keys = _Keys(k, v, prefix_k, prefix_v, features, key_padding_mask)
        self.P, self.k, self.v = keys.P, _unit_last(keys.k), _unit_last(keys.v)
        # What the mask depends on: the sizes and small values, and these tensors (a model's layers share them
        # within a forward).
        sources = (key_padding_mask, features.prefix_index, features.prefix_lengths, features.attn_bias)
        small = tuple(None if t is None else tuple(t.tolist()) for t in (features.alibi_slopes,
                                                                         features.alibi_offsets))
        key = (B, Hq, Hkv, Lq, Lk, keys.P, causal, features.sliding_window, mask_dtype, k.device,
               torch.is_inference_mode_enabled(), small)
        self.shared = all(t is None for t in sources)  # from the table of sizes: no need to keep it per call
        if mask is not None:
            self.mask, self.empty = mask, None
            return
        made = _masks.get(key, sources)
        if made is None:
            made = self._make_mask(keys, key_padding_mask, causal, features, mask_dtype)
            _masks.put(key, sources, made)
        self.mask, self.empty = made

    def _make_mask(self, keys: _Keys, key_padding_mask, causal, features: Features, mask_dtype):
        B, Hq, Lq, _ = self.shape
        Hkv, Lk, G = self.k.shape[1], self.k.shape[2] - keys.P, self.groups
        device = self.k.device
        visible = keys.mask(Lq, Lk, causal, key_padding_mask, features.sliding_window)
        mask = None if visible is None else _log_of(visible, mask_dtype)
        if features.alibi_slopes is not None:  # (an additive bias on the scores goes here too)
            pos = alibi_positions(B, Lk, keys.P, features.alibi_offsets, device, keys.row_len).to(mask_dtype)
            bias = features.alibi_slopes.to(mask_dtype).view(1, Hq, 1, 1) * pos.view(B, 1, 1, -1)
            mask = bias if mask is None else bias + mask
        if features.attn_bias is not None:  # [B or 1, Hq or 1, Lq or 1, P + Lk or 1]; -inf hides a key
            bias = features.attn_bias.to(mask_dtype)
            bias = bias.expand(*bias.shape[:-1], keys.P + Lk)
            mask = bias if mask is None else bias + mask
        folded = None if mask is None else _fold_rows(mask, Hkv, G, Lq)
        empty = None
        if features.attn_bias is not None:  # the bias can leave a row without a key, prefix or not
            empty = _fold_rows(torch.isneginf(mask).all(dim=-1, keepdim=True), Hkv, G, Lq).squeeze(-1)
        # With a prefix that every row sees (no bank selection, no lengths), no row can be left without a key.
        elif visible is not None and not (keys.P > 0 and keys.visible is None):
            empty = _fold_rows(~visible.any(dim=-1, keepdim=True), Hkv, G, Lq).squeeze(-1)
        return folded, empty

    def public(self, out: torch.Tensor, lse: torch.Tensor | None):
        """The kernel's folded (out, lse) as ``[B, Hq, Lq, D]`` and ``[B, Hq, Lq]`` (lse -inf on empty rows)."""
        B, Hq, Lq, D = self.shape
        if self.groups > 1:
            out = out.reshape(B, Hq, Lq, D)
        if lse is not None:
            if self.empty is not None:
                lse = lse.masked_fill(self.empty, float("-inf"))
            lse = lse.reshape(B, Hq, Lq)
        return out, lse

    def unfold(self, dq: torch.Tensor) -> torch.Tensor:
        return dq.reshape(self.shape) if self.groups > 1 else dq


def _fused_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, features):
    """(operands, kernel out, kernel lse, out [B, Hq, Lq, D], lse [B, Hq, Lq] fp32) of the fused kernel."""
    f = _Fused(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, features, q.dtype)
    out_k, lse_k = _FLASH(f.q, f.k, f.v, attn_mask=f.mask, scale=scale)
    out, lse = f.public(out_k, lse_k)
    if f.mask is None:
        out, lse = _propagate_nan_queries(q, out, lse)
    return f, out_k, lse_k, out, lse


def _grads_of_keys(dk_all, dv_all, P, prefix_shape, prefix_dtype, prefix_index):
    """(dk, dv, dprefix_k, dprefix_v) from the gradients of ``[prefix ; input]`` (views; the prefix's summed)."""
    if P == 0:
        return dk_all, dv_all, None, None
    n = dk_all.shape[2] - P
    return (dk_all.narrow(2, P, n), dv_all.narrow(2, P, n),
            _prefix_grad(dk_all.narrow(2, 0, P), prefix_shape, prefix_dtype, prefix_index),
            _prefix_grad(dv_all.narrow(2, 0, P), prefix_shape, prefix_dtype, prefix_index))


def _compact(t: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """``t`` to keep for a backward: a copy of its own when it is a view into a larger storage that ``others``
    do not share (q sliced out of a fused QKV projection whose K and V went through a cache: keeping the view would
    keep all of QKV alive), else ``t``."""
    storage = t.untyped_storage()
    if storage.nbytes() <= t.numel() * t.element_size():
        return t
    if any(o is not None and o.untyped_storage().data_ptr() == storage.data_ptr() for o in others):
        return t
    return t.contiguous()


class _FusedFunction(torch.autograd.Function):
    """The fused CPU kernels in eager training: the folded operands and the kernel's own out / LSE are kept for
    its backward (nothing is rebuilt)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, features):
        f, out_k, lse_k, out, _ = _fused_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale,
                                                 features)
        # K/V over [prefix ; input] are joined again in the backward (a copy of the inputs, which are kept anyway),
        # and a mask of the table of sizes is looked up again: only the inputs, q folded, out and the LSE are kept.
        # Without GQA the output kept is the one returned (which the next layer keeps too); with GQA the kernel's,
        # folded (one more output-sized tensor kept, one copy fewer in the backward).
        out = _into(out, q)
        ctx.save_for_backward(_compact(f.q, k, v), k, v, prefix_k, prefix_v, key_padding_mask,
                              None if f.shared else f.mask, out_k if f.groups > 1 else out, lse_k)
        ctx.meta = (f.shape, f.groups, f.P, scale, causal, features)
        return out

    @staticmethod
    def backward(ctx, dout):
        fq, k, v, prefix_k, prefix_v, key_padding_mask, mask, out, lse_k = ctx.saved_tensors
        shape, G, P, scale, causal, features = ctx.meta
        f = _Fused(torch.empty(shape, device="meta"), k, v, prefix_k, prefix_v, key_padding_mask, causal, features,
                   fq.dtype, folded=fq, mask=mask)
        dq, dk_all, dv_all = _FLASH_BWD(_fold(dout, k.shape[1], G), fq, f.k, f.v, out, lse_k, 0.0, False,
                                        attn_mask=f.mask, scale=scale)
        prefix = None if prefix_k is None else (prefix_k.shape, prefix_k.dtype)
        prefix_index = features.prefix_index
        dq = dq.reshape(shape) if G > 1 else dq
        dk, dv, dpk, dpv = _grads_of_keys(dk_all, dv_all, P, *(prefix or (None, None)), prefix_index)
        return dq, dk, dv, dpk, dpv, None, None, None, None


class _DropoutFunction(torch.autograd.Function):
    """Attention dropout in eager training on the CPU: explicit scores in fp32 (fp64 for fp64) in the folded
    layout, the additive mask of :class:`_Fused`; the probabilities and the keep mask are kept for the backward
    (5 bytes per score, where PyTorch's math path keeps 9), so it recomputes neither."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, features):
        cdt = _compute_dtype(q.dtype)
        B, Hq, Lq, _ = q.shape
        f = _Fused(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, features, cdt)
        fk, fv = f.k.to(cdt), f.v.to(cdt)
        scores = torch.matmul(f.q.to(cdt), fk.transpose(-1, -2)).mul_(scale)
        if f.mask is not None:
            scores.add_(f.mask)
        probs = torch.softmax(scores, dim=-1)
        del scores
        if f.empty is not None:  # softmax of a row with no visible key is 0/0; such rows are defined as zero
            probs.masked_fill_(f.empty.unsqueeze(-1), 0.0)
        keep = dropout_keep_mask(features.dropout_seed, B, Hq, Lq, fk.shape[2], features.dropout_p,
                                 q.device).view(probs.shape)
        factor = keep.view(torch.uint8).to(cdt).mul_(1.0 / (1.0 - features.dropout_p))
        out = f.unfold(torch.matmul(probs.mul(factor), fv))
        ctx.save_for_backward(f.q, f.k, f.v, probs, keep, features.prefix_index)
        ctx.meta = (f.shape, f.groups, f.P, scale, features.dropout_p,
                    None if prefix_k is None else (prefix_k.shape, prefix_k.dtype))
        return _into(out, q)

    @staticmethod
    def backward(ctx, dout):
        fq, fk, fv, probs, keep, prefix_index = ctx.saved_tensors
        shape, G, P, scale, dropout_p, prefix = ctx.meta
        cdt = probs.dtype
        factor = keep.view(torch.uint8).to(cdt).mul_(1.0 / (1.0 - dropout_p))
        do = _fold(dout, fk.shape[1], G).to(cdt)
        fq, fk, fv = fq.to(cdt), fk.to(cdt), fv.to(cdt)
        dv_all = torch.matmul(probs.mul(factor).transpose(-1, -2), do)
        dprobs = torch.matmul(do, fv.transpose(-1, -2)).mul_(factor)
        delta = (probs * dprobs).sum(dim=-1, keepdim=True)
        dscores = dprobs.sub_(delta).mul_(probs)
        dq = torch.matmul(dscores, fk).mul_(scale)
        dk_all = torch.matmul(dscores.transpose(-1, -2), fq).mul_(scale)
        dq = (dq.reshape(shape) if G > 1 else dq).to(dout.dtype)
        dk, dv, dpk, dpv = _grads_of_keys(dk_all.to(dout.dtype), dv_all.to(dout.dtype), P,
                                          *(prefix or (None, None)), prefix_index)
        return dq, dk, dv, dpk, dpv, None, None, None, None


def autograd_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, features=NO_FEATURES):
    """out ``[B, Hq, Lq, D]`` of an eager training call whose autograd this backend runs itself (no LSE is
    returned), or None when the call is not one of those (the custom op serves it then)."""
    if q.device.type != "cpu" or features.softcap is not None:
        return None
    key_padding_mask = _without_full_mask(key_padding_mask)
    if features.dropout_p > 0:
        return _DropoutFunction.apply(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, features)
    if _fused_serves(q, features):
        return _FusedFunction.apply(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, features)
    return None


def _decode_serves(q: torch.Tensor, k: torch.Tensor, prefix_k, features: Features) -> bool:
    """Whether :func:`_decode` serves an output-only call: a few queries against one shared prefix and a cache of
    at least ``DECODE_MIN_CACHE`` elements per K or V (below that, copying the cache costs less than the second
    kernel call and the merge), on the CPU."""
    return (q.shape[2] <= DECODE_MAX_Q and k.numel() >= DECODE_MIN_CACHE and prefix_k is not None
            and prefix_k.dim() == 3 and features.prefix_index is None and features.prefix_lengths is None
            and features.attn_bias is None and _fused_serves(q, features))


def _decode(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, features):
    """Output-only attention over ``[prefix ; cache]`` without concatenating them: the fused kernel over the cache
    (GQA folded into the rows, the mask over the cache alone) and over the prefix (every row's queries against the
    one prefix in a single call: ``[1, Hkv, B * G * Lq, D]``), merged by their LSEs, ``out = o_prefix * sigmoid(d) +
    o_cache * sigmoid(-d)`` with ``d = lse_prefix - lse_cache``."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    P = prefix_k.shape[1]
    qf = _fold(q, Hkv, G)
    # The cache alone.
    kk, vv = _unit_last(_join(None, k, key_padding_mask)), _unit_last(_join(None, v, key_padding_mask))
    visible = visibility_mask(Lq, Lk, 0, causal=causal, key_padding_mask=key_padding_mask, device=q.device,
                              sliding_window=features.sliding_window)
    mask = None if visible is None else _log_of(visible, q.dtype)
    prefix_bias = None
    if features.alibi_slopes is not None:  # (an additive bias on the scores goes here too, split at P)
        slopes = features.alibi_slopes.view(1, Hq, 1, 1)
        pos = alibi_positions(B, Lk, P, features.alibi_offsets, q.device).to(q.dtype)
        bias = slopes * pos[:, P:].view(B, 1, 1, Lk)
        mask = bias if mask is None else bias + mask
        # Prefix column p sits at position p in every row: [1, Hkv, B * G * Lq, P].
        cols = torch.arange(P, device=q.device, dtype=q.dtype)
        prefix_bias = (features.alibi_slopes.view(Hkv, 1, G, 1, 1) * cols.view(1, 1, 1, 1, P)).expand(
            Hkv, B, G, Lq, P).reshape(1, Hkv, B * G * Lq, P)
    mask = None if mask is None else _fold_rows(mask, Hkv, G, Lq)
    o_cache, lse_cache = _FLASH(qf, kk, vv, attn_mask=mask, scale=scale)
    if visible is not None:  # rows that see no cached key: the kernel says lse 0 and out 0, the merge needs -inf
        lse_cache = lse_cache.masked_fill(_fold_rows(~visible.any(dim=-1, keepdim=True), Hkv, G, Lq).squeeze(-1),
                                          float("-inf"))
    # The prefix alone, every row's queries in one call.
    qp = qf.reshape(B, Hkv, G * Lq, D).transpose(0, 1).reshape(1, Hkv, B * G * Lq, D)
    o_pre, lse_pre = _FLASH(qp, _unit_last(prefix_k).unsqueeze(0), _unit_last(prefix_v).unsqueeze(0),
                            attn_mask=prefix_bias, scale=scale)
    # Merge, in [B, Hkv, G, Lq, ...] views of every part.
    o_pre = o_pre.view(Hkv, B, G, Lq, D).transpose(0, 1)
    lse_pre = lse_pre.reshape(Hkv, B, G, Lq).transpose(0, 1)
    o_cache = o_cache.view(B, Hkv, G, Lq, D)
    # Each part's weight from its own sigmoid, and a weighted sum rather than a lerp: an Inf in a visible value
    # stays Inf (a lerp computes inf - inf), and a part far below the other keeps a tiny weight instead of 1 - 1.
    diff = (lse_pre - lse_cache.reshape(B, Hkv, G, Lq)).unsqueeze(-1)
    w_pre, w_cache = torch.sigmoid(diff), torch.sigmoid(-diff)
    out = torch.empty_like(q)
    if q.dtype == torch.float32:
        merged = out.unflatten(1, (Hkv, G))
        torch.mul(o_cache, w_cache, out=merged).addcmul_(o_pre, w_pre)
    else:
        out.unflatten(1, (Hkv, G)).copy_(torch.addcmul(o_cache.float() * w_cache, o_pre.float(), w_pre))
    out, _ = _propagate_nan_queries(q, out, None)
    return out


def _into(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``result`` in ``like``'s dtype and memory layout (what the fake implementation promises):
    ``result`` itself when it already is (a fresh tensor, never an input), else a copy."""
    out = torch.empty_like(like)
    if result.dtype == out.dtype and result.stride() == out.stride() and result.shape == out.shape:
        return result
    out.copy_(result)
    return out


def _alibi_bias(q, B, Hq, Lk, keys: _Keys, features: Features) -> torch.Tensor:
    """ALiBi as an additive bias ``[B, Hq, 1, P + Lk]`` in q's dtype (it depends on the key alone). On the CPU it is
    made once for the calls that share its sizes and small values (a decode step's layers, read into the key as
    :class:`_Fused` does), and the bank selection that sets each row's prefix length; the table's tensors are
    never written."""
    def make():
        pos = alibi_positions(B, Lk, keys.P, features.alibi_offsets, q.device, keys.row_len).to(q.dtype)
        return features.alibi_slopes.to(q.dtype).view(1, Hq, 1, 1) * pos.view(B, 1, 1, -1)

    if q.device.type != "cpu":
        return make()
    small = tuple(None if t is None else tuple(t.tolist()) for t in (features.alibi_slopes, features.alibi_offsets))
    key = ("alibi", B, Hq, Lk, keys.P, q.dtype, torch.is_inference_mode_enabled(), small)
    sources = (features.prefix_index, features.prefix_lengths)
    bias = _masks.get(key, sources)
    if bias is None:
        bias = make()
        _masks.put(key, sources, bias)
    return bias


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is laid out like ``b``: same dtype and shape, same strides on every dim of size above 1 (a
    size-1 dim's stride locates nothing)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    sa, sb = a.stride(), b.stride()
    if sa == sb:
        return True
    n = a.shape
    return all(n[i] == 1 or sa[i] == sb[i] for i in range(len(n)))


def infer(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, features=NO_FEATURES):
    """out ``[B, Hq, Lq, D]`` of an output-only call in eager mode (no LSE, no autograd), laid out like q.

    A decode step with no feature (at most ``DECODE_MAX_Q`` queries, one shared prefix or none, no padded key, and
    every key visible: not causal, or causal with one query) is one SDPA over the prefix broadcast into ``[prefix ;
    cache]``, GQA native, with no mask; past ``DECODE_MIN_CACHE`` on the CPU, :func:`_decode` merges the prefix and
    the cache by LSE instead. Every other call is :func:`forward`'s."""
    Lq = q.shape[2]
    if (features is NO_FEATURES and Lq <= DECODE_MAX_Q and (not causal or Lq == 1)
            and (prefix_k is None or prefix_k.dim() == 3)):
        key_padding_mask = _without_full_mask(key_padding_mask)
        if key_padding_mask is None and not (prefix_k is not None and _decode_serves(q, k, prefix_k, features)):
            return _sdpa_step(q, k, v, *_broadcast(prefix_k, prefix_v, q.shape[0]), scale)
    return forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, False, features)[0]


def _sdpa_step(q, k, v, prefix_k, prefix_v, scale):
    """out ``[B, Hq, Lq, D]`` (laid out like q) of a call where every query sees every key: one SDPA over
    ``[prefix ; cache]``, GQA native, no mask. ``prefix_k``, ``prefix_v``: ``[B, Hkv, P, D]`` (the shared prefix
    broadcast over the batch), or None."""
    if prefix_k is not None:
        k = torch.cat([prefix_k, k], dim=2)
        v = torch.cat([prefix_v, v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    out, _ = _propagate_nan_queries(q, out, None)
    return out if _same_layout(out, q) else _into(out, q)


def _broadcast(prefix_k, prefix_v, batch: int):
    """The shared prefix ``[Hkv, P, D]`` as ``[B, Hkv, P, D]`` views (None stays None)."""
    if prefix_k is None:
        return None, None
    return prefix_k.expand(batch, -1, -1, -1), prefix_v.expand(batch, -1, -1, -1)


class _DecodeStep:
    """:func:`infer` for the calls :func:`specialize` admits, without re-deciding what it decided: one SDPA over
    ``[prefix ; cache]``, or the LSE merge of :func:`_decode` past ``DECODE_MIN_CACHE`` (``merge``: the fused
    kernels serve these calls). The prefix broadcast over the batch is made again only for another prefix (a
    decode loop's layers get the same frozen prefix views at every step)."""

    __slots__ = ("merge", "_source", "_expanded")

    def __init__(self, merge: bool):
        self.merge = merge
        self._source = self._expanded = None

    def __call__(self, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, features):
        if prefix_k is not None and self.merge and k.numel() >= DECODE_MIN_CACHE:
            return _decode(q, k, v, prefix_k, prefix_v, None, causal, scale, features)
        B = q.shape[0]
        source = self._source
        if source is None or source[0] is not prefix_k or source[1] is not prefix_v or source[2] != B:
            self._source, self._expanded = (prefix_k, prefix_v, B), _broadcast(prefix_k, prefix_v, B)
        return _sdpa_step(q, k, v, *self._expanded, scale)


def specialize(q, k, prefix_k, key_padding_mask, causal, features=NO_FEATURES):
    """For :mod:`..plan`: a call with :func:`infer`'s signature that serves every later call matching this one
    (the same sizes but the key length, dtypes, devices, flags and features; the plan checks that) with fewer
    decisions, or None when there is nothing to spare. The decode step of a generate() loop on the CPU, where every
    key is visible (no feature, no padding mask, not causal or one query, one shared prefix or none), is decided
    here once (:class:`_DecodeStep`)."""
    if not (q.device.type == "cpu" and features is NO_FEATURES and key_padding_mask is None
            and q.shape[2] <= DECODE_MAX_Q and (not causal or q.shape[2] == 1)
            and (prefix_k is None or prefix_k.dim() == 3)):
        return None
    return _DecodeStep(merge=prefix_k is not None and _fused_serves(q, features))


def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, need_lse, features=NO_FEATURES):
    """out [B, Hq, Lq, D] (laid out like q), lse [B, Hq, Lq] fp32 (or [B, Hq, 0] if not need_lse)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    key_padding_mask = _without_full_mask(key_padding_mask)
    no_lse = q.new_empty((B, Hq, 0), dtype=torch.float32)
    if not need_lse and _decode_serves(q, k, prefix_k, features):
        return _decode(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, features), no_lse
    # A few queries over a small cache: one SDPA call over [prefix ; cache] (GQA native) has the fewest ops.
    few = not need_lse and Lq <= DECODE_MAX_Q and _sdpa_serves(q, features)
    if _fused_serves(q, features) and not few:
        _, _, _, out, lse = _fused_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, features)
        return _into(out, q), (lse.contiguous() if need_lse else no_lse)
    keys = _Keys(k, v, prefix_k, prefix_v, features, key_padding_mask)
    if need_lse or not _sdpa_serves(q, features):
        cdt = _compute_dtype(q.dtype)
        logits = _Logits(q.to(cdt), keys, keys.k.to(cdt), key_padding_mask, causal, scale, features, Lk)
        out = torch.matmul(logits.dropped(logits.probs), keys.v.to(cdt).unsqueeze(2)).flatten(1, 2)
        lse = logits.lse.flatten(1, 2).float() if need_lse else no_lse
        return _into(out, q), lse
    # With a prefix every row sees (no bank selection, no lengths), no row can be left without a key.
    keys_always_visible = keys.P > 0 and keys.visible is None
    mask = keys.mask(Lq, Lk, causal, key_padding_mask, features.sliding_window)
    attn_mask = mask
    additive = None
    if features.alibi_slopes is not None:
        additive = _alibi_bias(q, B, Hq, Lk, keys, features)
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
    return _into(out, q), no_lse


def backward(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale,
             features=NO_FEATURES):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v); the prefix ones are None when there is no prefix.

    The fused kernels' backward uses the forward's ``out`` and ``lse``; the explicit path recomputes the
    softmax in fp32 and needs neither.
    """
    B, Hq = q.shape[:2]
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    key_padding_mask = _without_full_mask(key_padding_mask)
    if _fused_serves(q, features) and (dlse is None or dlse.numel() == 0) and lse.numel() > 0:
        f = _Fused(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, features, q.dtype)
        lse_k = lse.masked_fill(torch.isneginf(lse), 0.0)  # back to the kernel's convention for empty rows
        lse_k = lse_k.reshape(B, Hkv, G * lse.shape[2]) if G > 1 else lse_k
        dq, dk_all, dv_all = _FLASH_BWD(_fold(dout, Hkv, G), f.q, f.k, f.v, _fold(out, Hkv, G), lse_k, 0.0, False,
                                        attn_mask=f.mask, scale=scale)
        return _split_grads(f.unfold(dq), dk_all, dv_all, q, k, v, prefix_k, prefix_v, P, features)
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


def _prefix_grad(rows: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
                 prefix_index: torch.Tensor | None) -> torch.Tensor:
    """Per-row prefix gradients [B, Hkv, P, D] -> the gradient of the prefix (or bank) of ``shape``: each prefix
    gets the sum over the rows that use it, in fp32, as a one-hot matmul (deterministic on every device)."""
    if prefix_index is None:
        total = rows.sum(dim=0, dtype=torch.float32)
        return total.view(shape).to(dtype)
    n = shape[0] if len(shape) == 4 else 1
    onehot = (prefix_index.view(-1, 1) == torch.arange(n, device=rows.device).view(1, n)).to(torch.float32)
    total = (onehot.t() @ rows.float().flatten(1)).view(n, *rows.shape[1:])
    return total.view(shape).to(dtype)


def _split_grads(dq, dk_all, dv_all, q, k, v, prefix_k, prefix_v, P, features=NO_FEATURES):
    """Gradients of [prefix ; input] K/V -> (dq, dk, dv, dprefix_k, dprefix_v) in the inputs' layouts,
    each prefix's summed over the rows that use it (accumulated in fp32)."""
    dq = _into(dq, q)
    dk = _into(dk_all[:, :, P:], k)
    dv = _into(dv_all[:, :, P:], v)
    if P == 0:
        return dq, dk, dv, None, None
    dpk = _prefix_grad(dk_all[:, :, :P], prefix_k.shape, prefix_k.dtype, features.prefix_index)
    dpv = _prefix_grad(dv_all[:, :, :P], prefix_v.shape, prefix_v.dtype, features.prefix_index)
    return dq, dk, dv, dpk, dpv

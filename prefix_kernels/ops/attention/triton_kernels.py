"""Triton kernels of prefix attention: forward, and the backward passes (delta, dK/dV, prefix dK/dV, dQ).

The prefix K/V ``[Hkv, P, D]`` and the input K/V ``[B, Hkv, Lk, D]`` are two sources of one online
softmax: every kernel walks the prefix tiles (no masking but the P bound), then the input tiles
(key padding, causality, sliding window), never building ``[prefix ; input]``. The forward and dQ
kernels share their prologue (:func:`_q_block`), the two key sources (:func:`_prefix_source`,
:func:`_input_source`: tuples of bases, strides and bounds), the key tile of each source
(:func:`_prefix_keys`, :func:`_input_keys`) and the scores (:func:`_scores`); each keeps its own loop per
source, so that the compiler sees the code it saw before these helpers.

Every tile is masked. An interior/edge split of the input loop (unmasked whole tiles, then masked edge
tiles, with a constexpr on the tile helpers) was measured in the static report on 2026-12-02 and not
kept: on Triton 3.6 the dQ tile of sm90 fp16 D64 (128x64) went from 171 to 190 registers (178 with the
second loop masked as well), on Triton 3.8 from 174 to 176; the forward moved by -5 to +1.

Optional features are constexpr flags of these kernels, not copies of them:
- ALiBi: logit += slope[h] * position; prefix column p at p, input key j at P + j + offset[b].
- dropout: a keep mask from Philox (tl.rand) keyed by one seed and the element's global index
  ((b * Hq + h) * Lq + i) * (P + Lk) + column, so every pass, whatever its tiling, regenerates the
  forward's mask without storing it.
- sliding window W (causal): input key j visible to query i iff j > i + (Lk - Lq) - W.
- softcap c: logit = c * tanh(scale * q.k / c), with its derivative in the backward.
- attn_bias: logit += bias[b, h, i, column] (after softcap and ALiBi), column of [prefix ; input]; read per
  (query tile, key tile) where visible, through strides that are 0 on the broadcast dims; no gradient.

The head dim D is a compile-time constant (one specialisation per head dim in use, as in
flash-attention): its masks then fold away when D is a power of two.

Conventions: scores are kept in base 2 (``qk_scale = softmax_scale * log2(e)``), LSE is stored in
natural log. Head dims are padded to ``BLOCK_D`` (a power of two) with masked loads. Offsets of batch
and head use int64. ``UPCAST`` casts loaded operands to fp32 (used under TRITON_INTERPRET, whose dot
mishandles bf16); ``USE_LIBDEVICE`` is off there too, since the interpreter has no libdevice.
"""

import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # older Triton
    from triton.language.extra.cuda import libdevice

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_rows(base, rows, stride_r, stride_d, offs_d, n_rows, D: tl.constexpr, UPCAST: tl.constexpr):
    """Load a [len(rows), BLOCK_D] tile; rows >= n_rows and columns >= D read as zero."""
    ptrs = base + rows[:, None] * stride_r + offs_d[None, :] * stride_d
    tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _load_rows_t(base, rows, stride_r, stride_d, offs_d, n_rows, D: tl.constexpr, UPCAST: tl.constexpr):
    """Load the transpose [BLOCK_D, len(rows)] of the tile ``_load_rows`` reads."""
    ptrs = base + rows[None, :] * stride_r + offs_d[:, None] * stride_d
    tile = tl.load(ptrs, mask=(rows[None, :] < n_rows) & (offs_d[:, None] < D), other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _tanh(x, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        return libdevice.tanh(x)
    else:
        # Portable form: a series near 0 (where 1 - e^-2|x| cancels), the exponential form beyond.
        ax = tl.abs(x)
        e = tl.math.exp2(ax * (-2.0 * LOG2E))
        big = (1.0 - e) / (1.0 + e)
        x2 = x * x
        small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
        t = tl.where(ax < 0.25, small, big)
        return tl.where(x < 0.0, -t, t)


@triton.jit
def _logits(x, pos, slope2, sm_scale, qk_scale, softcap,
            HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Raw dot products x -> logits in base 2, plus the tanh term the softcap backward needs.

    pos: ALiBi key positions (float32, broadcastable to x); slope2 = slope[h] * log2(e).
    """
    if HAS_SOFTCAP:
        t = _tanh(x * (sm_scale / softcap), USE_LIBDEVICE)
        s = t * (softcap * LOG2E)
    else:
        t = x
        s = x * qk_scale
    if HAS_ALIBI:
        s = s + slope2 * pos
    return s, t


@triton.jit
def _load_bias(bias_bh, rows2, cols2, ok, Lq, stride_m, stride_n):
    """attn_bias at (rows2, cols2) (broadcastable row / global column indices) of one (batch, head), in base 2;
    0 where not ``ok`` or past Lq (never read there, so masked keys stay masked whatever it holds)."""
    ptrs = bias_bh + rows2 * stride_m + cols2 * stride_n
    return tl.load(ptrs, mask=ok & (rows2 < Lq), other=0.0).to(tl.float32) * LOG2E


@triton.jit
def _dropout_keep(seed, row_base, rows2, cols2, n_cols, dropout_p):
    """Keep mask of dropout for rows2 x cols2 (broadcastable global indices) of one (batch, head)."""
    offs = (row_base + rows2).to(tl.int64) * n_cols + cols2
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _kept_keys(kpm_row, cols, stride_mn, n_cols, HAS_KPM: tl.constexpr):
    """The key side of visibility for one key tile: ``cols < n_cols`` (P for prefix tiles, Lk for input
    tiles) and, for input tiles with padding, ``kpm_row[cols * stride_mn]``. Computed once per key tile, it
    also masks the K/V loads, so a padded key is never read: whatever it holds (NaN, Inf), it reaches no
    output or gradient."""
    kept = cols < n_cols
    if HAS_KPM:
        kept = kept & (tl.load(kpm_row + cols * stride_mn, mask=kept, other=0) != 0)
    return kept


@triton.jit
def _load_kept(base, rows, kept, stride_r, stride_d, offs_d, D: tl.constexpr, UPCAST: tl.constexpr):
    """Load a [len(rows), BLOCK_D] tile of the rows where ``kept`` is true; the others read as zero."""
    ptrs = base + rows[:, None] * stride_r + offs_d[None, :] * stride_d
    tile = tl.load(ptrs, mask=kept[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _visible(rows2, cols2, kept2, Lq, Lk, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Which (query, key) pairs are visible; rows2/cols2 are broadcastable row/column index tensors and
    kept2 the key side (:func:`_kept_keys`) broadcast like cols2. Causal keeps ``col <= row + Lk - Lq``;
    a sliding window also keeps ``col > row + Lk - Lq - window``."""
    ok = kept2
    if IS_CAUSAL:
        diag = rows2 + (Lk - Lq)
        ok = ok & (cols2 <= diag)
        if HAS_WINDOW:
            ok = ok & (cols2 > diag - window)
    return ok


@triton.jit
def _input_col_range(KV_LO, KV_HI, b, m_start, Lq, Lk, window, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the input columns a query block can see: padding bounds, causality, window."""
    lo = 0
    hi = Lk
    if HAS_KPM:
        lo = tl.load(KV_LO + b)
        hi = tl.load(KV_HI + b)
    if IS_CAUSAL:
        hi = tl.minimum(hi, m_start + BLOCK_M + (Lk - Lq))
        if HAS_WINDOW:
            lo = tl.maximum(lo, m_start + (Lk - Lq) - window + 1)
    lo = (tl.maximum(lo, 0) // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _row_prefix(PIDX, PLEN, b, P, HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """The bank entry row b uses (0 without an index) and the row's prefix length (0 with index -1)."""
    n = b * 0
    p_row = P
    if HAS_INDEX:
        idx = tl.load(PIDX + b).to(tl.int32)
        n = tl.maximum(idx, 0)
        p_row = tl.where(idx >= 0, P, 0)
    if HAS_LENGTHS:
        p_row = tl.minimum(p_row, tl.load(PLEN + n).to(tl.int32))
    return n, p_row


@triton.jit
def _q_block(Q, ALIBI, SEED, BIAS, stride_qb, stride_qh, stride_qm, stride_qd,
             stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
             Hq, Lq, Lk, P, D: tl.constexpr, GROUP, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """The prologue of a query-block program, shared by the forward and the dQ pass (grid (cdiv(Lq, BLOCK_M),
    B * Hq)): which (batch row b, query head h, kv head g, query rows) it owns, its per-head constants and the
    query tile.

    Returns (b, g, b64, h64, m_start, rows, offs_n, offs_d, row_base, n_cols, slope2, seed, bias, q): g, b64 and
    h64 in int64; row_base the global row of query 0 of (b, h) and n_cols = P + Lk (dropout indices); slope2 the
    ALiBi slope in base 2; bias what :func:`_scores` reads of attn_bias: ((b, h)'s base, Lq, row and column
    strides).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    g = (h // GROUP).to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    m_start = pid_m * BLOCK_M
    rows = m_start + tl.arange(0, BLOCK_M)
    # Registers depend on the order of these definitions: offs_n and n_cols defined later cost the forward
    # decode tile (sm90 bf16 D32) 15 more; the prefix source read before dO (in this helper) cost the dQ
    # tile (sm90 16-bit D64, Triton 3.6) 3 more. The kernels call _prefix_source after their own loads.
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_base = pid_bh.to(tl.int64) * Lq
    n_cols = P + Lk
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + h) * LOG2E
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    bias = (BIAS + b64 * stride_bias_b + h64 * stride_bias_h, Lq, stride_bias_m, stride_bias_n)  # attn_bias
    q = _load_rows(Q + b64 * stride_qb + h64 * stride_qh, rows, stride_qm, stride_qd, offs_d, Lq, D, UPCAST)
    return b, g, b64, h64, m_start, rows, offs_n, offs_d, row_base, n_cols, slope2, seed, bias, q


@triton.jit
def _prefix_source(PK, PV, PIDX, PLEN, b, g, offs_n, offs_d, stride_pkb, stride_pkh, stride_pkn, stride_pkd,
                   stride_pvb, stride_pvh, stride_pvn, stride_pvd, P,
                   HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """The prefix as the first key source of a query block of batch row b: (p_row, source), the row's prefix
    length (:func:`_row_prefix`) and what :func:`_prefix_keys` reads: (K base, V base of the row's bank entry and
    kv head g, their row and head-dim strides, p_row, offs_n, offs_d)."""
    n, p_row = _row_prefix(PIDX, PLEN, b, P, HAS_INDEX, HAS_LENGTHS)
    prefix = (PK + n.to(tl.int64) * stride_pkb + g * stride_pkh, PV + n.to(tl.int64) * stride_pvb + g * stride_pvh,
              stride_pkn, stride_pkd, stride_pvn, stride_pvd, p_row, offs_n, offs_d)
    return p_row, prefix


@triton.jit
def _input_source(K, V, KPM, KV_LO, KV_HI, ALIBI_OFF, b, b64, g, m_start, p_row, offs_n, offs_d,
                  stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_mb, stride_mn, Lq, Lk, P, window, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_ALIBI_OFF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The input keys as the second key source of a query block: (lo, hi, source), the columns [lo, hi) the
    block may see (:func:`_input_col_range`), and what :func:`_input_keys` reads: (K base, V base, their row
    and head-dim strides, the padding-mask row and its stride, the ALiBi position of input key 0, P, Lq, Lk,
    window, offs_n, offs_d)."""
    lo, hi = _input_col_range(KV_LO, KV_HI, b, m_start, Lq, Lk, window, IS_CAUSAL, HAS_KPM, HAS_WINDOW,
                              BLOCK_M, BLOCK_N)
    pos_base = p_row
    if HAS_ALIBI_OFF:
        pos_base = p_row + tl.load(ALIBI_OFF + b).to(tl.int32)
    source = (K + b64 * stride_kb + g * stride_kh, V + b64 * stride_vb + g * stride_vh, stride_kn, stride_kd,
              stride_vn, stride_vd, KPM + b64 * stride_mb, stride_mn, pos_base, P, Lq, Lk, window, offs_n, offs_d)
    return lo, hi, source


@triton.jit
def _prefix_keys(source, n0, D: tl.constexpr, UPCAST: tl.constexpr):
    """Prefix key tile [n0, n0 + BLOCK_N) of a query block (source from :func:`_q_block`): (k, v, ok, pos, cols_g),
    the K and V tiles (columns past the row's prefix length read as zero), the visibility [1, BLOCK_N] (every
    query sees the prefix), the keys' ALiBi positions and their global columns in [prefix ; input]."""
    pk_base, pv_base, stride_pkn, stride_pkd, stride_pvn, stride_pvd, p_row, offs_n, offs_d = source
    cols = n0 + offs_n
    k = _load_rows(pk_base, cols, stride_pkn, stride_pkd, offs_d, p_row, D, UPCAST)
    v = _load_rows(pv_base, cols, stride_pvn, stride_pvd, offs_d, p_row, D, UPCAST)
    return k, v, cols[None, :] < p_row, cols.to(tl.float32), cols


@triton.jit
def _input_keys(source, n0, rows, D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr):
    """Input key tile [n0, n0 + BLOCK_N) of the query block ``rows`` (source from :func:`_input_source`):
    (k, v, ok, pos, cols_g) as :func:`_prefix_keys`, with the visibility [BLOCK_M, BLOCK_N] of padding,
    causality and window. A padded key is never read."""
    (k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, kpm_row, stride_mn, pos_base, P, Lq, Lk, window,
     offs_n, offs_d) = source
    cols = n0 + offs_n
    kept = _kept_keys(kpm_row, cols, stride_mn, Lk, HAS_KPM)
    k = _load_kept(k_base, cols, kept, stride_kn, stride_kd, offs_d, D, UPCAST)
    v = _load_kept(v_base, cols, kept, stride_vn, stride_vd, offs_d, D, UPCAST)
    ok = _visible(rows[:, None], cols[None, :], kept[None, :], Lq, Lk, window, IS_CAUSAL, HAS_WINDOW)
    return k, v, ok, (pos_base + cols).to(tl.float32), P + cols


@triton.jit
def _scores(q, k, pos, rows, cols_g, ok, bias, slope2, sm_scale, qk_scale, softcap, HAS_ALIBI: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, USE_LIBDEVICE: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of a query tile against a key tile, the forward's and the dQ pass's alike: (s, t) of
    :func:`_logits` for q @ k^T (base 2, unmasked; t the softcap's tanh term), pos the keys' ALiBi positions,
    plus attn_bias (``bias`` from :func:`_q_block`) at rows x cols_g, read only where ``ok``."""
    x = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    s, t = _logits(x, pos[None, :], slope2, sm_scale, qk_scale, softcap, HAS_SOFTCAP, HAS_ALIBI, USE_LIBDEVICE)
    if HAS_BIAS:  # attn_bias
        bias_bh, Lq, stride_bias_m, stride_bias_n = bias
        s = s + _load_bias(bias_bh, rows[:, None], cols_g[None, :], ok, Lq, stride_bias_m, stride_bias_n)
    return s, t


@triton.jit
def _fwd_tile(q, k, v, ok, pos, cols_g, m_i, l_i, acc, rows, row_base, seed, n_cols, dropout_p,
              slope2, sm_scale, qk_scale, softcap, bias,
              HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
              USE_LIBDEVICE: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax update of (row max, row sum, accumulator) with a key tile.

    The row sum takes every probability; the accumulator only the kept ones (dropout rescaling by
    1 / (1 - p) is applied once at the end).
    """
    s, _ = _scores(q, k, pos, rows, cols_g, ok, bias, slope2, sm_scale, qk_scale, softcap,
                   HAS_ALIBI, HAS_SOFTCAP, HAS_BIAS, USE_LIBDEVICE, PRECISION)
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows that have seen no visible key yet keep a zero shift, so exp2 never meets (-inf) - (-inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, row_base, rows[:, None], cols_g[None, :], n_cols, dropout_p)
        p = tl.where(keep, p, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, PK, PV, KPM, KV_LO, KV_HI, ALIBI, ALIBI_OFF, SEED, PIDX, PLEN, BIAS, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, Lq, Lk, P, D: tl.constexpr, GROUP, sm_scale, qk_scale, window, softcap, dropout_p,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, STORE_LSE: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_ALIBI_OFF: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, USE_LIBDEVICE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), B * Hq). O [B, Hq, Lq, D]; LSE [B, Hq, Lq] fp32 contiguous.
    The prefix is a bank [N, Hkv, P, D]; row b uses entry PIDX[b] (or 0) for its first p_row columns."""
    b, g, b64, h64, m_start, rows, offs_n, offs_d, row_base, n_cols, slope2, seed, bias, q = _q_block(
        Q, ALIBI, SEED, BIAS, stride_qb, stride_qh, stride_qm, stride_qd, stride_bias_b, stride_bias_h, stride_bias_m,
        stride_bias_n, Hq, Lq, Lk, P, D, GROUP, HAS_ALIBI, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p_row, prefix = _prefix_source(PK, PV, PIDX, PLEN, b, g, offs_n, offs_d, stride_pkb, stride_pkh, stride_pkn,
        stride_pkd, stride_pvb, stride_pvh, stride_pvn, stride_pvd, P, HAS_INDEX, HAS_LENGTHS)
    for n0 in range(0, p_row, BLOCK_N):
        k, v, ok, pos, cols_g = _prefix_keys(prefix, n0, D, UPCAST)
        m_i, l_i, acc = _fwd_tile(q, k, v, ok, pos, cols_g, m_i, l_i, acc, rows, row_base, seed, n_cols, dropout_p,
            slope2, sm_scale, qk_scale, softcap, bias, HAS_ALIBI, HAS_DROPOUT, HAS_SOFTCAP, HAS_BIAS, USE_LIBDEVICE,
            PRECISION)
    lo, hi, source = _input_source(K, V, KPM, KV_LO, KV_HI, ALIBI_OFF, b, b64, g, m_start, p_row, offs_n, offs_d,
        stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mn,
        Lq, Lk, P, window, IS_CAUSAL, HAS_KPM, HAS_WINDOW, HAS_ALIBI_OFF, BLOCK_M, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        k, v, ok, pos, cols_g = _input_keys(source, n0, rows, D, IS_CAUSAL, HAS_KPM, HAS_WINDOW, UPCAST)
        m_i, l_i, acc = _fwd_tile(q, k, v, ok, pos, cols_g, m_i, l_i, acc, rows, row_base, seed, n_cols, dropout_p,
            slope2, sm_scale, qk_scale, softcap, bias, HAS_ALIBI, HAS_DROPOUT, HAS_SOFTCAP, HAS_BIAS, USE_LIBDEVICE,
            PRECISION)

    # A row that saw no key (P = 0, every key masked) has l_i = 0: output zeros and LSE = -inf.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    o_ptrs = O + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(rows[:, None] < Lq) & (offs_d[None, :] < D))
    if STORE_LSE:
        # A row with a NaN logit has l_i = NaN (tl.maximum drops NaN from m_i): its LSE is NaN, as its output.
        seen = l_i != 0.0
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
        tl.store(LSE + row_base + rows, lse, mask=rows < Lq)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    Hq, Lq, D: tl.constexpr,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """DELTA[b, h, i] = sum_d O * dO - dLSE (the LSE gradient folds into delta). Grid (cdiv(Lq, BM), B*Hq)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // Hq).to(tl.int64)
    h64 = (pid_bh % Hq).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b64 * stride_ob + h64 * stride_oh, rows, stride_om, stride_od, offs_d, Lq, D, True)
    do = _load_rows(DO + b64 * stride_dob + h64 * stride_doh, rows, stride_dom, stride_dod, offs_d, Lq, D, True)
    delta = tl.sum(o * do, 1)
    row_base = pid_bh.to(tl.int64) * Lq
    if HAS_DLSE:
        delta -= tl.load(DLSE + row_base + rows, mask=rows < Lq, other=0.0)
    tl.store(DELTA + row_base + rows, delta, mask=rows < Lq)


@triton.jit
def _dkdv_accumulate(
    dk, dv, k, v, cols, cols_g, pos, n_cols_total,
    q_bh, do_bh, lse_bh, delta_bh, kept, row_base, seed, slope2,
    stride_qm, stride_qd, stride_dom, stride_dod,
    m_lo, m_hi, Lq, Lk, D: tl.constexpr, sm_scale, qk_scale, window, softcap, dropout_p,
    bias_bh, stride_bias_m, stride_bias_n,
    IS_CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Add one (batch row, query head)'s contribution over query rows [m_lo, m_hi) to a key tile's dK, dV.

    Works on the transposed scores [BLOCK_N, BLOCK_M] so that dK and dV accumulate as plain dots.
    cols index the tile within its source, kept is its key side (:func:`_kept_keys`, loop-invariant: the
    caller computes it once per key tile), cols_g are the global columns of [prefix ; input] (dropout), pos
    the ALiBi positions. dK is returned without the softmax scale.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = m0 + offs_m
        qT = _load_rows_t(q_bh, rows, stride_qm, stride_qd, offs_d, Lq, D, UPCAST)
        do = _load_rows(do_bh, rows, stride_dom, stride_dod, offs_d, Lq, D, UPCAST)
        lse2 = tl.load(lse_bh + rows, mask=rows < Lq, other=0.0) * LOG2E
        if HAS_BIAS:  # attn_bias: a row it hid entirely (lse -inf) gets p = 0, not exp2(-inf + inf)
            lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
        delta = tl.load(delta_bh + rows, mask=rows < Lq, other=0.0)
        xT = tl.dot(k, qT, input_precision=PRECISION)
        sT, tT = _logits(xT, pos[:, None], slope2, sm_scale, qk_scale, softcap, HAS_SOFTCAP, HAS_ALIBI,
                         USE_LIBDEVICE)
        ok = _visible(rows[None, :], cols[:, None], kept[:, None], Lq, Lk, window, IS_CAUSAL, HAS_WINDOW)
        ok = ok & (rows[None, :] < Lq)
        if HAS_BIAS:  # attn_bias
            sT = sT + _load_bias(bias_bh, rows[None, :], cols_g[:, None], ok, Lq, stride_bias_m, stride_bias_n)
        pT = tl.where(ok, tl.math.exp2(sT - lse2[None, :]), 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, row_base, rows[None, :], cols_g[:, None], n_cols_total, dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            dv = tl.dot(tl.where(keep, pT * inv_keep, 0.0).to(do.dtype), do, dv, input_precision=PRECISION)
            dpT = tl.where(keep, dpT * inv_keep, 0.0)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, KPM, KV_LO, KV_HI, ALIBI, ALIBI_OFF, SEED, PIDX, PLEN, BIAS, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hq, Hkv, Lq, Lk, P, D: tl.constexpr, GROUP, sm_scale, qk_scale, window, softcap, dropout_p,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_ALIBI_OFF: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, USE_LIBDEVICE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of the input keys. Grid (cdiv(Lk, BLOCK_N), B * Hkv); each program owns one key tile and
    loops over the GROUP query heads that share it, so GQA needs no atomics and no repeated K/V."""
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // Hkv
    g = pid_bg % Hkv
    b64 = b.to(tl.int64)
    g64 = g.to(tl.int64)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kept = _kept_keys(KPM + b64 * stride_mb, cols, stride_mn, Lk, HAS_KPM)  # loop-invariant: once per key tile
    k = _load_kept(K + b64 * stride_kb + g64 * stride_kh, cols, kept, stride_kn, stride_kd, offs_d, D, UPCAST)
    v = _load_kept(V + b64 * stride_vb + g64 * stride_vh, cols, kept, stride_vn, stride_vd, offs_d, D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    m_lo = 0
    m_hi = Lq
    if IS_CAUSAL:
        # The first query that sees column n0 is n0 - (Lk - Lq); with a window W, the last query that
        # sees the tile's last column n0 + BLOCK_N - 1 is that column - (Lk - Lq) + W - 1.
        m_lo = (tl.maximum(n0 - (Lk - Lq), 0) // BLOCK_M) * BLOCK_M
        if HAS_WINDOW:
            m_hi = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - (Lk - Lq) + window, 0), Lq)
    if HAS_KPM:
        # A tile wholly outside [first kept key, last kept key] contributes nothing.
        kv_lo = tl.load(KV_LO + b)
        kv_hi = tl.load(KV_HI + b)
        m_hi = tl.where((n0 + BLOCK_N <= kv_lo) | (n0 >= kv_hi), 0, m_hi)
    _, p_row = _row_prefix(PIDX, PLEN, b, P, HAS_INDEX, HAS_LENGTHS)
    pos_base = p_row
    if HAS_ALIBI_OFF:
        pos_base = p_row + tl.load(ALIBI_OFF + b).to(tl.int32)
    pos = (pos_base + cols).to(tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    for hh in range(0, GROUP):
        h64 = g64 * GROUP + hh
        bh = b64 * Hq + h64
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(ALIBI + h64) * LOG2E
        dk, dv = _dkdv_accumulate(
            dk, dv, k, v, cols, P + cols, pos, P + Lk,
            Q + b64 * stride_qb + h64 * stride_qh, DO + b64 * stride_dob + h64 * stride_doh,
            LSE + bh * Lq, DELTA + bh * Lq, kept, bh * Lq, seed, slope2,
            stride_qm, stride_qd, stride_dom, stride_dod,
            m_lo, m_hi, Lq, Lk, D, sm_scale, qk_scale, window, softcap, dropout_p,
            BIAS + b64 * stride_bias_b + h64 * stride_bias_h, stride_bias_m, stride_bias_n,  # attn_bias
            IS_CAUSAL, HAS_ALIBI, HAS_DROPOUT, HAS_WINDOW, HAS_SOFTCAP,
            BLOCK_M, BLOCK_D, UPCAST, USE_LIBDEVICE, PRECISION, HAS_BIAS,
        )
    dk = dk * sm_scale
    tile_mask = (cols[:, None] < Lk) & (offs_d[None, :] < D)
    dk_ptrs = DK + b64 * stride_dkb + g64 * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b64 * stride_dvb + g64 * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=tile_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=tile_mask)


@triton.jit
def _attn_bwd_prefix_dkdv_kernel(
    Q, PK, PV, DO, LSE, DELTA, ALIBI, SEED, PLEN, BIAS, ROWS, ITEM_PREFIX, ITEM_LO, ITEM_HI, DPK_PART, DPV_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    Hq, Hkv, Lq, Lk, P, D: tl.constexpr, GROUP, UNITS, UNITS_PER_SPLIT, sm_scale, qk_scale, softcap, dropout_p,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, USE_LIBDEVICE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Gradient of the prefix (bank), reduced in-kernel over the batch rows and query heads that use it.

    Grid (cdiv(P, BLOCK_N), Hkv, ITEMS). Work is counted in units (row, query head of the group). One
    shared prefix: item s sums units [s * UNITS_PER_SPLIT, ...) of all B * GROUP. A bank: rows are sorted
    by prefix (ROWS) and each item covers a range [ITEM_LO, ITEM_HI) of sorted units that all belong to
    prefix ITEM_PREFIX. Either way the item writes one fp32 partial DPK_PART[item, g, P, D]
    (contiguous) and the host adds each prefix's partials in a fixed order: deterministic, no atomics,
    and memory of ITEMS (never B) prefix copies. The prefix is visible to every query of its rows, so no
    padding, causality or window applies here; columns past the prefix's length get zero.
    """
    pid_n = tl.program_id(0)
    g64 = tl.program_id(1).to(tl.int64)
    item = tl.program_id(2)
    if HAS_INDEX:
        n = tl.load(ITEM_PREFIX + item)
        u_lo = tl.load(ITEM_LO + item)
        u_hi = tl.load(ITEM_HI + item)
    else:
        n = item * 0
        u_lo = item * UNITS_PER_SPLIT
        u_hi = tl.minimum(u_lo + UNITS_PER_SPLIT, UNITS)
    p_n = P
    if HAS_LENGTHS:
        p_n = tl.minimum(tl.load(PLEN + n).to(tl.int32), P)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n64 = n.to(tl.int64)
    k = _load_rows(PK + n64 * stride_pkb + g64 * stride_pkh, cols, stride_pkn, stride_pkd, offs_d, p_n, D, UPCAST)
    v = _load_rows(PV + n64 * stride_pvb + g64 * stride_pvh, cols, stride_pvn, stride_pvd, offs_d, p_n, D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    pos = cols.to(tl.float32)
    for u in range(u_lo, u_hi):
        if HAS_INDEX:
            b64 = tl.load(ROWS + u // GROUP).to(tl.int64)
        else:
            b64 = (u // GROUP).to(tl.int64)
        h64 = g64 * GROUP + u % GROUP
        bh = b64 * Hq + h64
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(ALIBI + h64) * LOG2E
        dk, dv = _dkdv_accumulate(
            dk, dv, k, v, cols, cols, pos, P + Lk,
            Q + b64 * stride_qb + h64 * stride_qh, DO + b64 * stride_dob + h64 * stride_doh,
            LSE + bh * Lq, DELTA + bh * Lq, cols < p_n, bh * Lq, seed, slope2,
            stride_qm, stride_qd, stride_dom, stride_dod,
            0, Lq, Lq, Lk, D, sm_scale, qk_scale, 0, softcap, dropout_p,
            BIAS + b64 * stride_bias_b + h64 * stride_bias_h, stride_bias_m, stride_bias_n,  # attn_bias
            False, HAS_ALIBI, HAS_DROPOUT, False, HAS_SOFTCAP,
            BLOCK_M, BLOCK_D, UPCAST, USE_LIBDEVICE, PRECISION, HAS_BIAS,
        )
    dk = dk * sm_scale
    part = (item.to(tl.int64) * Hkv + g64) * P * D
    offs = part + cols[:, None] * D + offs_d[None, :]
    tile_mask = (cols[:, None] < P) & (offs_d[None, :] < D)
    tl.store(DPK_PART + offs, dk, mask=tile_mask)
    tl.store(DPV_PART + offs, dv, mask=tile_mask)


@triton.jit
def _sum_segments_kernel(PART, SEG_OFF, OUT, n_elems, BLOCK: tl.constexpr):
    """OUT[s] = sum of PART[SEG_OFF[s] : SEG_OFF[s + 1]] in order (each [n_elems] fp32): the fixed-order
    reduction of the prefix-gradient partials of a bank. Grid (segments, cdiv(n_elems, BLOCK))."""
    seg = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    lo = tl.load(SEG_OFF + seg)
    hi = tl.load(SEG_OFF + seg + 1)
    acc = tl.zeros([BLOCK], tl.float32)
    stride = n_elems.to(tl.int64)
    for i in range(lo, hi):
        acc += tl.load(PART + i * stride + offs, mask=offs < n_elems, other=0.0)
    tl.store(OUT + seg.to(tl.int64) * n_elems + offs, acc, mask=offs < n_elems)


@triton.jit
def _dq_tile(dq, q, do, k, v, ok, pos, cols_g, rows, row_base, seed, n_cols, lse2, delta, slope2,
             sm_scale, qk_scale, softcap, dropout_p, bias,
             HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
             USE_LIBDEVICE: tl.constexpr, PRECISION: tl.constexpr):
    s, t = _scores(q, k, pos, rows, cols_g, ok, bias, slope2, sm_scale, qk_scale, softcap,
                   HAS_ALIBI, HAS_SOFTCAP, HAS_BIAS, USE_LIBDEVICE, PRECISION)
    p = tl.where(ok, tl.math.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, row_base, rows[:, None], cols_g[None, :], n_cols, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, KPM, KV_LO, KV_HI, ALIBI, ALIBI_OFF, SEED, PIDX, PLEN, BIAS, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod, stride_mb, stride_mn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Hq, Lq, Lk, P, D: tl.constexpr, GROUP, sm_scale, qk_scale, window, softcap, dropout_p,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_ALIBI_OFF: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, USE_LIBDEVICE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ. Grid (cdiv(Lq, BLOCK_M), B * Hq); walks the same tiles as the forward."""
    b, g, b64, h64, m_start, rows, offs_n, offs_d, row_base, n_cols, slope2, seed, bias, q = _q_block(
        Q, ALIBI, SEED, BIAS, stride_qb, stride_qh, stride_qm, stride_qd, stride_bias_b, stride_bias_h, stride_bias_m,
        stride_bias_n, Hq, Lq, Lk, P, D, GROUP, HAS_ALIBI, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST)
    do = _load_rows(DO + b64 * stride_dob + h64 * stride_doh, rows, stride_dom, stride_dod, offs_d, Lq, D, UPCAST)
    lse2 = tl.load(LSE + row_base + rows, mask=rows < Lq, other=0.0) * LOG2E
    if HAS_BIAS:  # attn_bias: a row it hid entirely (lse -inf) gets p = 0, not exp2(-inf + inf)
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(DELTA + row_base + rows, mask=rows < Lq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p_row, prefix = _prefix_source(PK, PV, PIDX, PLEN, b, g, offs_n, offs_d, stride_pkb, stride_pkh, stride_pkn,
        stride_pkd, stride_pvb, stride_pvh, stride_pvn, stride_pvd, P, HAS_INDEX, HAS_LENGTHS)
    for n0 in range(0, p_row, BLOCK_N):
        k, v, ok, pos, cols_g = _prefix_keys(prefix, n0, D, UPCAST)
        dq = _dq_tile(dq, q, do, k, v, ok, pos, cols_g, rows, row_base, seed, n_cols, lse2, delta, slope2, sm_scale,
            qk_scale, softcap, dropout_p, bias, HAS_ALIBI, HAS_DROPOUT, HAS_SOFTCAP, HAS_BIAS, USE_LIBDEVICE, PRECISION)
    lo, hi, source = _input_source(K, V, KPM, KV_LO, KV_HI, ALIBI_OFF, b, b64, g, m_start, p_row, offs_n, offs_d,
        stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mn,
        Lq, Lk, P, window, IS_CAUSAL, HAS_KPM, HAS_WINDOW, HAS_ALIBI_OFF, BLOCK_M, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        k, v, ok, pos, cols_g = _input_keys(source, n0, rows, D, IS_CAUSAL, HAS_KPM, HAS_WINDOW, UPCAST)
        dq = _dq_tile(dq, q, do, k, v, ok, pos, cols_g, rows, row_base, seed, n_cols, lse2, delta, slope2, sm_scale,
            qk_scale, softcap, dropout_p, bias, HAS_ALIBI, HAS_DROPOUT, HAS_SOFTCAP, HAS_BIAS, USE_LIBDEVICE, PRECISION)

    dq = dq * sm_scale
    dq_ptrs = DQ + b64 * stride_dqb + h64 * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=(rows[:, None] < Lq) & (offs_d[None, :] < D))


@triton.jit
def _dropout_mask_kernel(SEED, MASK, Lq, n_cols, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Debug aid: writes the keep mask [B, Hq, Lq, P + Lk] (uint8) that the kernels above use.
    Grid (cdiv(Lq, BLOCK_M), cdiv(n_cols, BLOCK_N), B * Hq)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_base = tl.program_id(2).to(tl.int64) * Lq
    keep = _dropout_keep(tl.load(SEED), row_base, rows[:, None], cols[None, :], n_cols, dropout_p)
    ptrs = MASK + (row_base + rows[:, None]) * n_cols + cols[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(rows[:, None] < Lq) & (cols[None, :] < n_cols))

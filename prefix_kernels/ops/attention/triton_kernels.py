"""Triton kernels of prefix attention: forward, and the backward passes (delta, dK/dV, prefix dK/dV, dQ).

The prefix K/V ``[Hkv, P, D]`` and the input K/V ``[B, Hkv, Lk, D]`` are two sources of one online
softmax: every kernel walks the prefix tiles (no masking but the P bound), then the input tiles
(key padding and causality), never building ``[prefix ; input]``.

The head dim D is a compile-time constant (one specialisation per head dim in use, as in
flash-attention): its masks then fold away when D is a power of two.

Conventions: scores are kept in base 2 (``qk_scale = softmax_scale * log2(e)``), LSE is stored in
natural log. Head dims are padded to ``BLOCK_D`` (a power of two) with masked loads. Optional
features are constexpr flags of one kernel, not copies of it. Offsets of batch and head use int64.
``UPCAST`` casts loaded operands to fp32 (used under TRITON_INTERPRET, whose dot mishandles bf16).
"""

import triton
import triton.language as tl

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
def _visible(rows2, cols2, kpm_row, stride_mn, Lq, Lk, n_cols, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """Which (query, key) pairs are visible; rows2/cols2 are broadcastable row/column index tensors.

    A column is in range if < n_cols (P for prefix tiles, Lk for input tiles). For input tiles pass the
    flags: key padding reads ``kpm_row[cols * stride_mn]``; causal keeps ``col <= row + Lk - Lq``.
    """
    ok = cols2 < n_cols
    if HAS_KPM:
        keep = tl.load(kpm_row + cols2 * stride_mn, mask=ok, other=0)
        ok = ok & (keep != 0)
    if IS_CAUSAL:
        ok = ok & (cols2 <= rows2 + (Lk - Lq))
    return ok


@triton.jit
def _input_col_range(KV_LO, KV_HI, b, m_start, Lq, Lk, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the input columns a query block can see: padding bounds, then causality."""
    lo = 0
    hi = Lk
    if HAS_KPM:
        lo = (tl.load(KV_LO + b) // BLOCK_N) * BLOCK_N
        hi = tl.load(KV_HI + b)
    if IS_CAUSAL:
        hi = tl.minimum(hi, m_start + BLOCK_M + (Lk - Lq))
    return lo, hi


@triton.jit
def _softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr):
    """One online-softmax update of (row max, row sum, accumulator) with a key tile."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows that have seen no visible key yet keep a zero shift, so exp2 never meets (-inf) - (-inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, PK, PV, KPM, KV_LO, KV_HI, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkh, stride_pkn, stride_pkd,
    stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, Lq, Lk, P, D: tl.constexpr, GROUP, qk_scale,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, STORE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), B * Hq). O [B, Hq, Lq, D]; LSE [B, Hq, Lq] fp32 contiguous."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    g = (h // GROUP).to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    m_start = pid_m * BLOCK_M
    rows = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_rows(Q + b64 * stride_qb + h64 * stride_qh, rows, stride_qm, stride_qd, offs_d, Lq, D, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    pk_base = PK + g * stride_pkh
    pv_base = PV + g * stride_pvh
    for n0 in range(0, P, BLOCK_N):
        cols = n0 + offs_n
        k = _load_rows(pk_base, cols, stride_pkn, stride_pkd, offs_d, P, D, UPCAST)
        v = _load_rows(pv_base, cols, stride_pvn, stride_pvd, offs_d, P, D, UPCAST)
        ok = cols[None, :] < P
        m_i, l_i, acc = _softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, PRECISION)

    lo, hi = _input_col_range(KV_LO, KV_HI, b, m_start, Lq, Lk, IS_CAUSAL, HAS_KPM, BLOCK_M, BLOCK_N)
    k_base = K + b64 * stride_kb + g * stride_kh
    v_base = V + b64 * stride_vb + g * stride_vh
    kpm_row = KPM + b64 * stride_mb
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        k = _load_rows(k_base, cols, stride_kn, stride_kd, offs_d, Lk, D, UPCAST)
        v = _load_rows(v_base, cols, stride_vn, stride_vd, offs_d, Lk, D, UPCAST)
        ok = _visible(rows[:, None], cols[None, :], kpm_row, stride_mn, Lq, Lk, Lk, IS_CAUSAL, HAS_KPM)
        m_i, l_i, acc = _softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, PRECISION)

    # A row that saw no key (P = 0, every key masked) has l_i = 0: output zeros and LSE = -inf.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = O + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(rows[:, None] < Lq) & (offs_d[None, :] < D))
    if STORE_LSE:
        lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
        tl.store(LSE + pid_bh.to(tl.int64) * Lq + rows, lse, mask=rows < Lq)


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
    dk, dv, k, v, cols, n_cols,
    q_bh, do_bh, lse_bh, delta_bh, kpm_row,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_mn,
    m_lo, m_hi, Lq, Lk, D: tl.constexpr, qk_scale,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Add one (batch row, query head)'s contribution over query rows [m_lo, m_hi) to a key tile's dK, dV.

    Works on the transposed scores sT [BLOCK_N, BLOCK_M] so that dK and dV accumulate as plain dots.
    dK is returned without the softmax scale (the caller applies it once).
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = m0 + offs_m
        qT = _load_rows_t(q_bh, rows, stride_qm, stride_qd, offs_d, Lq, D, UPCAST)
        do = _load_rows(do_bh, rows, stride_dom, stride_dod, offs_d, Lq, D, UPCAST)
        lse2 = tl.load(lse_bh + rows, mask=rows < Lq, other=0.0) * LOG2E
        delta = tl.load(delta_bh + rows, mask=rows < Lq, other=0.0)
        sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale
        ok = _visible(rows[None, :], cols[:, None], kpm_row, stride_mn, Lq, Lk, n_cols, IS_CAUSAL, HAS_KPM)
        ok = ok & (rows[None, :] < Lq)
        pT = tl.where(ok, tl.math.exp2(sT - lse2[None, :]), 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, KPM, KV_LO, KV_HI, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hq, Hkv, Lq, Lk, D: tl.constexpr, GROUP, qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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
    k = _load_rows(K + b64 * stride_kb + g64 * stride_kh, cols, stride_kn, stride_kd, offs_d, Lk, D, UPCAST)
    v = _load_rows(V + b64 * stride_vb + g64 * stride_vh, cols, stride_vn, stride_vd, offs_d, Lk, D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    m_lo = 0
    m_hi = Lq
    if IS_CAUSAL:
        # The first query that sees column n0 is n0 - (Lk - Lq).
        m_lo = (tl.maximum(n0 - (Lk - Lq), 0) // BLOCK_M) * BLOCK_M
    if HAS_KPM:
        # A tile wholly outside [first kept key, last kept key] contributes nothing.
        kv_lo = tl.load(KV_LO + b)
        kv_hi = tl.load(KV_HI + b)
        m_hi = tl.where((n0 + BLOCK_N <= kv_lo) | (n0 >= kv_hi), 0, Lq)
    kpm_row = KPM + b64 * stride_mb
    for hh in range(0, GROUP):
        h64 = g64 * GROUP + hh
        bh = b64 * Hq + h64
        dk, dv = _dkdv_accumulate(
            dk, dv, k, v, cols, Lk,
            Q + b64 * stride_qb + h64 * stride_qh, DO + b64 * stride_dob + h64 * stride_doh,
            LSE + bh * Lq, DELTA + bh * Lq, kpm_row,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mn,
            m_lo, m_hi, Lq, Lk, D, qk_scale,
            IS_CAUSAL, HAS_KPM, BLOCK_M, BLOCK_D, UPCAST, PRECISION,
        )
    dk = dk * sm_scale
    tile_mask = (cols[:, None] < Lk) & (offs_d[None, :] < D)
    dk_ptrs = DK + b64 * stride_dkb + g64 * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b64 * stride_dvb + g64 * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=tile_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=tile_mask)


@triton.jit
def _attn_bwd_prefix_dkdv_kernel(
    Q, PK, PV, DO, LSE, DELTA, DPK_PART, DPV_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_pkh, stride_pkn, stride_pkd,
    stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    Hq, Hkv, Lq, P, D: tl.constexpr, GROUP, UNITS, UNITS_PER_SPLIT, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Gradient of the shared prefix, reduced in-kernel over batch rows and query heads.

    Grid (cdiv(P, BLOCK_N), Hkv, SPLITS). The B * GROUP (batch row, query head) units of kv head g are
    cut into SPLITS contiguous ranges; each program sums its range into one fp32 partial
    DPK_PART[split, g, P, D] (contiguous). The host adds the SPLITS partials in a fixed order, so the
    result is deterministic and memory is SPLITS (not B) copies of the prefix.
    """
    pid_n = tl.program_id(0)
    g64 = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(PK + g64 * stride_pkh, cols, stride_pkn, stride_pkd, offs_d, P, D, UPCAST)
    v = _load_rows(PV + g64 * stride_pvh, cols, stride_pvn, stride_pvd, offs_d, P, D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    u_lo = split * UNITS_PER_SPLIT
    u_hi = tl.minimum(u_lo + UNITS_PER_SPLIT, UNITS)
    for u in range(u_lo, u_hi):
        b64 = (u // GROUP).to(tl.int64)
        h64 = g64 * GROUP + u % GROUP
        bh = b64 * Hq + h64
        dk, dv = _dkdv_accumulate(
            dk, dv, k, v, cols, P,
            Q + b64 * stride_qb + h64 * stride_qh, DO + b64 * stride_dob + h64 * stride_doh,
            LSE + bh * Lq, DELTA + bh * Lq, Q,
            stride_qm, stride_qd, stride_dom, stride_dod, 0,
            0, Lq, Lq, P, D, qk_scale,
            False, False, BLOCK_M, BLOCK_D, UPCAST, PRECISION,
        )
    dk = dk * sm_scale
    part = (split.to(tl.int64) * Hkv + g64) * P * D
    offs = part + cols[:, None] * D + offs_d[None, :]
    tile_mask = (cols[:, None] < P) & (offs_d[None, :] < D)
    tl.store(DPK_PART + offs, dk, mask=tile_mask)
    tl.store(DPV_PART + offs, dv, mask=tile_mask)


@triton.jit
def _dq_step(dq, q, do, k, v, ok, lse2, delta, qk_scale, PRECISION: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.where(ok, tl.math.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, KPM, KV_LO, KV_HI, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkh, stride_pkn, stride_pkd,
    stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Hq, Lq, Lk, P, D: tl.constexpr, GROUP, qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ. Grid (cdiv(Lq, BLOCK_M), B * Hq); walks the same tiles as the forward."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    g = (h // GROUP).to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    m_start = pid_m * BLOCK_M
    rows = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_rows(Q + b64 * stride_qb + h64 * stride_qh, rows, stride_qm, stride_qd, offs_d, Lq, D, UPCAST)
    do = _load_rows(DO + b64 * stride_dob + h64 * stride_doh, rows, stride_dom, stride_dod, offs_d, Lq, D, UPCAST)
    row_base = pid_bh.to(tl.int64) * Lq
    lse2 = tl.load(LSE + row_base + rows, mask=rows < Lq, other=0.0) * LOG2E
    delta = tl.load(DELTA + row_base + rows, mask=rows < Lq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for n0 in range(0, P, BLOCK_N):
        cols = n0 + offs_n
        k = _load_rows(PK + g * stride_pkh, cols, stride_pkn, stride_pkd, offs_d, P, D, UPCAST)
        v = _load_rows(PV + g * stride_pvh, cols, stride_pvn, stride_pvd, offs_d, P, D, UPCAST)
        dq = _dq_step(dq, q, do, k, v, cols[None, :] < P, lse2, delta, qk_scale, PRECISION)

    lo, hi = _input_col_range(KV_LO, KV_HI, b, m_start, Lq, Lk, IS_CAUSAL, HAS_KPM, BLOCK_M, BLOCK_N)
    k_base = K + b64 * stride_kb + g * stride_kh
    v_base = V + b64 * stride_vb + g * stride_vh
    kpm_row = KPM + b64 * stride_mb
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        k = _load_rows(k_base, cols, stride_kn, stride_kd, offs_d, Lk, D, UPCAST)
        v = _load_rows(v_base, cols, stride_vn, stride_vd, offs_d, Lk, D, UPCAST)
        ok = _visible(rows[:, None], cols[None, :], kpm_row, stride_mn, Lq, Lk, Lk, IS_CAUSAL, HAS_KPM)
        dq = _dq_step(dq, q, do, k, v, ok, lse2, delta, qk_scale, PRECISION)

    dq = dq * sm_scale
    dq_ptrs = DQ + b64 * stride_dqb + h64 * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=(rows[:, None] < Lq) & (offs_d[None, :] < D))

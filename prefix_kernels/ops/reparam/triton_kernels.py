"""Triton kernels of the reparameterization MLP: three kernels, each launched in a few roles.

    forward    H = tanh(E @ W1^T + b1)               _reparam_mm_kernel (TANH, HAS_BIAS)
               Y = H @ W2^T + b2  -> [L, 2, Hkv, P, D] _reparam_mm_kernel (HAS_BIAS, C_LAYOUT)
    backward   dW2 = dY^T @ H, db2 = sum_p dY         _reparam_wgrad_kernel (G_LAYOUT, HAS_BIAS)
               dH partials = dY @ W2 (split over N)   _reparam_mm_kernel (A_LAYOUT)
               dZ = sum(partials) * (1 - H^2)         _reparam_tanh_grad_kernel
               dW1 = dZ^T @ E, db1 = sum_p dZ         _reparam_wgrad_kernel (HAS_BIAS)
               dE = dZ @ W1                           _reparam_mm_kernel

E [P, T] is the embedding table (the gather of tokens 0..P-1 reads its rows in place), W1 [H, T],
W2 [N, H] with N = 2 * L * Hkv * D. The "prefix layout" is the [L, 2, Hkv, P, D] tensor seen as a
matrix [P, N]: column n = j * D + d (j = (layer * 2 + kv) * Hkv + head) of row p lives at
``j * stride_j + p * stride_p + d``. Kernels read dY and write Y there directly, so no permute or copy
is ever made.

Conventions: fp32 accumulation; operands are rounded to COMPUTE (the compute dtype: under autocast,
fp32 parameters are rounded in registers, never copied) and fed to tl.dot as DOT (COMPUTE, or fp32
under TRITON_INTERPRET, whose dot mishandles bf16). Sizes need not be multiples of a tile: every
load and store is masked. Offsets are int32 (the launcher declines tensors of 2**31 elements or more).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tanh(x):
    """tanh in fp32 from one exp2: exactly +-1 in the limits, never inf / inf."""
    t = tl.math.exp2(tl.abs(x) * (-2.0 * LOG2E))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0.0, -y, y)


@triton.jit
def _col_offsets(cols, split, stride_outer, stride_inner, LAYOUT: tl.constexpr):
    """Memory offsets of matrix columns: ``(cols // split) * stride_outer + (cols % split) * stride_inner`` in
    the prefix layout (split = head dim), else ``cols * stride_inner``."""
    if LAYOUT:
        return (cols // split) * stride_outer + (cols % split) * stride_inner
    return cols * stride_inner


@triton.jit
def _reparam_mm_kernel(
    A, B, BIAS, C,
    stride_am, stride_aj, stride_ak,
    stride_bk, stride_bn,
    stride_cs, stride_cm, stride_cj, stride_cn,
    M, N, K, A_SPLIT, C_SPLIT, K_PER_SPLIT,
    A_LAYOUT: tl.constexpr, C_LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr, TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """C[s] = act(A[:, ks] @ B[ks, :] + bias) over the K range ks of split s.

    A [M, K] (prefix layout when A_LAYOUT, split A_SPLIT), B [K, N] (any strides: W^T is a view),
    C [S, M, N] (prefix layout when C_LAYOUT). Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), S): the M tiles
    of one N tile run side by side, so B's tile is read from DRAM once.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    # Rows and columns past the edge are wrapped onto valid ones for the loads, so that only K needs a
    # mask in the loop (fewer live registers); the store masks them.
    a_rows = A + (rows % M)[:, None] * stride_am
    b_cols = B + (cols % N)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(a_rows + _col_offsets(ks, A_SPLIT, stride_aj, stride_ak, A_LAYOUT)[None, :],
                    mask=ks[None, :] < k_hi, other=0.0)
        b = tl.load(b_cols + ks[:, None] * stride_bk, mask=ks[:, None] < k_hi, other=0.0)
        acc = tl.dot(a.to(COMPUTE).to(DOT), b.to(COMPUTE).to(DOT), acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=cols < N, other=0.0)
        acc += bias.to(COMPUTE).to(tl.float32)[None, :]
    if TANH:
        acc = _tanh(acc)
    c = C + pid_s * stride_cs + rows[:, None] * stride_cm
    c += _col_offsets(cols, C_SPLIT, stride_cj, stride_cn, C_LAYOUT)[None, :]
    tl.store(c, acc.to(C.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _reparam_wgrad_kernel(
    G, X, DW, DB,
    stride_gm, stride_gj, stride_gn,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    M, N, K, G_SPLIT,
    G_LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    COMPUTE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """A linear layer's weight gradient: DW[n, k] = sum_m G[m, n] X[m, k] and DB[n] = sum_m G[m, n].

    G [M, N] is the output gradient (prefix layout when G_LAYOUT, split G_SPLIT), X [M, K] the layer's
    input, M = P tokens (the reduction, short). Grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)); the programs
    with pid 0 along K also write DB. DW and DB take their pointers' dtypes (the parameters').
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    g_cols = G + _col_offsets(ns, G_SPLIT, stride_gj, stride_gn, G_LAYOUT)[None, :]
    n_ok = ns < N
    k_ok = ks < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    db = tl.zeros((BLOCK_N,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        ms = m0 + offs_m
        m_ok = ms < M
        # G is read [BLOCK_M, BLOCK_N], its memory order, and transposed in registers.
        g = tl.load(g_cols + ms[:, None] * stride_gm, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(COMPUTE)
        x = tl.load(X + ms[:, None] * stride_xm + ks[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = tl.dot(tl.trans(g.to(DOT)), x.to(COMPUTE).to(DOT), acc, input_precision=PRECISION)
        if HAS_BIAS:
            db += tl.sum(g.to(tl.float32), axis=0)
    dw = DW + ns[:, None] * stride_wn + ks[None, :] * stride_wk
    tl.store(dw, acc.to(DW.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        tl.store(DB + ns, db.to(DB.dtype.element_ty), mask=n_ok & (pid_k == 0))


@triton.jit
def _reparam_tanh_grad_kernel(
    PART, H, DZ,
    stride_ps, M, N, S,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """DZ = (sum over s of PART[s]) * (1 - H^2), the partials added in a fixed order (deterministic).

    PART [S, M, N] fp32, H [M, N] (tanh output, compute dtype), DZ [M, N] fp32; all row-major with
    row stride N. Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = rows[:, None] * N + cols[None, :]
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    dh = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for s in range(0, S):
        dh += tl.load(PART + s * stride_ps + offs, mask=ok, other=0.0)
    h = tl.load(H + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DZ + offs, dh * (1.0 - h * h), mask=ok)

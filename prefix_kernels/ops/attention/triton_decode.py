"""The Triton decode kernel of prefix attention (Lq <= 16, forward only) and its launcher.

Two ideas, after flash-attention's packed GQA and Flash-Decoding:

- **Packed GQA.** One program serves one (batch row, kv head) and packs the ``GROUP`` query heads of that kv
  head into the rows of its tile: row ``r`` is query head ``g * GROUP + r // Lq``, query ``r % Lq``. A decode
  step with GQA 32/8 then fills 8 of the 16 MMA rows and reads each K/V tile once per group, where the tiled
  forward fills 1 of 16 rows and reads it once per query head.
- **Split-KV with an LSE merge.** When B * Hkv programs would leave the GPU idle, the keys are cut into splits
  of whole tiles: the prefix is one or more splits of its own and the input cache the others (the
  cascade / Hydragen decomposition: the prefix and the cache are separate sources of one softmax). Each split
  writes its normalised partial output and its base-2 LSE in fp32; a second small kernel merges them in split
  order, so results are deterministic. With one split (a big batch, a short cache) the first kernel writes the
  output directly and walks the prefix and the cache in one online softmax.

Served: MHA, GQA, MQA; P = 0 or P > 0; a prefix bank (prefix_index / prefix_lengths); key_padding_mask;
causal with bottom-right alignment (rows of one query head differ when Lq > 1); ALiBi (with offsets); the
sliding window; softcap; fp16, bf16, fp32; return_lse. Declined, with the reasons recorded in
:data:`last_reasons` (the tiled forward then serves): Lq > 16, a call whose inputs require grad (the
decode kernel is forward only), and every feature not in :data:`SERVED_FEATURES` (dropout: decode never
uses it; any feature added to the record later until this kernel implements it).

Importing this module defines the kernels, so it loads triton.language: ``triton_impl`` imports it on the
first call that could use it, never at package import.
"""

from __future__ import annotations

import collections
import contextlib
import os

import torch
import triton
import triton.language as tl

from ..triton_utils import TileConfig, arch_of, cdiv, device_ctx, is_interpreting, sm_count
from . import triton_launch as triton_impl  # the launch facts shared with the tiled launcher
from .inputs import NO_FEATURES
from .triton_kernels import _tanh

MAX_LEN_Q = 16
# The features of the record (features.FEATURES) this kernel implements; any other active feature declines.
SERVED_FEATURES = frozenset({"alibi", "sliding_window", "softcap", "prefix_bank"})
KERNEL_FUNCTIONS = {"decode_fwd": "_decode_fwd_kernel", "decode_merge": "_decode_merge_kernel"}
# PREFIX_KERNELS_DECODE=0 turns the decode kernel off for the process (the tiled forward serves every call).
ENV_VAR = "PREFIX_KERNELS_DECODE"
enabled = os.environ.get(ENV_VAR, "1").strip() not in ("0", "off", "false", "no")
# What served the Lq <= 16 calls that reached the Triton forward: "decode" or "tiled" (tests, benchmarks).
counts: collections.Counter = collections.Counter()
# Why the last Lq <= 16 call was declined (empty when the decode kernel served it).
last_reasons: list[str] = []
# The split plan of the last launch: (prefix splits, input splits, keys per split); (0, 1, 0) is no split.
last_plan: tuple = ()
# Tests and benchmarks: the split size in key tiles, instead of the heuristic's (None: the heuristic).
_forced_split_tiles: list[int] = []

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@contextlib.contextmanager
def disabled():
    """Within the block, every call takes the tiled forward (benchmarks compare the two; the tuner times it)."""
    global enabled
    before, enabled = enabled, False
    try:
        yield
    finally:
        enabled = before


@contextlib.contextmanager
def forced_split_tiles(tiles: int):
    """Within the block, splits are ``tiles`` key tiles long (1: a split per tile), whatever the heuristic says."""
    if not isinstance(tiles, int) or tiles < 1:
        raise ValueError(f"tiles must be an int >= 1, got {tiles!r}")
    _forced_split_tiles.append(tiles)
    try:
        yield
    finally:
        _forced_split_tiles.pop()


def _below_autograd() -> bool:
    """Whether this runs inside an autograd-registered op (the custom op's forward), where grad mode is off even
    when the call will be differentiated. Unknown: assume so."""
    try:
        return torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality)
    except (AttributeError, RuntimeError):
        return True


def needs_grad(*tensors) -> bool:
    """Whether a backward may follow this forward: an input requires grad and grad mode is on, or the call came
    through the custom op (which runs its forward below autograd, with grad mode off, whether or not the caller
    differentiates: such calls count as differentiated). A plain eager no_grad call (the decode loop) is never
    one, whatever the prefix's requires_grad; tensor subclasses (nn.Parameter itself) take the custom op."""
    if not any(t is not None and t.requires_grad for t in tensors):
        return False
    return torch.is_grad_enabled() or _below_autograd()


def reasons(len_q: int, active_features, grad: bool) -> list[str]:
    """Why the decode kernel cannot serve a Triton forward call (empty when it can). The rest (dtype, head dim,
    device) the Triton backend has checked already."""
    why = []
    if not enabled:
        why.append(f"the decode kernel is disabled ({ENV_VAR}=0 or triton_decode.disabled())")
    if len_q > MAX_LEN_Q:
        why.append(f"Lq={len_q} is above {MAX_LEN_Q} (the decode kernel serves Lq <= {MAX_LEN_Q})")
    if grad:
        why.append("an input requires grad (the decode kernel is forward only; the tiled forward feeds the backward)")
    missing = [name for name in active_features if name not in SERVED_FEATURES]
    if missing:
        why.append(f"optional features {missing} are not implemented by the decode kernel (it serves "
                   f"{sorted(SERVED_FEATURES)})")
    return why


def try_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, need_lse, features=NO_FEATURES):
    """(out, lse) from the decode kernel, or None when it declines (the reasons in :data:`last_reasons`)."""
    why = reasons(q.shape[2], features.active, needs_grad(q, k, v, prefix_k, prefix_v))
    last_reasons[:] = why
    if why:
        counts["tiled"] += 1
        return None
    counts["decode"] += 1
    return forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, need_lse, features)


# Tiles: {(element width, arch): {BLOCK_M: {largest BLOCK_D served: (BLOCK_N, num_warps, num_stages)}}}. BLOCK_M
# is 16 when a (batch row, kv head) has at most 16 query rows (GROUP * Lq), else 64, in as many row blocks as
# needed. Each entry compiles without spills with Triton 3.6 and 3.8 (python -m prefix_kernels.kernel_report
# --only decode_), plain and with every served feature on.
_HALF_64 = {64: (64, 4, 2), 128: (64, 8, 2), 256: (32, 8, 1)}
_FP32_64 = {32: (16, 4, 1), 64: (16, 8, 1), 128: (16, 8, 1)}
TILES = {
    (2, 90): {16: {64: (64, 4, 3), 128: (64, 4, 2), 256: (32, 4, 2)}, 64: _HALF_64},
    (2, 80): {16: {64: (64, 4, 2), 128: (64, 4, 2), 256: (32, 8, 2)}, 64: _HALF_64},
    (4, 90): {16: {16: (32, 4, 1), 32: (32, 4, 2), 128: (32, 4, 1)}, 64: _FP32_64},
    (4, 80): {16: {128: (32, 4, 1)}, 64: _FP32_64},
}
BLOCK_MS = (16, 64)
MERGE_ROWS = 16  # query rows per program of the merge kernel
MERGE_WARPS = 4


def block_m_for(rows: int) -> int:
    """The row tile for a (batch row, kv head) with ``rows`` = GROUP * Lq query rows."""
    return BLOCK_MS[0] if rows <= BLOCK_MS[0] else BLOCK_MS[-1]


def tile_config(rows: int, head_dim: int, elem_bytes: int, arch: int = 90) -> TileConfig:
    """The decode tile for ``rows`` packed query rows at this head dim, operand width and architecture. The
    interpreter uses 32-key tiles (several tiles, and partial ones, at small test shapes)."""
    bm = block_m_for(rows)
    if is_interpreting():
        return TileConfig(bm, 32, 1, 1)
    bd = triton_impl.block_d(head_dim)
    width = 4 if elem_bytes >= 4 else 2
    for max_bd, (bn, warps, stages) in sorted(TILES[(width, arch)][bm].items()):
        if bd <= max_bd:
            return TileConfig(bm, bn, warps, stages)
    raise ValueError(f"no decode tile for head dim {head_dim} at {elem_bytes}-byte elements")


def shipped_configs():
    """Every (kernel, arch, BLOCK_D, dtype name, featured, TileConfig) the launcher can pick on a GPU, for the
    static report; ``featured`` rows are compiled with every served feature on (and the split epilogue)."""
    rows = []
    for arch in triton_impl.ARCHS:
        for dtype in ("fp16", "bf16", "fp32"):
            elem_bytes = 4 if dtype == "fp32" else 2
            max_d = triton_impl.MAX_HEAD_DIM_FP32_GPU if dtype == "fp32" else triton_impl.MAX_HEAD_DIM
            for bd in (16, 32, 64, 128, 256):
                if bd > max_d:
                    continue
                for bm in BLOCK_MS:
                    for featured in (False, True):
                        rows.append(("decode_fwd", arch, bd, dtype, featured, tile_config(bm, bd, elem_bytes, arch)))
                rows.append(("decode_merge", arch, bd, dtype, False, TileConfig(MERGE_ROWS, 0, MERGE_WARPS, 1)))
    return rows


def plan_splits(len_k: int, prefix_len: int, programs: int, block_n: int, device: torch.device):
    """(prefix splits, input splits, split length in keys) for a launch of ``programs`` (batch row, kv head, row
    block) programs. (0, 1, 0): no split, one program walks the prefix and the cache.

    On a GPU the splits fill about two programs per SM, each at least ``MIN_SPLIT_TILES`` tiles long (shorter
    ones cost more in the merge than they win); elsewhere (the interpreter) a split covers up to two tiles once
    there are fewer than eight programs, so tests walk the merge. A forced length (:func:`forced_split_tiles`)
    takes precedence."""
    tiles = cdiv(prefix_len, block_n) + cdiv(len_k, block_n)
    if _forced_split_tiles:
        split_tiles = _forced_split_tiles[-1]
    else:
        if device.type == "cuda":
            target, min_tiles = 2 * sm_count(device), MIN_SPLIT_TILES
        else:
            target, min_tiles = 8, 2
        want = cdiv(target, programs)
        if want <= 1:
            return 0, 1, 0
        split_tiles = max(min_tiles, cdiv(tiles, want))
    if split_tiles >= tiles:
        return 0, 1, 0
    cols = split_tiles * block_n
    return cdiv(prefix_len, cols), max(1, cdiv(len_k, cols)), cols


MIN_SPLIT_TILES = 4


def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, need_lse, features=NO_FEATURES):
    """out [B, Hq, Lq, D] laid out like q; lse [B, Hq, Lq] fp32, or [B, Hq, 0] if not need_lse.

    q ``[B, Hq, Lq, D]`` with Lq <= 16; k, v ``[B, Hkv, Lk, D]``; prefix ``[Hkv, P, D]`` or a bank
    ``[N, Hkv, P, D]`` (with features.prefix_index), or None."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    pk, pv = triton_impl._as_bank(prefix_k, k), triton_impl._as_bank(prefix_v, v)
    mask_u8, kv_lo, kv_hi = triton_impl._padding_bounds(key_padding_mask, Lk)
    has_kpm = mask_u8 is not None
    cfg = tile_config(G * Lq, D, q.element_size(), arch_of(q.device))
    m_blocks = cdiv(G * Lq, cfg.block_m)
    prefix_splits, input_splits, split_cols = plan_splits(Lk, P, B * Hkv * m_blocks, cfg.block_n, q.device)
    global last_plan
    last_plan = (prefix_splits, input_splits, split_cols)
    splits = prefix_splits + input_splits
    split = splits > 1
    fptrs, fscalars, fflags = features.kernel_args(_decode_fwd_kernel, q)
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Lq if need_lse else 0), dtype=torch.float32, device=q.device)
    if split:
        o_part = torch.empty((splits, B * Hq * Lq, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, B * Hq * Lq), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = lse
    bd = triton_impl.block_d(D)
    with device_ctx(q):
        _decode_fwd_kernel[(splits, m_blocks, B * Hkv)](
            q, k, v, pk, pv, mask_u8 if has_kpm else q, kv_lo if has_kpm else q, kv_hi if has_kpm else q, *fptrs,
            out, lse, o_part, lse_part,
            *q.stride(), *k.stride(), *v.stride(), *pk.stride(), *pv.stride(),
            *(mask_u8.stride() if has_kpm else (0, 0)), *out.stride(),
            B, Hq, Hkv, Lq, Lk, P, D, G, scale, scale * triton_impl.LOG2E, **fscalars,
            PREFIX_SPLITS=prefix_splits, SPLIT_COLS=split_cols,
            IS_CAUSAL=causal, HAS_KPM=has_kpm, STORE_LSE=need_lse, SPLIT=split, **fflags,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, **triton_impl._common_constexprs(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if split:
            n_rows = B * Hq * Lq
            _decode_merge_kernel[(cdiv(n_rows, MERGE_ROWS),)](
                o_part, lse_part, out, lse, *out.stride(), Hq, Lq, n_rows, splits, D,
                STORE_LSE=need_lse, BLOCK_R=MERGE_ROWS, BLOCK_D=bd, num_warps=MERGE_WARPS,
            )
    return out, lse


@triton.jit
def _decode_tile(q, k, v, ok, pos, slope2, m_i, l_i, acc, sm_scale, qk_scale, softcap,
                 HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One online-softmax step of the packed rows with one key tile. slope2 [BLOCK_M] is each row's ALiBi
    slope times log2(e) (rows are different query heads), pos [BLOCK_N] the keys' ALiBi positions."""
    x = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if HAS_SOFTCAP:
        s = _tanh(x * (sm_scale / softcap), USE_LIBDEVICE) * (softcap * LOG2E)
    else:
        s = x * qk_scale
    if HAS_ALIBI:
        s = s + slope2[:, None] * pos[None, :]
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
def _decode_fwd_kernel(
    Q, K, V, PK, PV, KPM, KV_LO, KV_HI, ALIBI, ALIBI_OFF, PIDX, PLEN, OUT, LSE, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    B, Hq, Hkv, Lq, Lk, P, D: tl.constexpr, GROUP, sm_scale, qk_scale, window, softcap, PREFIX_SPLITS, SPLIT_COLS,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, STORE_LSE: tl.constexpr, SPLIT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_ALIBI_OFF: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, USE_LIBDEVICE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (splits, cdiv(GROUP * Lq, BLOCK_M), B * Hkv). Row r of a program's tile is query head
    g * GROUP + r // Lq, query r % Lq. Without SPLIT, the one split walks the prefix then the cache and writes
    OUT [B, Hq, Lq, D] and LSE [B, Hq, Lq] (natural log). With SPLIT, splits [0, PREFIX_SPLITS) cover the prefix
    and the rest the cache, SPLIT_COLS keys each (a multiple of BLOCK_N); split s writes its normalised output
    to O_PART[s] [B * Hq * Lq, D] and its base-2 LSE to LSE_PART[s] [B * Hq * Lq] (fp32, contiguous; -inf and 0
    for a split without a visible key)."""
    sid = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = pid_bg // Hkv
    g = pid_bg % Hkv
    b64 = b.to(tl.int64)
    g64 = g.to(tl.int64)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < GROUP * Lq
    qi = r % Lq  # the query of each row
    h = g * GROUP + tl.where(row_ok, r // Lq, 0)  # and its query head
    h64 = h.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_ptrs = Q + b64 * stride_qb + h64[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    slope2 = tl.zeros([BLOCK_M], tl.float32)
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + h) * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # The row's prefix: bank entry n (0 without an index), its first p_row columns (0 for index -1).
    n = b * 0
    p_row = P
    if HAS_INDEX:
        idx = tl.load(PIDX + b).to(tl.int32)
        n = tl.maximum(idx, 0)
        p_row = tl.where(idx >= 0, P, 0)
    if HAS_LENGTHS:
        p_row = tl.minimum(p_row, tl.load(PLEN + n).to(tl.int32))

    # This split's prefix columns [p_lo, p_hi) and input keys [k_lo, k_hi).
    if SPLIT:
        is_prefix = sid < PREFIX_SPLITS
        p_lo = sid * SPLIT_COLS
        p_hi = tl.where(is_prefix, tl.minimum(p_lo + SPLIT_COLS, p_row), 0)
        k_lo = tl.maximum(sid - PREFIX_SPLITS, 0) * SPLIT_COLS
        k_hi = tl.where(is_prefix, 0, tl.minimum(k_lo + SPLIT_COLS, Lk))
    else:
        p_lo = 0
        p_hi = p_row
        k_lo = 0
        k_hi = Lk

    pk_base = PK + n.to(tl.int64) * stride_pkb + g64 * stride_pkh
    pv_base = PV + n.to(tl.int64) * stride_pvb + g64 * stride_pvh
    for n0 in range(p_lo, p_hi, BLOCK_N):
        cols = n0 + offs_n
        kept = cols < p_hi
        k = tl.load(pk_base + cols[:, None] * stride_pkn + offs_d[None, :] * stride_pkd,
                    mask=kept[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(pv_base + cols[:, None] * stride_pvn + offs_d[None, :] * stride_pvd,
                    mask=kept[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        m_i, l_i, acc = _decode_tile(q, k, v, kept[None, :], cols.to(tl.float32), slope2, m_i, l_i, acc,
                                     sm_scale, qk_scale, softcap, HAS_ALIBI, HAS_SOFTCAP, USE_LIBDEVICE, PRECISION)

    # Input keys: the split's range within the padding bounds and, causal with a window, above the lowest
    # query's window (the highest query, Lq - 1, sees up to key Lk - 1: causality narrows no range here).
    if HAS_KPM:
        k_lo = tl.maximum(k_lo, (tl.load(KV_LO + b) // BLOCK_N) * BLOCK_N)
        k_hi = tl.minimum(k_hi, tl.load(KV_HI + b))
    if IS_CAUSAL and HAS_WINDOW:
        k_lo = tl.maximum(k_lo, (tl.maximum(Lk - Lq - window + 1, 0) // BLOCK_N) * BLOCK_N)
    pos_base = p_row
    if HAS_ALIBI_OFF:
        pos_base = p_row + tl.load(ALIBI_OFF + b).to(tl.int32)
    k_base = K + b64 * stride_kb + g64 * stride_kh
    v_base = V + b64 * stride_vb + g64 * stride_vh
    kpm_row = KPM + b64 * stride_mb
    diag = qi + (Lk - Lq)  # causal: the last key each row sees
    for n0 in range(k_lo, k_hi, BLOCK_N):
        cols = n0 + offs_n
        kept = cols < k_hi
        if HAS_KPM:
            # Padded keys are never read: whatever they hold reaches no output.
            kept = kept & (tl.load(kpm_row + cols * stride_mn, mask=kept, other=0) != 0)
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kept[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kept[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        ok = kept[None, :]
        if IS_CAUSAL:
            ok = ok & (cols[None, :] <= diag[:, None])
            if HAS_WINDOW:
                ok = ok & (cols[None, :] > diag[:, None] - window)
        m_i, l_i, acc = _decode_tile(q, k, v, ok, (pos_base + cols).to(tl.float32), slope2, m_i, l_i, acc,
                                     sm_scale, qk_scale, softcap, HAS_ALIBI, HAS_SOFTCAP, USE_LIBDEVICE, PRECISION)

    # A row that saw no key has l_i = 0: output zeros and LSE = -inf. A NaN logit makes l_i NaN, and its LSE
    # NaN (tl.maximum drops NaN from m_i), as its output.
    seen = l_i != 0.0
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    grow = (b64 * Hq + h64) * Lq + qi  # the row's index in [B, Hq, Lq]
    if SPLIT:
        part = sid.to(tl.int64) * B * Hq * Lq
        tl.store(O_PART + (part + grow)[:, None] * D + offs_d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE_PART + part + grow, lse2, mask=row_ok)
    else:
        o_ptrs = (OUT + b64 * stride_ob + h64[:, None] * stride_oh + qi[:, None] * stride_om
                  + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        if STORE_LSE:
            tl.store(LSE + grow, lse2 * LN2, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    O_PART, LSE_PART, OUT, LSE,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, Lq, N_ROWS, SPLITS, D: tl.constexpr,
    STORE_LSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the splits' partials (see ``_decode_fwd_kernel``) of BLOCK_R rows of [B * Hq * Lq]: out = sum_s
    w_s o_s / sum_s w_s with w_s = 2^(lse_s - max), lse = max + log2(sum_s w_s), in split order (deterministic).
    Grid (cdiv(N_ROWS, BLOCK_R),)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N_ROWS
    tile_ok = row_ok[:, None] & (offs_d[None, :] < D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(0, SPLITS):
        idx = (rows64 * 0 + s) * N_ROWS + rows64  # int64 even where N_ROWS is specialised to a constant
        lse_s = tl.load(LSE_PART + idx, mask=row_ok, other=float("-inf"))
        o_s = tl.load(O_PART + idx[:, None] * D + offs_d[None, :], mask=tile_ok, other=0.0)
        m_new = tl.maximum(m, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse_s - m_safe)
        l_sum = l_sum * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m = m_new
    out = acc / tl.where(l_sum > 0.0, l_sum, 1.0)[:, None]
    b = rows64 // (Hq * Lq)
    h = (rows64 // Lq) % Hq
    i = rows64 % Lq
    o_ptrs = (OUT + b[:, None] * stride_ob + h[:, None] * stride_oh + i[:, None] * stride_om
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=tile_ok)
    if STORE_LSE:
        seen = l_sum != 0.0
        lse = tl.where(seen, m + tl.math.log2(tl.where(seen, l_sum, 1.0)), float("-inf")) * LN2
        tl.store(LSE + rows64, lse, mask=row_ok)

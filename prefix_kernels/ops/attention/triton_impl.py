"""Launchers of the Triton prefix-attention kernels, and the tile configurations they ship with.

Tile sizes come from one table (:func:`tile_config`) rather than autotuning: the configurations
are few, every one of them is compiled ahead of time for sm80 and sm90 by ``kernel_report`` (shared
memory, registers, spills, tensor cores), and a launch never pays a tuning sweep.

The prefix gradient is reduced over the batch without atomics: each program of the prefix kernel
sums a contiguous range of (batch row, query head) units into an fp32 partial, and the few partials
are then added in a fixed order. Results are bitwise deterministic run to run, and the scratch is
SPLITS copies of the prefix, with SPLITS chosen to fill the GPU and never more than B * group.

Importing this module does not import Triton (the dispatcher reads its limits at package import); the
kernels are imported on the first launch.
"""

from __future__ import annotations

import torch

from ..triton_utils import TileConfig, arch_of, cdiv, device_ctx, is_interpreting, sm_count
from . import tile_overrides
from .inputs import NO_FEATURES
from .triton_launch import (  # noqa: F401  (re-exported: the launch facts triton_decode shares)
    ARCHS,
    LOG2E,
    MAX_HEAD_DIM,
    MAX_HEAD_DIM_FP32,
    MAX_HEAD_DIM_FP32_GPU,
    MIN_HEAD_DIM,
    _as_bank,
    _bounds_memo,
    _common_constexprs,
    _padding_bounds,
    _upcast,
    block_d,
)

KERNELS = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_prefix_dkdv", "bwd_dq")


# The shipped tiles: {kernel: {largest BLOCK_D served: (block_m, block_n, num_warps, num_stages)}}, per
# architecture and operand width. Each entry is the largest tile that compiles without register spills
# and within shared memory on that architecture (python -m prefix_kernels report shows the evidence).
# In the dK/dV kernels block_n is the key tile a program owns and block_m the query tile it walks.
# "fwd_decode" serves Lq <= 16, so one new token does not pay for a 64- or 128-row query tile.
_HALF_TILES = {
    90: {
        "fwd": {64: (128, 64, 8, 2), 128: (128, 64, 8, 2), 256: (64, 32, 8, 2)},
        "fwd_decode": {128: (16, 64, 8, 2), 256: (16, 32, 4, 2)},
        "bwd_dkdv": {64: (64, 64, 8, 2), 128: (32, 64, 8, 2), 256: (32, 32, 8, 1)},
        "bwd_prefix_dkdv": {64: (64, 64, 8, 2), 128: (32, 64, 8, 2), 256: (32, 32, 8, 1)},
        "bwd_dq": {64: (128, 64, 8, 2), 128: (128, 64, 8, 2), 256: (32, 32, 4, 1)},
    },
    80: {
        "fwd": {64: (128, 64, 8, 2), 128: (64, 64, 8, 2), 256: (64, 32, 8, 2)},
        "fwd_decode": {128: (16, 64, 8, 2), 256: (16, 32, 4, 2)},
        "bwd_dkdv": {64: (64, 32, 4, 2), 128: (32, 64, 8, 2), 256: (32, 32, 8, 1)},
        "bwd_prefix_dkdv": {16: (64, 32, 4, 2), 32: (64, 32, 8, 2), 64: (64, 32, 4, 2), 128: (32, 64, 8, 2),
                            256: (32, 32, 8, 1)},
        "bwd_dq": {64: (64, 64, 8, 2), 128: (64, 64, 8, 2), 256: (32, 32, 4, 1)},
    },
}
# fp32 runs its dots as 3xTF32, which holds three times the operand state: small tiles, same on both archs.
_FP32_TILES = {
    "fwd": {128: (32, 32, 8, 1)},
    "fwd_decode": {64: (16, 32, 8, 1), 128: (16, 32, 4, 1)},
    "bwd_dkdv": {32: (32, 16, 4, 1), 64: (32, 16, 4, 1), 128: (16, 16, 4, 1)},
    "bwd_prefix_dkdv": {32: (16, 32, 4, 1), 64: (32, 32, 8, 1), 128: (16, 16, 4, 1)},
    "bwd_dq": {64: (32, 32, 8, 1), 128: (16, 32, 4, 1)},
}


# Overrides for kernels with optional features on, per (arch, element bytes): only where the plain tile
# spills once the dropout RNG and the softcap's tanh are live (kernel_report shows both flag sets).
_FP32_FEATURED = {
    "fwd_decode": {64: (16, 16, 4, 1), 128: (16, 16, 4, 1)},
    "bwd_dkdv": {32: (32, 16, 4, 1), 64: (32, 16, 4, 1), 128: (16, 16, 8, 1)},
    "bwd_dq": {32: (32, 16, 8, 1)},
}
_FEATURED_TILES = {
    (90, 2): {
        "fwd_decode": {256: (16, 32, 4, 1)},
        "bwd_dkdv": {64: (32, 64, 8, 2), 128: (32, 32, 8, 2), 256: (32, 16, 8, 1)},
        "bwd_prefix_dkdv": {64: (32, 64, 8, 2)},
        "bwd_dq": {64: (128, 32, 8, 2), 128: (128, 32, 8, 2)},
    },
    (80, 2): {
        "bwd_dkdv": {32: (32, 64, 8, 2), 128: (32, 32, 8, 2)},
        "bwd_prefix_dkdv": {16: (32, 64, 8, 2), 32: (32, 64, 8, 2)},
        "bwd_dq": {64: (64, 32, 8, 2)},
    },
    (90, 4): _FP32_FEATURED,
    (80, 4): _FP32_FEATURED,
}


# Overrides on top of the featured tiles when attn_bias is on as well (its [BLOCK_M, BLOCK_N] fp32 tile and pointers
# are live beside everything else), per (arch, element bytes): only where the featured tile spills with every flag on,
# HAS_BIAS included (kernel_report's "all" rows; its "scores" rows are every flag but the bias, on the tiles above).
_BIAS_TILES = {
    (90, 2): {
        "fwd": {128: (128, 32, 8, 2), 256: (32, 32, 8, 2)},
        "bwd_dkdv": {32: (32, 64, 8, 2), 64: (16, 64, 8, 2)},
        "bwd_prefix_dkdv": {128: (16, 64, 8, 2)},
        "bwd_dq": {128: (64, 32, 8, 2), 256: (16, 32, 4, 1)},
    },
    (80, 2): {
        "fwd": {16: (128, 64, 8, 2), 32: (128, 32, 8, 2), 64: (64, 32, 8, 2), 256: (32, 32, 8, 2)},
        "bwd_dkdv": {32: (16, 64, 8, 2), 64: (32, 32, 4, 2), 256: (32, 16, 8, 1)},
        "bwd_prefix_dkdv": {32: (16, 64, 8, 2), 64: (32, 32, 4, 2), 128: (16, 64, 8, 2)},
        "bwd_dq": {32: (64, 32, 8, 2), 64: (32, 32, 8, 2), 128: (32, 64, 8, 2)},
    },
}

VARIANTS = ("plain", "scores", "all")  # the tile classes: no score feature; score features; those and attn_bias


def tile_config(kernel: str, head_dim: int, elem_bytes: int, len_q: int | None = None, arch: int = 90,
                featured: bool = False, bias: bool = False) -> TileConfig:
    """The tile configuration shipped for ``kernel`` at this head dim, element size and architecture.

    ``featured``: an optional feature (ALiBi, dropout, window, softcap) is on; where those kernels would
    spill with the plain tile, ``_FEATURED_TILES`` holds a smaller one. ``bias``: attn_bias is on too (it counts as
    featured); ``_BIAS_TILES`` holds a smaller tile still where the featured one spills with it.

    Under the interpreter every kernel uses 32 x 32 tiles, which keeps CPU tests fast and still walks
    several tiles, and partial ones, at small shapes.

    A measured table (``tile_overrides``: ``PREFIX_KERNELS_TILES`` or a file shipped for this device, written by
    ``gpu-check``) takes precedence where it has an entry for this kernel, BLOCK_D, width and featured flag (not
    with attn_bias: gpu-check measures no bias, so its tiles are not known to fit with one).
    """
    featured = featured or bias
    decode = kernel == "fwd" and len_q is not None and len_q <= 16
    measured = None if bias and not is_interpreting() else tile_overrides.lookup(
        "fwd_decode" if decode else kernel, block_d(head_dim), elem_bytes, featured, arch, is_interpreting())
    if measured is not None:
        return TileConfig(*measured)
    if is_interpreting():
        return TileConfig(32, 32, 1, 1)
    bd = block_d(head_dim)
    if kernel == "bwd_preprocess":
        return TileConfig(64 if bd <= 128 and elem_bytes == 2 else 32, 16, 4, 1)
    if kernel == "fwd" and len_q is not None and len_q <= 16:
        kernel = "fwd_decode"
    width = 4 if elem_bytes >= 4 else 2
    table = _FP32_TILES if width == 4 else _HALF_TILES[arch]
    entries = dict(table[kernel])
    if featured:
        entries.update(_FEATURED_TILES.get((arch, width), {}).get(kernel, {}))
    if bias:
        entries.update(_BIAS_TILES.get((arch, width), {}).get(kernel, {}))
    for max_bd, cfg in sorted(entries.items()):
        if bd <= max_bd:
            return TileConfig(*cfg)
    raise ValueError(f"no {kernel} tile for head dim {head_dim} at {elem_bytes}-byte elements")


def shipped_configs():
    """Every (kernel, arch, BLOCK_D, dtype name, decode, variant, TileConfig) the launchers can pick on a
    GPU; ``variant`` is one of :data:`VARIANTS` (kernel_report compiles "scores" rows with every optional feature
    on but attn_bias, "all" rows with every one)."""
    rows = []
    for arch in ARCHS:
        for dtype in ("fp16", "bf16", "fp32"):
            elem_bytes = 4 if dtype == "fp32" else 2
            max_d = MAX_HEAD_DIM_FP32_GPU if dtype == "fp32" else MAX_HEAD_DIM
            for bd in (16, 32, 64, 128, 256):
                if bd > max_d:
                    continue
                for kernel in KERNELS:
                    for decode in (False, True) if kernel == "fwd" else (False,):
                        for variant in VARIANTS:
                            cfg = tile_config(kernel, bd, elem_bytes, 1 if decode else None, arch,
                                              variant != "plain", variant == "all")
                            rows.append((kernel, arch, bd, dtype, decode, variant, cfg))
    return rows


def _kernels():
    """The kernels module, imported on first launch (it loads triton.language; ``import prefix_kernels`` must
    not, so that TRITON_INTERPRET can still be set after it)."""
    from . import triton_kernels

    return triton_kernels


def _decode():
    """The decode kernel's module (``triton_decode``), imported on the first Lq <= 16 call."""
    from . import triton_decode

    return triton_decode


DECODE_MAX_LEN_Q = 16


def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, need_lse, features=NO_FEATURES):
    """out [B, Hq, Lq, D] laid out like q; lse [B, Hq, Lq] fp32, or [B, Hq, 0] if not need_lse.

    Lq <= 16 calls without a backward to follow go to the decode kernel (``triton_decode``) when it serves them;
    the tiled kernel below serves the others."""
    if q.shape[2] <= DECODE_MAX_LEN_Q:
        served = _decode().try_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, need_lse,
                                       features)
        if served is not None:
            return served
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    pk, pv = _as_bank(prefix_k, k), _as_bank(prefix_v, v)
    mask_u8, kv_lo, kv_hi = _padding_bounds(key_padding_mask, Lk)
    kern = _kernels()
    fptrs, fscalars, fflags = features.kernel_args(kern._attn_fwd_kernel, q)
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Lq if need_lse else 0), dtype=torch.float32, device=q.device)
    cfg = tile_config("fwd", D, q.element_size(), Lq, arch_of(q.device), bool(features.scores),
                      features.attn_bias is not None)
    has_kpm = mask_u8 is not None
    m = mask_u8 if has_kpm else q
    grid = (cdiv(Lq, cfg.block_m), B * Hq)
    with device_ctx(q):
        kern._attn_fwd_kernel[grid](
            q, k, v, pk, pv, m, kv_lo if has_kpm else q, kv_hi if has_kpm else q, *fptrs, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *pk.stride(), *pv.stride(),
            *(mask_u8.stride() if has_kpm else (0, 0)), *out.stride(),
            Hq, Lq, Lk, P, D, Hq // Hkv, scale, scale * LOG2E, **fscalars,
            IS_CAUSAL=causal, HAS_KPM=has_kpm, STORE_LSE=need_lse, **fflags,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d(D), **_common_constexprs(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out, lse


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads_q: int, len_q: int, n_cols: int, dropout_p: float,
                      device: torch.device) -> torch.Tensor:
    """The keep mask ``[B, Hq, Lq, P + Lk]`` bool that these kernels use for ``seed`` (debugging and tests)."""
    mask = torch.empty((batch, heads_q, len_q, n_cols), dtype=torch.uint8, device=device)
    grid = (cdiv(len_q, 32), cdiv(n_cols, 32), batch * heads_q)
    with device_ctx(mask):
        _kernels()._dropout_mask_kernel[grid](seed, mask, len_q, n_cols, float(dropout_p), BLOCK_M=32, BLOCK_N=32)
    return mask.bool()


def _prefix_splits(units: int, programs_per_split: int, device: torch.device) -> int:
    """How many partial sums the prefix gradient uses: enough programs to fill the GPU."""
    if device.type != "cuda":
        return min(2, units)  # the interpreter: two partials, so tests exercise the reduction
    target = 2 * sm_count(device)
    return max(1, min(units, cdiv(target, programs_per_split)))


def backward(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale,
             features=NO_FEATURES):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v); prefix gradients are None when P = 0."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    bd = block_d(D)
    consts = _common_constexprs(q.dtype)
    arch = arch_of(q.device)
    mask_u8, kv_lo, kv_hi = _padding_bounds(key_padding_mask, Lk)
    kern = _kernels()
    fptrs, fscalars, fflags = features.kernel_args(kern._attn_bwd_dkdv_kernel, q)
    featured = bool(features.scores)
    bias = features.attn_bias is not None
    has_kpm = mask_u8 is not None
    m = mask_u8 if has_kpm else q
    lo_ = kv_lo if has_kpm else q
    hi_ = kv_hi if has_kpm else q
    m_strides = mask_u8.stride() if has_kpm else (0, 0)
    has_dlse = dlse is not None and dlse.numel() > 0
    dlse_c = dlse.contiguous() if has_dlse else lse
    scales = (scale, scale * LOG2E)

    delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    with device_ctx(q):
        cfg = tile_config("bwd_preprocess", D, q.element_size(), arch=arch, featured=featured, bias=bias)
        kern._attn_bwd_preprocess_kernel[(cdiv(Lq, cfg.block_m), B * Hq)](
            out, dout, dlse_c, delta, *out.stride(), *dout.stride(), Hq, Lq, D,
            HAS_DLSE=has_dlse, BLOCK_M=cfg.block_m, BLOCK_D=bd,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        cfg = tile_config("bwd_dkdv", D, q.element_size(), arch=arch, featured=featured, bias=bias)
        kern._attn_bwd_dkdv_kernel[(cdiv(Lk, cfg.block_n), B * Hkv)](
            q, k, v, dout, lse, delta, m, lo_, hi_, *fptrs, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *m_strides, *dk.stride(), *dv.stride(),
            Hq, Hkv, Lq, Lk, P, D, G, *scales, **fscalars,
            IS_CAUSAL=causal, HAS_KPM=has_kpm, **fflags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd,
            **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        pk, pv = _as_bank(prefix_k, k), _as_bank(prefix_v, v)
        cfg = tile_config("bwd_dq", D, q.element_size(), arch=arch, featured=featured, bias=bias)
        dq_kernel = kern._attn_bwd_dq_kernel
        qptrs, qscalars, qflags = features.kernel_args(dq_kernel, q)
        dq_kernel[(cdiv(Lq, cfg.block_m), B * Hq)](
            q, k, v, pk, pv, dout, lse, delta, m, lo_, hi_, *qptrs, dq,
            *q.stride(), *k.stride(), *v.stride(), *pk.stride(), *pv.stride(),
            *dout.stride(), *m_strides, *dq.stride(),
            Hq, Lq, Lk, P, D, G, *scales, **qscalars,
            IS_CAUSAL=causal, HAS_KPM=has_kpm, **qflags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd,
            **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if P == 0:
            return dq, dk, dv, None, None
        cfg = tile_config("bwd_prefix_dkdv", D, q.element_size(), arch=arch, featured=featured, bias=bias)
        n_tiles = cdiv(P, cfg.block_n)
        units = B * G
        splits = _prefix_splits(units, n_tiles * Hkv, q.device)
        per_split = cdiv(units, splits)
        n_bank = pk.shape[0]
        if features.prefix_index is None:
            items = cdiv(units, per_split)
            rows = item_prefix = item_lo = item_hi = seg_off = q
        else:
            rows, item_prefix, item_lo, item_hi, seg_off = _bank_items(features.prefix_index, n_bank, G, per_split)
            items = item_prefix.numel()
        dpk_part = torch.empty((items, Hkv, P, D), dtype=torch.float32, device=q.device)
        dpv_part = torch.empty_like(dpk_part)
        if items:
            prefix_kernel = kern._attn_bwd_prefix_dkdv_kernel
            pptrs, pscalars, pflags = features.kernel_args(prefix_kernel, q)
            prefix_kernel[(n_tiles, Hkv, items)](
                q, pk, pv, dout, lse, delta, *pptrs, rows, item_prefix, item_lo, item_hi, dpk_part, dpv_part,
                *q.stride(), *pk.stride(), *pv.stride(), *dout.stride(),
                Hq, Hkv, Lq, Lk, P, D, G, units, per_split, *scales, **pscalars, **pflags,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd,
                **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        if features.prefix_index is None:
            dpk, dpv = dpk_part.sum(dim=0), dpv_part.sum(dim=0)
        else:
            dpk = _sum_segments(dpk_part, seg_off, n_bank)
            dpv = _sum_segments(dpv_part, seg_off, n_bank)
    return dq, dk, dv, dpk.view(prefix_k.shape).to(prefix_k.dtype), dpv.view(prefix_v.shape).to(prefix_v.dtype)


def _bank_items(prefix_index: torch.Tensor, n_prefixes: int, group: int, per_item: int):
    """Work items of the bank's prefix gradient: the rows sorted by prefix, and for each prefix its units
    (row, query head) cut into items of at most ``per_item`` units. Returns int32 tensors (rows [B],
    item_prefix, item_lo, item_hi [items], seg_off [N + 1]: prefix n's items are seg_off[n]:seg_off[n+1]).

    The per-prefix row counts are read on the host: one small device sync per backward, in bank mode
    only, so that every item is full and the partials are few (about the GPU's width, plus N).
    """
    key = torch.where(prefix_index >= 0, prefix_index.long(), n_prefixes)
    rows = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.bincount(key, minlength=n_prefixes + 1)[:n_prefixes].tolist()
    item_prefix, item_lo, item_hi, seg_off = [], [], [], [0]
    start = 0
    for n, count in enumerate(counts):
        first, last = start * group, (start + count) * group
        for lo in range(first, last, per_item):
            item_prefix.append(n)
            item_lo.append(lo)
            item_hi.append(min(lo + per_item, last))
        seg_off.append(len(item_prefix))
        start += count
    device = prefix_index.device

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

    return rows, as_tensor(item_prefix), as_tensor(item_lo), as_tensor(item_hi), as_tensor(seg_off)


def _sum_segments(parts: torch.Tensor, seg_off: torch.Tensor, n_segments: int) -> torch.Tensor:
    """[items, ...] fp32 partials -> [n_segments, ...]: each segment's items added in a fixed order."""
    out = torch.empty((n_segments, *parts.shape[1:]), dtype=torch.float32, device=parts.device)
    n_elems = parts[0].numel() if parts.shape[0] else out[0].numel()
    block = 1024
    with device_ctx(out):
        _kernels()._sum_segments_kernel[(n_segments, cdiv(n_elems, block))](parts, seg_off, out, n_elems,
                                                                             BLOCK=block)
    return out

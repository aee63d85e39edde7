"""Launchers of the Triton reparameterization kernels, and the tile configurations they ship with.

Seven launches in all, two forward and five backward (see ``triton_kernels``). Tile sizes come from one
table (:func:`tile_config`) rather than autotuning, as for attention: every shipped configuration is
compiled ahead of time for sm80 and sm90 by ``kernel_report``, and a launch never pays a tuning sweep.

The tanh output H [P, H] is saved by the forward (it is materialised there anyway, between the two
GEMMs) and reused by the backward, rather than recomputed: at P-Tuning v2 sizes it is 128 KB, and
recomputing it would add a launch and a GEMM over the embedding to every backward.

dH = dY @ W2 reduces over the long N = 2 * L * Hkv * D axis. It is split over N into a few fp32
partials (enough programs to fill the GPU) that the tanh-gradient kernel adds in a fixed order: no
atomics, bitwise deterministic results.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..attention.triton_impl import arch_of, is_interpreting
from . import triton_kernels as kern

ARCHS = (80, 90)
# (parameter dtype, compute dtype) pairs the kernels ship for: plain, and autocast over fp32 parameters.
DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
)
ROLES = ("fwd_hidden", "fwd_project", "bwd_dw2", "bwd_dh", "bwd_dz", "bwd_dw1", "bwd_demb")
MAX_NUMEL = 2**31 - 1  # int32 offsets

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class TileConfig:
    """Tile of one role. For the mm roles: block_m rows (tokens) x block_n columns, block_k the
    reduction step. For the weight gradients: block_m the rows of dW, block_n its columns, block_k
    the step over tokens. The tanh gradient has no reduction (block_k unused)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# {role: (block_m, block_n, block_k, num_warps, num_stages)}, per architecture for half-precision compute;
# fp32 compute runs its dots as 3xTF32 and takes smaller tiles, the same on both architectures.
# fwd_project and bwd_dh stream W2, the one large tensor: their tiles are the ones that matter.
_HALF_TILES = {
    90: {
        "fwd_hidden": (64, 64, 64, 4, 3),
        "fwd_project": (64, 128, 64, 4, 3),
        "bwd_dw2": (128, 64, 32, 4, 2),
        "bwd_dh": (64, 64, 128, 4, 3),
        "bwd_dz": (32, 128, 0, 4, 1),
        "bwd_dw1": (64, 64, 32, 4, 2),
        "bwd_demb": (64, 64, 64, 4, 3),
    },
    80: {
        "fwd_hidden": (64, 64, 64, 4, 3),
        "fwd_project": (64, 128, 64, 4, 3),
        "bwd_dw2": (128, 64, 32, 4, 2),
        "bwd_dh": (64, 64, 128, 4, 3),
        "bwd_dz": (32, 128, 0, 4, 1),
        "bwd_dw1": (64, 64, 32, 4, 2),
        "bwd_demb": (64, 64, 64, 4, 3),
    },
}
# bwd_dh and bwd_demb step 16 over their reduction (3 stages): at 32 they spill 8 bytes on sm80 with Triton 3.6
# (128 registers); 16 compiles clean with Triton 3.6 and 3.8 on both architectures (kernel_report).
_FP32_TILES = {
    "fwd_hidden": (32, 64, 32, 4, 2),
    "fwd_project": (32, 64, 32, 4, 2),
    "bwd_dw2": (64, 32, 32, 4, 2),
    "bwd_dh": (32, 64, 16, 4, 3),
    "bwd_dz": (32, 128, 0, 4, 1),
    "bwd_dw1": (64, 32, 32, 4, 2),
    "bwd_demb": (32, 64, 16, 4, 3),
}
_INTERPRET_TILE = TileConfig(16, 32, 16, 1, 1)


def tile_config(role: str, compute_dtype: torch.dtype, arch: int = 90) -> TileConfig:
    """The tile shipped for ``role`` at this compute dtype and architecture.

    Under the interpreter every role uses 16 x 32 tiles with a 16-step reduction, so that CPU tests
    walk several tiles, and partial ones, at small sizes.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {ROLES}")
    if is_interpreting():
        return _INTERPRET_TILE
    table = _FP32_TILES if compute_dtype == torch.float32 else _HALF_TILES[arch]
    return TileConfig(*table[role])


def shipped_configs():
    """Every (role, arch, parameter dtype, compute dtype, TileConfig) the launchers can pick on a GPU."""
    rows = []
    for arch in ARCHS:
        for pdt, cdt in DTYPE_PAIRS:
            for role in ROLES:
                if role == "bwd_dz" and pdt != cdt:
                    continue  # reads only fp32 partials and the compute-dtype H: the plain row covers it
                rows.append((role, arch, pdt, cdt, tile_config(role, cdt, arch)))
    return rows


def precision(compute_dtype: torch.dtype) -> str:
    """tl.dot input precision: 3xTF32 for fp32 (about fp32 accuracy, on tensor cores), as for attention."""
    return "tf32x3" if compute_dtype == torch.float32 else "tf32"


def dot_dtype(compute_dtype: torch.dtype):
    """What tl.dot is fed: the compute dtype, or fp32 for bf16 in the interpreter (its bf16 dot is wrong)."""
    if is_interpreting() and compute_dtype == torch.bfloat16:
        return tl.float32
    return TL_DTYPES[compute_dtype]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _splits(tiles: int, k: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(splits, K per split) for dH's reduction over N: enough programs to fill the GPU (two in the
    interpreter, so that tests exercise the reduction)."""
    steps = triton.cdiv(k, block_k)
    if device.type != "cuda":
        want = 2
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        want = triton.cdiv(2 * _sm_count(index), tiles)
    per_split = triton.cdiv(steps, max(1, min(want, steps))) * block_k
    return triton.cdiv(k, per_split), per_split


def _device_ctx(t: torch.Tensor):
    if t.is_cuda:
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()


def _mm(role, a, b, bias, c, a_strides, b_strides, c_strides, M, N, K, *, a_split=None, c_split=None, splits=1,
        k_per_split=None, tanh=False, compute_dtype, arch):
    """Launch ``_reparam_mm_kernel``: a_strides (m, j, k), b_strides (k, n), c_strides (s, m, j, n); a_split /
    c_split: the head dim when A / C are in the prefix layout, else None."""
    cfg = tile_config(role, compute_dtype, arch)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), splits)
    kern._reparam_mm_kernel[grid](
        a, b, bias if bias is not None else c, c,
        *a_strides, *b_strides, *c_strides,
        M, N, K, a_split or 1, c_split or 1, K if k_per_split is None else k_per_split,
        A_LAYOUT=a_split is not None, C_LAYOUT=c_split is not None, HAS_BIAS=bias is not None, TANH=tanh,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        COMPUTE=TL_DTYPES[compute_dtype], DOT=dot_dtype(compute_dtype), PRECISION=precision(compute_dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _wgrad(role, g, x, dw, db, g_strides, x_strides, M, N, K, *, g_split=None, compute_dtype, arch):
    """Launch ``_reparam_wgrad_kernel``: g_strides (m, j, n), x_strides (m, k); g_split: the head dim when G
    is in the prefix layout, else None."""
    cfg = tile_config(role, compute_dtype, arch)
    grid = (triton.cdiv(N, cfg.block_m), triton.cdiv(K, cfg.block_n))
    kern._reparam_wgrad_kernel[grid](
        g, x, dw, db, *g_strides, *x_strides, *dw.stride(),
        M, N, K, g_split or 1, G_LAYOUT=g_split is not None, HAS_BIAS=True,
        BLOCK_N=cfg.block_m, BLOCK_K=cfg.block_n, BLOCK_M=cfg.block_k,
        COMPUTE=TL_DTYPES[compute_dtype], DOT=dot_dtype(compute_dtype), PRECISION=precision(compute_dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def forward(embedding, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, compute_dtype):
    """Returns (prefix ``[L, 2, Hkv, P, D]`` contiguous, hidden ``[P, H]``), both in compute_dtype."""
    P, T = embedding.shape
    H, N = w1.shape[0], w2.shape[0]
    D = head_dim
    cd = compute_dtype
    arch = arch_of(embedding.device)
    b1, b2 = b1.contiguous(), b2.contiguous()
    hidden = torch.empty((P, H), dtype=cd, device=embedding.device)
    out = torch.empty((num_layers, 2, num_kv_heads, P, D), dtype=cd, device=embedding.device)
    with _device_ctx(embedding):
        # H = tanh(E @ W1^T + b1): B[k=t, n=h] = W1[h, t].
        _mm("fwd_hidden", embedding, w1, b1, hidden, (embedding.stride(0), 0, embedding.stride(1)),
            (w1.stride(1), w1.stride(0)), (0, hidden.stride(0), 0, hidden.stride(1)), P, H, T, tanh=True,
            compute_dtype=cd, arch=arch)
        # Y = H @ W2^T + b2, stored straight into [L, 2, Hkv, P, D]: column n -> (n // D, n % D).
        _mm("fwd_project", hidden, w2, b2, out, (hidden.stride(0), 0, hidden.stride(1)),
            (w2.stride(1), w2.stride(0)), (0, D, P * D, 1), P, N, H, c_split=D, compute_dtype=cd, arch=arch)
    return out, hidden


def backward(dout, hidden, embedding, w1, w2, b1, b2, num_layers, num_kv_heads, head_dim):
    """Gradients (d embedding, d w1, d b1, d w2, d b2), each in its parameter's dtype."""
    P, T = embedding.shape
    H, N = w1.shape[0], w2.shape[0]
    D = head_dim
    cd = hidden.dtype
    arch = arch_of(embedding.device)
    dy = dout.to(cd).contiguous()  # [L, 2, Hkv, P, D]: (j, p, d) strides (P * D, D, 1)
    dy_strides = (D, P * D, 1)
    dev = embedding.device
    dw2 = torch.empty(w2.shape, dtype=w2.dtype, device=dev)
    db2 = torch.empty(b2.shape, dtype=b2.dtype, device=dev)
    dw1 = torch.empty(w1.shape, dtype=w1.dtype, device=dev)
    db1 = torch.empty(b1.shape, dtype=b1.dtype, device=dev)
    demb = torch.empty(embedding.shape, dtype=embedding.dtype, device=dev)
    dz = torch.empty((P, H), dtype=torch.float32, device=dev)
    with _device_ctx(embedding):
        # dW2 = dY^T @ H, db2 = sum_p dY.
        _wgrad("bwd_dw2", dy, hidden, dw2, db2, dy_strides, hidden.stride(), P, N, H, g_split=D,
               compute_dtype=cd, arch=arch)
        # dH = dY @ W2 in fp32 partials over ranges of N.
        cfg = tile_config("bwd_dh", cd, arch)
        tiles = triton.cdiv(P, cfg.block_m) * triton.cdiv(H, cfg.block_n)
        splits, per_split = _splits(tiles, N, cfg.block_k, dev)
        part = torch.empty((splits, P, H), dtype=torch.float32, device=dev)
        _mm("bwd_dh", dy, w2, None, part, dy_strides, w2.stride(), (P * H, H, 0, 1), P, H, N, a_split=D,
            splits=splits, k_per_split=per_split, compute_dtype=cd, arch=arch)
        # dZ = dH * (1 - H^2).
        cfg = tile_config("bwd_dz", cd, arch)
        kern._reparam_tanh_grad_kernel[(triton.cdiv(P, cfg.block_m), triton.cdiv(H, cfg.block_n))](
            part, hidden.contiguous(), dz, P * H, P, H, splits,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        # dW1 = dZ^T @ E, db1 = sum_p dZ.
        _wgrad("bwd_dw1", dz, embedding, dw1, db1, (H, 0, 1), embedding.stride(), P, H, T, compute_dtype=cd,
               arch=arch)
        # dE = dZ @ W1: B[k=h, n=t] = W1[h, t].
        _mm("bwd_demb", dz, w1, None, demb, (H, 0, 1), w1.stride(), (0, demb.stride(0), 0, demb.stride(1)),
            P, T, H, compute_dtype=cd, arch=arch)
    return demb, dw1, db1, dw2, db2


def compile_spec(role: str, param_dtype: torch.dtype, compute_dtype: torch.dtype):
    """How a GPU launch of ``role`` specialises its kernel, for the static report: (kernel name, element type
    of each pointer, constexpr flags, names of the integer arguments that are 1 in a launch with contiguous
    parameters, which Triton turns into constants). Tile sizes come from :func:`tile_config`."""
    pd, cd = SHORT[param_dtype], SHORT[compute_dtype]
    mm_flags = {"A_LAYOUT": False, "C_LAYOUT": False, "HAS_BIAS": False, "TANH": False}
    if role == "fwd_hidden":
        return ("_reparam_mm_kernel", {"A": pd, "B": pd, "BIAS": pd, "C": cd},
                mm_flags | {"HAS_BIAS": True, "TANH": True},
                {"stride_ak", "stride_bk", "stride_cn", "A_SPLIT", "C_SPLIT"})
    if role == "fwd_project":
        return ("_reparam_mm_kernel", {"A": cd, "B": pd, "BIAS": pd, "C": cd},
                mm_flags | {"HAS_BIAS": True, "C_LAYOUT": True}, {"stride_ak", "stride_bk", "stride_cn", "A_SPLIT"})
    if role == "bwd_dh":
        return ("_reparam_mm_kernel", {"A": cd, "B": pd, "BIAS": "fp32", "C": "fp32"},
                mm_flags | {"A_LAYOUT": True}, {"stride_ak", "stride_bn", "stride_cn", "C_SPLIT"})
    if role == "bwd_demb":
        return ("_reparam_mm_kernel", {"A": "fp32", "B": pd, "BIAS": pd, "C": pd}, mm_flags,
                {"stride_ak", "stride_bn", "stride_cn", "A_SPLIT", "C_SPLIT"})
    if role == "bwd_dw2":
        return ("_reparam_wgrad_kernel", {"G": cd, "X": cd, "DW": pd, "DB": pd},
                {"G_LAYOUT": True, "HAS_BIAS": True}, {"stride_gn", "stride_xk", "stride_wk"})
    if role == "bwd_dw1":
        return ("_reparam_wgrad_kernel", {"G": "fp32", "X": pd, "DW": pd, "DB": pd},
                {"G_LAYOUT": False, "HAS_BIAS": True}, {"stride_gn", "stride_xk", "stride_wk", "G_SPLIT"})
    if role == "bwd_dz":
        return "_reparam_tanh_grad_kernel", {"PART": "fp32", "H": cd, "DZ": "fp32"}, {}, set()
    raise ValueError(f"unknown role {role!r}")


def tile_constexprs(role: str, compute_dtype: torch.dtype, cfg: TileConfig) -> dict:
    """The tile and dtype constexprs a launch of ``role`` passes (on a GPU, not the interpreter)."""
    if role == "bwd_dz":
        return {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
    dtypes = {"COMPUTE": TL_DTYPES[compute_dtype], "DOT": TL_DTYPES[compute_dtype],
              "PRECISION": precision(compute_dtype)}
    if role in ("bwd_dw2", "bwd_dw1"):
        return {"BLOCK_N": cfg.block_m, "BLOCK_K": cfg.block_n, "BLOCK_M": cfg.block_k} | dtypes
    return {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k} | dtypes

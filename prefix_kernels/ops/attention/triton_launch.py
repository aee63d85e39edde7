"""What the tiled launcher (``triton_impl``) and the decode launcher (``triton_decode``) share: the head-dim limits,
the head-dim tile, the padding bounds (memoised per forward), the prefix as a bank, the common constexprs. A leaf
of the two, so neither imports the other's module to reach them."""

from __future__ import annotations

import torch

from ..memo import TensorMemo
from ..triton_utils import is_interpreting, next_power_of_2, precision

LOG2E = 1.4426950408889634

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256
MAX_HEAD_DIM_FP32 = 128  # fp32 (3xTF32) at D = 256 spills registers at every tile size: see kernel_report
# On a GPU, fp32 above head dim 64 spills at every tile down to 16 x 16 in the dK/dV and dQ kernels with Triton 3.6
# and 3.8 (kernel_report); the interpreter, which has no registers, still serves it up to MAX_HEAD_DIM_FP32.
MAX_HEAD_DIM_FP32_GPU = 64
ARCHS = (80, 90)


def block_d(head_dim: int) -> int:
    """Head dim padded to the power of two the kernels tile with."""
    return max(MIN_HEAD_DIM, next_power_of_2(head_dim))


def _upcast(dtype: torch.dtype) -> bool:
    return is_interpreting() and dtype == torch.bfloat16


_bounds_memo = TensorMemo()


def _padding_bounds(key_padding_mask: torch.Tensor | None, len_k: int):
    """Per-row [first kept key, last kept key + 1) as int32 [B], so the kernels skip padded tiles.

    Returns (mask as uint8 view, lo, hi), or dummies when there is no mask.
    """
    if key_padding_mask is None:
        return None, None, None
    bounds = _bounds_memo.get("padding_bounds", key_padding_mask, len_k)
    if bounds is None:  # once per forward: every layer gets the same mask (about ten small launches)
        keep = key_padding_mask.to(torch.int32)
        any_kept = keep.amax(dim=1) > 0
        first = torch.argmax(keep, dim=1)
        last = len_k - torch.argmax(keep.flip(1), dim=1)
        lo = torch.where(any_kept, first, torch.full_like(first, len_k)).to(torch.int32)
        hi = torch.where(any_kept, last, torch.zeros_like(last)).to(torch.int32)
        bounds = (lo, hi)
        _bounds_memo.put("padding_bounds", key_padding_mask, bounds, len_k)
    lo, hi = bounds
    mask_u8 = key_padding_mask.view(torch.uint8) if key_padding_mask.is_contiguous() else key_padding_mask.to(
        torch.uint8
    )
    return mask_u8, lo, hi


def _as_bank(prefix: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """The prefix as a bank [N, Hkv, P, D] (a single prefix is a bank of one; P = 0 passes a dummy)."""
    if prefix is None:
        return dummy
    return prefix if prefix.dim() == 4 else prefix.unsqueeze(0)


def _common_constexprs(dtype: torch.dtype) -> dict:
    return {"UPCAST": _upcast(dtype), "USE_LIBDEVICE": not is_interpreting(), "PRECISION": precision(dtype)}

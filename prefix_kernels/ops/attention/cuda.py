"""The cuda backend: binds the CUDA C++ kernels of csrc/ (``torch.ops.prefix_kernels.cuda_fwd`` and
``cuda_bwd``, registered when ``prefix_kernels._C`` is imported) to the backend interface that the
custom ops of function.py dispatch to.

The kernels run fp16/bf16 mma.sync tensor-core products on sm_80+ for head dims that are multiples of
8 up to 128 (each runs on the smallest compiled tile of 32, 64, 96 or 128 columns). Forward and the
dQ pass walk the prefix tiles, then the input tiles, as one online softmax; the prefix gradient is
reduced over batch rows and query heads in-kernel into a few fp32 partials added in a fixed order, so
every gradient is deterministic run to run on a given GPU.
"""

from __future__ import annotations

import torch

from ... import _ext
from .features import FEATURES

DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128  # csrc/kernels/plan.h kMaxHeadDim (tests/build checks the two agree)
HEAD_DIM_MULTIPLE = 8  # rows are moved as 16-byte vectors
SUPPORTED_FEATURES = frozenset()  # names of features.FEATURES the kernels implement


def _ops():
    if _ext.load() is None:
        raise RuntimeError(f"prefix_kernels._C is not available: {_ext.error()}")
    return torch.ops.prefix_kernels


def active_features(features) -> list[str]:
    """Names of the optional features switched on in a backend call's ``features`` (None: none); any object
    with some of the record's attributes will do. The kernels implement none of them yet: the dispatcher
    declines such inputs with that reason, and these functions refuse them."""
    if features is None:
        return []
    return [f.name for f in FEATURES if f.name not in SUPPORTED_FEATURES
            and any(o.is_on(getattr(features, o.name, o.off)) for o in f.options)]


def _no_features(features) -> None:
    active = active_features(features)
    if active:
        raise NotImplementedError(f"the cuda backend does not support the optional features {active} yet")


def _single(prefix):
    """A bank of one prefix [1, Hkv, P, D] without an index is that prefix [Hkv, P, D] (a view); larger
    banks are declined by the dispatcher before they get here."""
    if prefix is not None and prefix.dim() == 4:
        if prefix.shape[0] != 1:
            raise NotImplementedError("the cuda backend does not support prefix banks of more than one prefix yet")
        return prefix[0]
    return prefix


def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, need_lse, features=None):
    """out [B, Hq, Lq, D] laid out like q; lse [B, Hq, Lq] fp32, or [B, Hq, 0] if not need_lse."""
    _no_features(features)
    prefix_k, prefix_v = _single(prefix_k), _single(prefix_v)
    return _ops().cuda_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, need_lse)


def backward(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, features=None):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v); the prefix ones are None without a prefix."""
    _no_features(features)
    bank = prefix_k is not None and prefix_k.dim() == 4
    prefix_k, prefix_v = _single(prefix_k), _single(prefix_v)
    dq, dk, dv, dpk, dpv = _ops().cuda_bwd(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse,
                                           causal, scale)
    if prefix_k is None:
        return dq, dk, dv, None, None
    if bank:
        dpk, dpv = dpk.unsqueeze(0), dpv.unsqueeze(0)
    return dq, dk, dv, dpk, dpv

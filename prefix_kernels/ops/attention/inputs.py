"""Validation of prefix-attention inputs.

Every public entry point funnels through :func:`check_inputs`, so that a bad call fails the same way
whichever backend would have served it: a ``TypeError`` for a wrong type or dtype, a ``ValueError``
for a wrong shape, device or value, each naming the argument at fault.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..memo import TensorMemo, capturing
from .features import NO_FEATURES, CheckContext, Features
from .features import check as check_features

__all__ = ["NO_FEATURES", "AttentionSpec", "Features", "TensorMemo", "check_inputs"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionSpec:
    """The sizes and flags of one validated prefix-attention call (tensors are not kept)."""

    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    prefix_len: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    causal: bool
    has_padding_mask: bool
    softmax_scale: float
    prefix_count: int = 0  # N: prefixes in the bank (1 for a single shared prefix, 0 without)
    features: tuple[str, ...] = ()  # the optional features in use (names of features.FEATURES)

    @property
    def group(self) -> int:
        """Query heads per kv head (1 for MHA, heads_q for MQA)."""
        return self.heads_q // self.heads_kv


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _require_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


_checked = TensorMemo()


def _check_values(name: str, t: torch.Tensor, lo: int, hi: int, what: str) -> None:
    if torch.compiler.is_compiling() or t.numel() == 0 or capturing(t):
        return  # a traced or captured graph cannot read values back; eager calls check them
    if _checked.get(name, t, (lo, hi)):
        return
    t_min, t_max = int(t.min()), int(t.max())
    if t_min < lo or t_max > hi:
        raise ValueError(f"{name} values must be in [{lo}, {hi}] ({what}), got min {t_min}, max {t_max}")
    _checked.put(name, t, True, (lo, hi))


# Calls already checked, by what their checks read: the tensors' sizes, dtypes, devices and strides' unit-ness
# aside, the scalars' values. A call whose key is here passes every check the first one passed (the checks read
# nothing else), so only its Features are made again, from its own tensors.
_passed: dict = {}
_PASSED_LIMIT = 256
# Tensor options whose checks read nothing but their type, dtype, shape and device (no values).
_KEYABLE_TENSORS = frozenset({"alibi_slopes", "alibi_offsets"})
_SCALARS = (bool, int, float, type(None))


def _signature(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, softmax_scale, options):
    """The key of :data:`_passed` for a call, or None when the call must be checked in full (a traced call, a
    tensor subclass, a selection whose values are range-checked, an option of another kind)."""
    if torch.compiler.is_compiling():
        return None
    parts = [causal.__class__, causal, softmax_scale.__class__, softmax_scale]
    for t in (q, k, v, prefix_k, prefix_v, key_padding_mask):
        if t is None:
            parts.append(None)
        elif type(t) is torch.Tensor:
            parts.append((t.shape, t.dtype, t.device))
        else:
            return None
    for name, value in options.items():
        if type(value) is torch.Tensor:
            if name not in _KEYABLE_TENSORS:
                return None
            parts.append((name, value.shape, value.dtype, value.device))
        elif value is None or type(value) in _SCALARS:
            parts.append((name, value.__class__, value))
        else:
            return None
    return tuple(parts)


def check_inputs(
    q,
    k,
    v,
    prefix_k=None,
    prefix_v=None,
    *,
    causal=False,
    key_padding_mask=None,
    softmax_scale=None,
    **options,
) -> tuple[AttentionSpec, Features]:
    """Check a prefix-attention call (see :func:`_check_inputs`), once per kind of call: a call like one that
    passed (same sizes, dtypes, devices, flags and scalar options) is not checked again."""
    key = _signature(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, softmax_scale, options)
    hit = None if key is None else _passed.get(key)
    if hit is not None:
        spec, scalars, plain = hit  # the scalar options as their checks normalised them; tensors pass through
        if plain:  # every option off (None, or its off value), as in the first call of this key
            return spec, NO_FEATURES
        return spec, Features(**{n: scalars.get(n, value) for n, value in options.items()})
    spec, features = _check_inputs(q, k, v, prefix_k, prefix_v, causal=causal, key_padding_mask=key_padding_mask,
                                   softmax_scale=softmax_scale, **options)
    if key is not None:
        if len(_passed) >= _PASSED_LIMIT:
            _passed.clear()
        # The key holds each option's value or, for a tensor, that it is one: a hit whose first call had every
        # option off has them all off too, and shares NO_FEATURES (which the backends recognise by identity).
        plain = not features.active and all(type(value) is not torch.Tensor for value in options.values())
        _passed[key] = (spec, {n: getattr(features, n) for n, value in options.items()
                               if type(value) is not torch.Tensor}, plain)
        if plain:
            return spec, NO_FEATURES
    return spec, features


def _check_inputs(
    q,
    k,
    v,
    prefix_k=None,
    prefix_v=None,
    *,
    causal=False,
    key_padding_mask=None,
    softmax_scale=None,
    **options,
) -> tuple[AttentionSpec, Features]:
    """Check a prefix-attention call against the contract; return its :class:`AttentionSpec` and its
    :class:`~.features.Features` (the optional inputs, each checked by its entry of the feature record).

    Shapes: q ``[B, Hq, Lq, D]``; k, v ``[B, Hkv, Lk, D]``; prefix_k, prefix_v ``[Hkv, P, D]``;
    key_padding_mask ``[B, Lk]`` bool (True = attend). Any strides are accepted. A prefix bank
    ``[N, Hkv, P, D]`` needs prefix_index ``[B]`` int in [-1, N) (-1: no prefix for that row);
    prefix_lengths ``[N]`` int in [0, P] gives each prefix's length (the tail columns are masked).
    ``options``: the optional features, by their names in the record of ``features.py``, whose entries say
    what each accepts; an unknown name is a TypeError.
    """
    q = _require_tensor("q", q)
    k = _require_tensor("k", k)
    v = _require_tensor("v", v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {_shape(t)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype {t.dtype} differs from q.dtype {q.dtype}; cast them to one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")

    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch size mismatch: q has {B} rows, k has {Bk} (q {_shape(q)}, k {_shape(k)})")
    if Dk != D:
        raise ValueError(f"head_dim mismatch: q has {D}, k has {Dk} (q {_shape(q)}, k {_shape(k)})")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {_shape(k)}, got {_shape(v)}")
    if min(B, Hq, Lq, D, Hkv, Lk) < 1:
        raise ValueError(
            f"empty input: q {_shape(q)}, k {_shape(k)}; batch, heads, lengths and head_dim must be >= 1"
        )
    if Hq % Hkv != 0:
        raise ValueError(
            f"q has {Hq} heads, not a multiple of the {Hkv} kv heads of k and v (GQA needs Hq % Hkv == 0)"
        )

    if (prefix_k is None) != (prefix_v is None):
        given, missing = ("prefix_k", "prefix_v") if prefix_v is None else ("prefix_v", "prefix_k")
        raise ValueError(f"{given} was given without {missing}; pass both or neither")
    P = 0
    n_prefixes = 0
    if prefix_k is not None:
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            _require_tensor(name, t)
            if t.dim() not in (3, 4):
                raise ValueError(f"{name} must be 3-D [kv_heads, P, head_dim], or a 4-D bank "
                                 f"[N, kv_heads, P, head_dim], got shape {_shape(t)}")
            if t.dtype != q.dtype:
                raise TypeError(
                    f"{name}.dtype {t.dtype} differs from q.dtype {q.dtype}; cast the prefix to the model dtype"
                )
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
            if t.shape[-3] != Hkv or t.shape[-1] != D:
                raise ValueError(
                    f"{name} must be [..., kv_heads={Hkv}, P, head_dim={D}] to match k, got shape {_shape(t)}"
                )
        if prefix_v.shape != prefix_k.shape:
            raise ValueError(f"prefix_v must have the shape of prefix_k {_shape(prefix_k)}, got {_shape(prefix_v)}")
        P = prefix_k.shape[-2]
        n_prefixes = prefix_k.shape[0] if prefix_k.dim() == 4 else 1
        if n_prefixes < 1:
            raise ValueError(f"the prefix bank is empty: prefix_k has shape {_shape(prefix_k)}")
    if prefix_k is not None and prefix_k.dim() == 4 and options.get("prefix_index") is None:
        raise ValueError("a prefix bank [N, kv_heads, P, head_dim] needs prefix_index [batch] choosing each row's "
                         "prefix (-1 for none)")

    if key_padding_mask is not None:
        _require_tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask must be a bool tensor (True = attend), got {key_padding_mask.dtype}; "
                "use mask.bool() on a 0/1 attention mask"
            )
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(
                f"key_padding_mask must have shape (batch={B}, Lk={Lk}), got {_shape(key_padding_mask)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")

    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")

    if softmax_scale is None:
        scale = D**-0.5
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a Python float or None, got {type(softmax_scale).__name__}")
        scale = float(softmax_scale)
        if not math.isfinite(scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")

    features = NO_FEATURES
    if options:
        features = check_features(CheckContext(batch=B, heads_q=Hq, prefix_len=P, len_q=Lq, len_k=Lk, dtype=q.dtype,
                                               n_prefixes=n_prefixes,
                                               device=q.device, causal=causal, has_prefix=prefix_k is not None,
                                               given=options, check_values=_check_values))
    return AttentionSpec(
        batch=B,
        heads_q=Hq,
        heads_kv=Hkv,
        len_q=Lq,
        len_k=Lk,
        prefix_len=P,
        head_dim=D,
        dtype=q.dtype,
        device=q.device,
        causal=causal,
        has_padding_mask=key_padding_mask is not None,
        softmax_scale=scale,
        prefix_count=n_prefixes,
        features=features.active,
    ), features


def plain_eager(*tensors) -> bool:
    """Whether this call runs in plain eager mode: not under torch.compile or export, no dispatch mode
    (FakeTensorMode, make_fx's proxy mode, ...) active, and plain tensors (no subclass or functorch wrapper).
    Anything else goes through the custom op, which every tracer understands."""
    if torch.compiler.is_compiling():
        return False
    stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
    if stack_len is None or stack_len() > 0:
        return False
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(t)):
            return False
    return True

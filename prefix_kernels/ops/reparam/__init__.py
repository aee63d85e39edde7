"""The reparameterization MLP of prefix tuning / P-Tuning v2, computed once per step into the attention
kernels' prefix layout."""

from __future__ import annotations

import torch

from . import backends
from .inputs import PEFT_NAMES, ReparamSpec, check_config, check_params
from .reference import project_prefix_ref, to_prefix_layout

__all__ = ["ReparamSpec", "check_config", "check_params", "project_prefix", "project_prefix_ref", "select_backend",
           "to_prefix_layout"]


def select_backend(embedding, w1, b1, w2, b2, *, num_layers, num_kv_heads, head_dim, dtype=None,
                   backend="auto") -> str:
    """The name of the backend that ``project_prefix`` would use for these arguments."""
    spec = check_params(embedding, w1, b1, w2, b2, num_layers=num_layers, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, dtype=dtype)
    return backends.select(spec, backend).name


def project_prefix(
    embedding: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    names: tuple[str, ...] = PEFT_NAMES,
) -> torch.Tensor:
    """PEFT's prefix MLP, once, straight into the attention kernels' layout.

    ``prefix[l, kv, h, p, :] = (tanh(E @ W1^T + b1) @ W2^T + b2)[p, ((l * 2 + kv) * Hkv + h) * D : ... + D]``
    for tokens p = 0..P-1, which is what PEFT's ``get_prompt`` feeds layer l as keys (kv = 0) and values
    (kv = 1) for every batch row.

    Args:
        embedding: ``[P, T]``, T = num_kv_heads * head_dim (the virtual-token table).
        w1, b1: ``[H, T]``, ``[H]`` (``transform.0``).  w2, b2: ``[2 * L * T, H]``, ``[2 * L * T]``
            (``transform.2``). One floating dtype and device for all five; any strides.
        dtype: compute and output dtype. Default: the autocast dtype under autocast (not for float64
            parameters), else the parameters' dtype. fp32 parameters under bf16/fp16 autocast are rounded
            in the kernel's registers; no half-precision copy of the weights is made.
        backend: "auto" (triton > torch; ``PREFIX_KERNELS_REPARAM_BACKEND`` or ``PREFIX_KERNELS_BACKEND``
            override), "triton" or "torch". A named backend that cannot serve raises with every reason.
        names: how errors name the five parameters (default: PEFT's state-dict keys).

    Returns:
        ``[L, 2, Hkv, P, D]`` contiguous, in the compute dtype; ``prefix[l]`` unpacks into the (prefix_k,
        prefix_v) views of layer l. Differentiable with respect to all five parameters.
    """
    spec = check_params(embedding, w1, b1, w2, b2, num_layers=num_layers, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, dtype=dtype, names=names)
    chosen = backends.select(spec, backend).name
    from .function import reparam_fwd

    out, _ = reparam_fwd(embedding, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, spec.compute_dtype, chosen)
    return out

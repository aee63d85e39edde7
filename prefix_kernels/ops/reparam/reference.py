"""The eager reference of the reparameterization MLP: PEFT's math, then PEFT's reshape, in plain torch.

PEFT's prefix encoder maps the virtual tokens 0..P-1 through

    Embedding(P, T) -> Linear(T, H) -> Tanh -> Linear(H, 2 * L * T)           (T = Hkv * D)

and ``PeftModel.get_prompt`` reads each token's 2 * L * T features as ``[L * 2, Hkv, D]``, i.e. feature
``((layer * 2 + kv) * Hkv + head) * D + d``, kv = 0 for keys and 1 for values. It then permutes to
``[L * 2, B, Hkv, P, D]`` and splits it into layers. Without the batch axis that is exactly the
``[L, 2, Hkv, P, D]`` layout the attention kernels take, which this module returns.

This is the truth the backends are tested against (alongside PEFT itself), written for clarity: it is
differentiable with ordinary autograd and copies freely.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_prefix_layout(flat: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """``[P, 2 * L * Hkv * D]`` (PEFT's per-token features) -> ``[L, 2, Hkv, P, D]``, as a view (no copy)."""
    P = flat.shape[0]
    return flat.view(P, num_layers, 2, num_kv_heads, head_dim).permute(1, 2, 3, 0, 4)


def project_prefix_ref(
    embedding: torch.Tensor,
    w1: torch.Tensor | None,
    b1: torch.Tensor | None,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The prefix ``[L, 2, Hkv, P, D]`` (contiguous), computed in ``dtype`` (default: embedding's).

    With ``w1 = b1 = w2 = b2 = None`` this is the encoder without projection: the embedding
    ``[P, 2 * L * Hkv * D]`` itself is the prefix. Otherwise embedding ``[P, T]``, w1 ``[H, T]``,
    b1 ``[H]``, w2 ``[2 * L * T, H]``, b2 ``[2 * L * T]``, as in ``nn.Linear``.
    """
    dtype = dtype or embedding.dtype
    x = embedding.to(dtype)  # the gather of tokens 0..P-1 is the whole table
    if w1 is not None:
        hidden = torch.tanh(F.linear(x, w1.to(dtype), b1.to(dtype)))
        x = F.linear(hidden, w2.to(dtype), b2.to(dtype))
    return to_prefix_layout(x, num_layers, num_kv_heads, head_dim).contiguous()

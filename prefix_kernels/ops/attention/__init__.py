"""Prefix attention: one softmax over a learned prefix K/V and the input K/V, without concatenating them."""

from __future__ import annotations

import torch

from ... import backends
from .inputs import AttentionSpec, check_inputs
from .reference import prefix_attention_ref

__all__ = ["AttentionSpec", "check_inputs", "prefix_attention", "prefix_attention_ref", "select_backend"]


def select_backend(q, k, v, prefix_k=None, prefix_v=None, *, causal=False, key_padding_mask=None,
                   softmax_scale=None, backend="auto") -> str:
    """The name of the backend that ``prefix_attention`` would use for these arguments."""
    spec = check_inputs(q, k, v, prefix_k, prefix_v, causal=causal, key_padding_mask=key_padding_mask,
                        softmax_scale=softmax_scale)
    return backends.select(spec, backend).name


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention over ``[prefix ; input]`` keys as one softmax, without concatenating them.

    For batch row b, query head h and its kv head g = h // (Hq // Hkv)::

        S = softmax_scale * Q[b, h] @ [Pk[g] ; K[b, g]]^T       (P + Lk columns)
        O = softmax(S) @ [Pv[g] ; V[b, g]]                      LSE = logsumexp(S), fp32

    Args:
        q: ``[B, Hq, Lq, D]``. Any strides (HF passes transposed views of ``[B, L, H, D]``).
        k, v: ``[B, Hkv, Lk, D]``, Hq a multiple of Hkv (MHA, GQA, MQA). K/V are never repeated.
        prefix_k, prefix_v: ``[Hkv, P, D]``, shared by the whole batch, or both None (P = 0).
            Every query sees every prefix column. Their gradients are summed over the batch rows and
            the query heads of each group inside the kernels.
        causal: input column j is visible to query i iff ``j <= i + (Lk - Lq)`` (bottom-right
            alignment: a decode step with Lq = 1 sees the whole cache). The prefix stays visible.
        key_padding_mask: ``[B, Lk]`` bool, True = attend. Applies to the input keys only.
        softmax_scale: defaults to ``D ** -0.5``; must be finite.
        return_lse: also return ``lse [B, Hq, Lq]`` (float32, natural log); it is differentiable.
        backend: "auto" (cuda > triton > torch; ``PREFIX_KERNELS_BACKEND`` overrides), or a name. A
            named backend that cannot serve the input raises with every reason.

    Returns:
        ``out [B, Hq, Lq, D]`` in q's dtype and memory layout, or ``(out, lse)`` with return_lse.

    A row that sees no key at all (P = 0 and every input key masked, or causal with Lq > Lk and no
    prefix) gets ``out = 0`` and ``lse = -inf``, and zero gradients: never NaN.
    """
    spec = check_inputs(q, k, v, prefix_k, prefix_v, causal=causal, key_padding_mask=key_padding_mask,
                        softmax_scale=softmax_scale)
    chosen = backends.select(spec, backend)
    grads_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, prefix_k, prefix_v)
    )
    need_lse = bool(return_lse) or (grads_wanted and chosen.lse_for_backward)
    if prefix_k is not None and prefix_k.shape[1] == 0:
        prefix_k = prefix_v = None
    from .function import attention_fwd

    out, lse = attention_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, spec.softmax_scale,
                             chosen.name, need_lse)
    return (out, lse) if return_lse else out

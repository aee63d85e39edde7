"""Prefix attention: one softmax over a learned prefix K/V and the input K/V, without concatenating them."""

from __future__ import annotations

import torch

from . import backends
from .features import NO_FEATURES, Features, draw_dropout_seed, with_options
from .inputs import AttentionSpec, check_inputs
from .inputs import plain_eager as _plain_eager
from .plan import PrefixAttentionPlan, plan_prefix_attention
from .reference import prefix_attention_ref

__all__ = ["AttentionSpec", "Features", "PrefixAttentionPlan", "check_inputs", "draw_dropout_seed", "dropout_keep_mask",
           "plan_prefix_attention", "prefix_attention", "prefix_attention_ref", "select_backend"]


def select_backend(q, k, v, prefix_k=None, prefix_v=None, *, backend="auto", **options) -> str:
    """The name of the backend that ``prefix_attention`` would use for these arguments (same keywords)."""
    spec, _ = check_inputs(q, k, v, prefix_k, prefix_v, **options)
    return backends.select(spec, backend).name


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads_q: int, len_q: int, n_cols: int, dropout_p: float,
                      backend: str) -> torch.Tensor:
    """Debug aid: the keep mask ``[B, Hq, Lq, P + Lk]`` bool that ``backend`` applies for ``seed``."""
    return backends.get(backend).impl().dropout_keep_mask(seed, batch, heads_q, len_q, n_cols, dropout_p,
                                                          seed.device)


@with_options
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
    **options,
):
    """Attention over ``[prefix ; input]`` keys as one softmax, without concatenating them.

    For batch row b, query head h and its kv head g = h // (Hq // Hkv)::

        S = softmax_scale * Q[b, h] @ [Pk[g] ; K[b, g]]^T       (P + Lk columns)
        O = softmax(S) @ [Pv[g] ; V[b, g]]                      LSE = logsumexp(S), fp32

    Args:
        q: ``[B, Hq, Lq, D]``. Any strides (HF passes transposed views of ``[B, L, H, D]``).
        k, v: ``[B, Hkv, Lk, D]``, Hq a multiple of Hkv (MHA, GQA, MQA). K/V are never repeated.
        prefix_k, prefix_v: ``[Hkv, P, D]``, shared by the whole batch, or a bank ``[N, Hkv, P, D]`` with
            ``prefix_index``, or both None (P = 0). Every query sees every prefix column of its row.
            Their gradients are summed over the batch rows (and the query heads of each group) that use
            them, inside the kernels, deterministically.
        prefix_index: ``[B]`` int: the prefix of the bank each row uses, -1 for none (that row attends to
            its input alone). Optional with a single prefix (then 0 or -1).
        prefix_lengths: ``[N]`` int in [0, P]: each prefix's length, for prefixes of different lengths
            padded into one bank (columns past the length are masked).
        causal: input column j is visible to query i iff ``j <= i + (Lk - Lq)`` (bottom-right
            alignment: a decode step with Lq = 1 sees the whole cache). The prefix stays visible.
        key_padding_mask: ``[B, Lk]`` bool, True = attend. Applies to the input keys only.
        softmax_scale: defaults to ``D ** -0.5``; must be finite.
        alibi_slopes: ``[Hq]`` float32. Adds ``slope[h] * position`` to the logit of each key, with prefix
            column p at position p and input key j at ``P + j + alibi_offsets[b]`` (HF Bloom with a
            prefix of P ones prepended to its mask, where a left-padded row has offset = -(its pads)).
        alibi_offsets: ``[B]`` int32/int64; default 0 (positions 0 .. P + Lk - 1). With a bank, input key j
            of row b sits at ``P_b + j + offset`` where P_b is the row's prefix length.
        dropout_p: attention dropout on the probabilities (prefix columns included), in [0, 1). The keep
            mask comes from a counter-based RNG keyed by a seed drawn from torch's default generator of
            q's device, and is regenerated in the backward, never stored. Pass 0 in eval.
        sliding_window: W >= 1, needs causal: input key j is visible to query i iff
            ``i + (Lk - Lq) - W < j <= i + (Lk - Lq)``. The prefix stays visible to every query (it is
            not part of the sequence the window slides over).
        softcap: c > 0: logits become ``c * tanh(scale * q.k / c)`` (Gemma 2); ALiBi is added after.
        attn_bias: ``[B or 1, Hq or 1, Lq or 1, P + Lk or 1]`` fp32 (or q's dtype), no gradient: added to the
            logits after the softcap and ALiBi (T5's position bias); columns 0..P-1 are the prefix, -inf hides a key.
        return_lse: also return ``lse [B, Hq, Lq]`` (float32, natural log); it is differentiable.
        backend: "auto" (triton > cuda > torch; ``PREFIX_KERNELS_BACKEND`` overrides), or a name. A
            named backend that cannot serve the input raises with every reason. Until a GPU has measured
            both, "auto" prefers the Triton kernels, which serve every feature; the CUDA kernels serve when
            asked for by name.

    Returns:
        ``out [B, Hq, Lq, D]`` in q's dtype and memory layout, or ``(out, lse)`` with return_lse.

    A row that sees no key at all (P = 0 and every input key masked, or causal with Lq > Lk and no
    prefix, or attn_bias -inf at every key it could see) gets ``out = 0`` and ``lse = -inf``, and zero
    gradients: never NaN.

    Non-finite inputs, one rule on every backend: NaN and Inf in q, or in a key or value that a query can
    see, go through the arithmetic of the formula above: a NaN makes that query's output and LSE NaN (never
    a finite stand-in such as 0) and reaches every gradient it touches. Input keys masked by
    ``key_padding_mask`` are never read: NaN or Inf there changes no output, LSE or gradient. Keys hidden
    only by causality, the sliding window or the prefix selection come under no promise (a kernel may read
    them beside the visible keys of a tile).
    """
    spec, features = check_inputs(q, k, v, prefix_k, prefix_v, causal=causal, key_padding_mask=key_padding_mask,
                                  softmax_scale=softmax_scale, **options)
    chosen = backends.select(spec, backend)
    grads_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, prefix_k, prefix_v)
    )
    need_lse = bool(return_lse) or (grads_wanted and chosen.lse_for_backward)
    if prefix_k is not None and prefix_k.shape[-2] == 0:
        prefix_k = prefix_v = None
        features = features.without_prefix()
    if features is not NO_FEATURES:
        features = features.drawn(q.device)  # the dropout seed
    eager = _plain_eager(q, k, v, prefix_k, prefix_v)
    if grads_wanted and eager and not return_lse:
        # Eager training: a backend that runs its own autograd for this call (the torch backend on a CPU) skips
        # the custom op's dispatch, as inference does below.
        own = getattr(chosen.impl(), "autograd_forward", None)
        out = None if own is None else own(q, k, v, prefix_k, prefix_v, key_padding_mask, causal,
                                           spec.softmax_scale, features)
        if out is not None:
            return out
    if not grads_wanted and eager:
        # Inference in eager mode (a decode loop calls this once per layer per token): the backend directly.
        # The custom op's dispatch costs about 0.1 ms of Python per call, as much as a small decode step's
        # attention; it buys nothing here, since no autograd graph is built and nothing traces the call. A backend
        # with an output-only entry (``infer``) serves calls that want no LSE through it.
        impl = chosen.impl()
        infer = None if need_lse else getattr(impl, "infer", None)
        if infer is not None:
            return infer(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, spec.softmax_scale, features)
        out, lse = impl.forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, spec.softmax_scale, need_lse,
                                features)
    else:
        from .function import attention_fwd

        out, lse = attention_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, spec.softmax_scale,
                                 chosen.name, need_lse, *features.op_args())
    return (out, lse) if return_lse else out

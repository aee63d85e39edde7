"""torch.library registration of prefix attention: two custom ops, their fake (meta) implementations and
the autograd formula linking them.

``prefix_kernels::attention_fwd`` and ``prefix_kernels::attention_bwd`` take the backend's name as an
argument, so every backend goes through the same ops, the same autograd and the same fake
implementations; ``torch.compile(fullgraph=True)`` sees one opaque node per pass.

Layouts: out and dq take q's strides (``torch.empty_like``), dk/dv take k/v's; HF hands q over as a
transposed view of ``[B, L, H, D]``, so the output is already in the layout the model wants next.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import backends
from .inputs import Features


@torch.library.custom_op("prefix_kernels::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    key_padding_mask: Tensor | None,
    alibi_slopes: Tensor | None,
    alibi_offsets: Tensor | None,
    dropout_seed: Tensor | None,
    prefix_index: Tensor | None,
    prefix_lengths: Tensor | None,
    causal: bool,
    softmax_scale: float,
    dropout_p: float,
    sliding_window: int | None,
    softcap: float | None,
    backend: str,
    need_lse: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (out [B, Hq, Lq, D] like q, lse [B, Hq, Lq] fp32, or [B, Hq, 0] when not need_lse)."""
    impl = backends.get(backend).impl()
    features = Features(alibi_slopes, alibi_offsets, dropout_p, dropout_seed, sliding_window, softcap,
                        prefix_index, prefix_lengths)
    return impl.forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale, need_lse, features)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, prefix_k, prefix_v, key_padding_mask, alibi_slopes, alibi_offsets, dropout_seed,
                        prefix_index, prefix_lengths, causal, softmax_scale, dropout_p, sliding_window, softcap,
                        backend, need_lse):
    B, Hq, Lq, _ = q.shape
    lse = q.new_empty((B, Hq, Lq if need_lse else 0), dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("prefix_kernels::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    key_padding_mask: Tensor | None,
    alibi_slopes: Tensor | None,
    alibi_offsets: Tensor | None,
    dropout_seed: Tensor | None,
    prefix_index: Tensor | None,
    prefix_lengths: Tensor | None,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    softmax_scale: float,
    dropout_p: float,
    sliding_window: int | None,
    softcap: float | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dprefix_k, dprefix_v); the prefix gradients are empty [0] when P = 0."""
    impl = backends.get(backend).impl()
    features = Features(alibi_slopes, alibi_offsets, dropout_p, dropout_seed, sliding_window, softcap,
                        prefix_index, prefix_lengths)
    dq, dk, dv, dpk, dpv = impl.backward(
        dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, softmax_scale, features
    )
    if dpk is None:
        dpk, dpv = q.new_empty((0,)), q.new_empty((0,))
    return dq, dk, dv, dpk, dpv


@attention_bwd.register_fake
def _attention_bwd_fake(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, alibi_slopes, alibi_offsets,
                        dropout_seed, prefix_index, prefix_lengths, out, lse, causal, softmax_scale, dropout_p,
                        sliding_window, softcap, backend):
    if prefix_k is None:
        dpk, dpv = q.new_empty((0,)), q.new_empty((0,))
    else:
        dpk, dpv = torch.empty_like(prefix_k), torch.empty_like(prefix_v)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dpk, dpv


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, key_padding_mask, alibi_slopes, alibi_offsets, dropout_seed, prefix_index,
     prefix_lengths, causal, softmax_scale, dropout_p, sliding_window, softcap, backend, need_lse) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, alibi_slopes, alibi_offsets, dropout_seed,
                          prefix_index, prefix_lengths, out, lse)
    ctx.args = (causal, softmax_scale, dropout_p, sliding_window, softcap, backend)
    ctx.has_prefix = prefix_k is not None
    # An unused LSE then arrives as None rather than a tensor of zeros (no dLSE pass in the kernels).
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    if dout is None:  # only the LSE was used
        dout = torch.zeros_like(ctx.saved_tensors[-2])
    if dlse is not None and dlse.numel() == 0:
        dlse = None
    dq, dk, dv, dpk, dpv = attention_bwd(dout, dlse, *ctx.saved_tensors, *ctx.args)
    if not ctx.has_prefix:
        dpk = dpv = None
    return (dq, dk, dv, dpk, dpv) + (None,) * 13


attention_fwd.register_autograd(_backward, setup_context=_setup_context)

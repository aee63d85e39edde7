"""torch.library registration of the projection: two custom ops, their fake implementations and the
autograd formula linking them.

``prefix_kernels::reparam_fwd`` returns the prefix and the tanh output H (saved for the backward);
``prefix_kernels::reparam_bwd`` returns the five parameter gradients. Both take the backend's name, so
every backend goes through the same ops, autograd and fake implementations, and
``torch.compile(fullgraph=True)`` sees one opaque node per pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends


def _impl(backend: str):
    return backends.get(backend).impl()


@torch.library.custom_op("prefix_kernels::reparam_fwd", mutates_args=())
def reparam_fwd(
    embedding: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    compute_dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns (prefix [L, 2, Hkv, P, D] contiguous, hidden [P, H]), both in compute_dtype."""
    return _impl(backend).forward(embedding, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, compute_dtype)


@reparam_fwd.register_fake
def _reparam_fwd_fake(embedding, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, compute_dtype, backend):
    P = embedding.shape[0]
    out = embedding.new_empty((num_layers, 2, num_kv_heads, P, head_dim), dtype=compute_dtype)
    return out, embedding.new_empty((P, w1.shape[0]), dtype=compute_dtype)


@torch.library.custom_op("prefix_kernels::reparam_bwd", mutates_args=())
def reparam_bwd(
    dout: Tensor,
    hidden: Tensor,
    embedding: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor,
    b2: Tensor,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (d embedding, d w1, d b1, d w2, d b2), each in its parameter's dtype."""
    return _impl(backend).backward(dout, hidden, embedding, w1, w2, b1, b2, num_layers, num_kv_heads, head_dim)


@reparam_bwd.register_fake
def _reparam_bwd_fake(dout, hidden, embedding, w1, w2, b1, b2, num_layers, num_kv_heads, head_dim, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (embedding, w1, b1, w2, b2))


def _setup_context(ctx, inputs, output):
    embedding, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, _compute_dtype, backend = inputs
    _, hidden = output
    ctx.save_for_backward(embedding, w1, b1, w2, b2, hidden)
    ctx.sizes = (num_layers, num_kv_heads, head_dim)
    ctx.backend = backend


def _backward(ctx, dout, _dhidden):
    # H is an output only so that the backward can reuse it; nothing differentiates through it.
    embedding, w1, b1, w2, b2, hidden = ctx.saved_tensors
    grads = reparam_bwd(dout, hidden, embedding, w1, w2, b1, b2, *ctx.sizes, ctx.backend)
    grads = [g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[:5], strict=True)]
    return (*grads, None, None, None, None, None)


reparam_fwd.register_autograd(_backward, setup_context=_setup_context)

"""The torch backend of the projection: stock PyTorch ops, for float64, CPUs without the interpreter, and as
the universal fallback.

It runs the MLP in the compute dtype, as ``nn.Linear`` would (under autocast too), once per call, and
then copies the result into the ``[L, 2, Hkv, P, D]`` layout. The backward is the explicit chain rule
from the saved tanh output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import to_prefix_layout


def forward(embedding, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, compute_dtype):
    """Returns (prefix ``[L, 2, Hkv, P, D]`` contiguous, hidden = tanh(...) ``[P, H]``), both in compute_dtype."""
    cd = compute_dtype
    hidden = torch.tanh(F.linear(embedding.to(cd), w1.to(cd), b1.to(cd)))
    flat = F.linear(hidden, w2.to(cd), b2.to(cd))
    return to_prefix_layout(flat, num_layers, num_kv_heads, head_dim).contiguous(), hidden


def backward(dout, hidden, embedding, w1, w2, b1, b2, num_layers, num_kv_heads, head_dim):
    """Gradients (d embedding, d w1, d b1, d w2, d b2), each in its parameter's dtype."""
    cd = hidden.dtype
    P = hidden.shape[0]
    # [L, 2, Hkv, P, D] -> [P, 2 * L * Hkv * D], PEFT's feature order.
    dflat = dout.to(cd).permute(3, 0, 1, 2, 4).reshape(P, -1)
    dw2 = dflat.t() @ hidden
    db2 = dflat.sum(0)
    dz = torch.ops.aten.tanh_backward(dflat @ w2.to(cd), hidden)
    dw1 = dz.t() @ embedding.to(cd)
    db1 = dz.sum(0)
    demb = dz @ w1.to(cd)
    return demb.to(embedding.dtype), dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype), db2.to(b2.dtype)


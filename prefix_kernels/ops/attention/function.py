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

from . import backends
from .features import OPTIONS, SCHEMA, Features

# The optional inputs travel as the record's options, in its order, after the fixed arguments (a schema cannot
# take a dataclass): the schemas below are generated from the record, and Features.op_args / from_op_args pack
# and unpack them.
_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, Tensor? key_padding_mask, "
               f"bool causal, float softmax_scale, str backend, bool need_lse, {SCHEMA}) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, "
               "Tensor? key_padding_mask, Tensor out, Tensor lse, bool causal, float softmax_scale, str backend, "
               f"{SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_FWD_FIXED = 10  # arguments before the options
_TENSOR_OPTIONS = tuple(i for i, o in enumerate(OPTIONS) if o.is_tensor)


def _attention_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale, backend, need_lse,
                   *options):
    """Returns (out [B, Hq, Lq, D] like q, lse [B, Hq, Lq] fp32, or [B, Hq, 0] when not need_lse)."""
    impl = backends.get(backend).impl()
    return impl.forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale, need_lse,
                        Features.from_op_args(options))


attention_fwd = torch.library.custom_op("prefix_kernels::attention_fwd", _attention_fwd, mutates_args=(),
                                        schema=_FWD_SCHEMA)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale, backend, need_lse,
                        *options):
    B, Hq, Lq, _ = q.shape
    lse = q.new_empty((B, Hq, Lq if need_lse else 0), dtype=torch.float32)
    return torch.empty_like(q), lse


def _attention_bwd(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, softmax_scale,
                   backend, *options):
    """Returns (dq, dk, dv, dprefix_k, dprefix_v); the prefix gradients are empty [0] when P = 0."""
    impl = backends.get(backend).impl()
    dq, dk, dv, dpk, dpv = impl.backward(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal,
                                         softmax_scale, Features.from_op_args(options))
    if dpk is None:
        dpk, dpv = q.new_empty((0,)), q.new_empty((0,))
    return dq, dk, dv, dpk, dpv


attention_bwd = torch.library.custom_op("prefix_kernels::attention_bwd", _attention_bwd, mutates_args=(),
                                        schema=_BWD_SCHEMA)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, softmax_scale,
                        backend, *options):
    if prefix_k is None:
        dpk, dpv = q.new_empty((0,)), q.new_empty((0,))
    else:
        dpk, dpv = torch.empty_like(prefix_k), torch.empty_like(prefix_v)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dpk, dpv


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale, backend, _need_lse = inputs[:_FWD_FIXED]
    options = list(inputs[_FWD_FIXED:])
    out, lse = output
    # Tensors are saved through save_for_backward, the scalar options on ctx.
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse,
                          *(options[i] for i in _TENSOR_OPTIONS))
    for i in _TENSOR_OPTIONS:
        options[i] = None
    ctx.options = options
    ctx.args = (causal, softmax_scale, backend)
    ctx.has_prefix = prefix_k is not None
    # An unused LSE then arrives as None rather than a tensor of zeros (no dLSE pass in the kernels).
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, *saved = ctx.saved_tensors
    if dout is None:  # only the LSE was used
        dout = torch.zeros_like(out)
    if dlse is not None and dlse.numel() == 0:
        dlse = None
    options = list(ctx.options)
    for i, t in zip(_TENSOR_OPTIONS, saved, strict=True):
        options[i] = t
    dq, dk, dv, dpk, dpv = attention_bwd(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse,
                                         *ctx.args, *options)
    if not ctx.has_prefix:
        dpk = dpv = None
    return (dq, dk, dv, dpk, dpv) + (None,) * (_FWD_FIXED - 5 + len(OPTIONS))


attention_fwd.register_autograd(_backward, setup_context=_setup_context)

"""torch.library registration: fake implementations, opcheck, and torch.compile(fullgraph=True)."""

import pytest
import torch

import prefix_kernels  # noqa: F401  (registers the ops)
from prefix_kernels import prefix_attention
from prefix_kernels.ops.attention import function
from prefix_kernels.ops.attention.features import NO_FEATURES, Features
from prefix_kernels.testing import make_inputs


def test_ops_are_registered():
    assert hasattr(torch.ops.prefix_kernels, "attention_fwd")
    assert hasattr(torch.ops.prefix_kernels, "attention_bwd")


def _op_args(inputs, need_lse, features: bool):
    q = inputs["q"]
    B, Hq = q.shape[:2]
    on = Features(alibi_slopes=torch.linspace(0.1, 0.5, Hq),
                  alibi_offsets=torch.tensor([-1, 0] * (B // 2) + [0] * (B % 2), dtype=torch.int32),
                  dropout_seed=torch.tensor(1234, dtype=torch.int64), dropout_p=0.2, sliding_window=3, softcap=4.0)
    return (q, inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"], inputs["key_padding_mask"],
            True, 0.25, "torch", need_lse, *(on if features else NO_FEATURES).op_args())


@pytest.mark.parametrize("features", [False, True], ids=["plain", "features"])
@pytest.mark.parametrize("with_prefix", [True, False])
@pytest.mark.parametrize("need_lse", [True, False])
def test_opcheck_forward(with_prefix, need_lse, features):
    inputs = make_inputs(len_q=5, len_k=7, prefix_len=3 if with_prefix else 0, head_dim=16, padding="right")
    inputs["q"].requires_grad_()
    args = _op_args(inputs, need_lse, features)
    # The backward registration is exercised only when the LSE is kept (as it is whenever grads flow).
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    if not need_lse:
        tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(function.attention_fwd, args, test_utils=tests)


def test_fake_shapes_and_layouts():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 9, 8, 64).transpose(1, 2)  # [B, H, L, D] view of [B, L, H, D]
        k = torch.empty(2, 2, 11, 64)
        pk = torch.empty(2, 5, 64)
        out, lse = torch.ops.prefix_kernels.attention_fwd(q, k, k, pk, pk, None, False, 0.125, "torch", True,
                                                          *NO_FEATURES.op_args())
        assert out.shape == (2, 8, 9, 64) and out.stride() == q.stride()
        assert lse.shape == (2, 8, 9) and lse.dtype == torch.float32
        grads = torch.ops.prefix_kernels.attention_bwd(out, None, q, k, k, pk, pk, None, out, lse, False, 0.125,
                                                       "torch", *NO_FEATURES.op_args())
        assert [tuple(g.shape) for g in grads] == [(2, 8, 9, 64), (2, 2, 11, 64), (2, 2, 11, 64), (2, 5, 64),
                                                   (2, 5, 64)]


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    inputs = make_inputs(len_q=6, len_k=8, prefix_len=3, head_dim=16, padding="left")
    mask = inputs["key_padding_mask"]

    def layer(q, k, v, pk, pv):
        out = prefix_attention(q, k, v, pk, pv, causal=True, key_padding_mask=mask, backend="torch")
        return (out.float() ** 2).sum()

    leaves = [inputs[n].detach().requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    eager = layer(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, eager)
    for a, b in zip(got_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_with_features():
    """ALiBi, window, softcap and dropout (its seed a random op in the graph) trace without breaks, and
    the compiled function draws a fresh dropout mask per call like eager does."""
    torch._dynamo.reset()
    inputs = make_inputs(len_q=6, len_k=8, prefix_len=3, head_dim=16, padding="right")
    slopes = torch.linspace(0.1, 0.4, 4)

    def layer(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, causal=True, key_padding_mask=inputs["key_padding_mask"],
                                alibi_slopes=slopes, sliding_window=4, softcap=3.0, dropout_p=0.3, backend="torch")

    args = [inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    eager = layer(*args)
    torch.manual_seed(0)
    got = compiled(*args)
    torch.testing.assert_close(got, eager)
    assert not torch.equal(compiled(*args), got)  # a new seed each call


def test_compile_fullgraph_inductor_auto_backend():
    """The default backend="auto" path (selection and validation in Python) traces without breaks."""
    torch._dynamo.reset()
    inputs = make_inputs(len_q=4, len_k=5, prefix_len=2, head_dim=16)

    def layer(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv) * 2

    args = [inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(*args), layer(*args))


def test_constant_marker_matches_torch():
    """dispatch.assume_constant_result mirrors torch.compiler.assume_constant_result."""
    from prefix_kernels.ops import dispatch

    def probe():
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    flags = {k: v for k, v in vars(marked).items() if k.startswith("_dynamo")}
    assert flags == {"_dynamo_marked_constant": True}
    assert dispatch._select_name._dynamo_marked_constant is True


def test_package_import_is_light():
    """Importing the package loads neither torch._dynamo nor Triton (so TRITON_INTERPRET can be set later)."""
    import subprocess
    import sys

    code = "import sys, prefix_kernels; print('torch._dynamo' in sys.modules, 'triton.language' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]

"""torch.library registration of the projection: fake implementations, opcheck, torch.compile(fullgraph=True)."""

import pytest
import torch

from prefix_kernels import PrefixEncoder
from prefix_kernels.ops.reparam import function


def _args(backend="torch", dtype=torch.float32, compute=None, P=3, L=2, Hkv=2, D=16, H=8, grad=True):
    g = torch.Generator().manual_seed(0)
    T = Hkv * D
    shapes = [(P, T), (H, T), (H,), (2 * L * T, H), (2 * L * T,)]
    params = [torch.randn(s, generator=g).to(dtype).requires_grad_(grad) for s in shapes]
    return (*params, L, Hkv, D, compute or dtype, backend)


def test_ops_are_registered():
    assert hasattr(torch.ops.prefix_kernels, "reparam_fwd")
    assert hasattr(torch.ops.prefix_kernels, "reparam_bwd")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(function.reparam_fwd, _args(backend), test_utils=tests)


def test_opcheck_mixed_precision():
    torch.library.opcheck(function.reparam_fwd, _args("torch", compute=torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = _args(compute=torch.bfloat16, grad=False)
        out, hidden = torch.ops.prefix_kernels.reparam_fwd(*args)
        assert out.shape == (2, 2, 2, 3, 16) and out.dtype == torch.bfloat16 and out.is_contiguous()
        assert hidden.shape == (3, 8) and hidden.dtype == torch.bfloat16
        grads = torch.ops.prefix_kernels.reparam_bwd(out, hidden, args[0], args[1], args[3], args[2], args[4], 2, 2,
                                                     16, "torch")
        assert [tuple(g.shape) for g in grads] == [(3, 32), (8, 32), (8,), (128, 8), (128,)]
        assert all(g.dtype == torch.float32 for g in grads)


def test_compile_fullgraph_training_step():
    torch._dynamo.reset()
    torch.manual_seed(0)
    enc = PrefixEncoder(3, 2, 2, 16, prefix_projection=True, encoder_hidden_size=8, backend="torch")

    def step(weights):
        prefix = enc()
        return (prefix * weights).sum()

    w = torch.randn(2, 2, 2, 3, 16)
    eager = step(w)
    eager.backward()
    eager_grads = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(w)
    got.backward()
    torch.testing.assert_close(got, eager)
    for p, ref in zip(enc.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, ref)


def test_compile_fullgraph_frozen_inference_skips_the_cache():
    """Under torch.compile the Python-side cache is not consulted: the graph computes the prefix."""
    torch._dynamo.reset()
    enc = PrefixEncoder(3, 2, 2, 16, prefix_projection=True, encoder_hidden_size=8, backend="torch").eval()
    enc.requires_grad_(False)
    compiled = torch.compile(lambda: enc() * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(), enc() * 2)
    with torch.no_grad():
        enc.transform[2].bias.add_(1.0)
    torch.testing.assert_close(compiled(), enc() * 2)


def test_compile_fullgraph_under_autocast():
    """The compute dtype (autocast's) is decided at trace time and the prefix comes out in it."""
    torch._dynamo.reset()
    enc = PrefixEncoder(3, 2, 2, 16, prefix_projection=True, encoder_hidden_size=8, backend="torch")

    def prefix():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return enc()

    got = torch.compile(prefix, fullgraph=True, backend="aot_eager")()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, prefix())

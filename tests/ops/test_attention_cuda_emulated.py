"""The CUDA kernels of csrc/, run on the CPU by tests/emulator, against the reference under the
tolerance rule, on the odd-shape grid of the CPU suite; plus what only the kernels can get wrong:
determinism of the prefix reduction, scheduling and copy timing, layouts the api must copy.

The emulator compiles the very kernel bodies the extension ships (the device primitives swapped for
emulated ones: mma.sync, ldmatrix, cp.async, shuffles, barriers) behind the same op logic
(csrc/api/ops.h), and runs them through the package's custom ops as a test-only backend.
"""

import shutil
import types

import pytest
import torch

from prefix_kernels import backends, prefix_attention
from prefix_kernels.ops.attention import cuda as cuda_backend
from prefix_kernels.testing import assert_parity, check_backend, make_inputs

from .cases import case_id, covering_grid

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="needs a C++ compiler to build the emulator")

NAME = "cuda_emulated"


@pytest.fixture(scope="module")
def emu():
    from tests import emulator

    module = emulator.load()
    impl = types.SimpleNamespace(forward=lambda *args: _fwd(module, *args), backward=lambda *args: _bwd(module, *args))
    class Emulated(backends.CudaAttention):  # the cuda backend's capabilities, on the CPU
        name, description = NAME, "the CUDA kernels on the CPU emulator (tests only)"

        def device_reasons(self, device):
            return [] if device.type == "cpu" else ["emulated on the CPU only"]

        def impl(self):
            return impl

    backends.register(Emulated())
    module.set_options(True, True, 0)  # the most adversarial schedule: skewed warps, copies land at issue
    yield module
    backends.unregister(NAME)


def _fwd(module, q, k, v, pk, pv, mask, causal, scale, need_lse, features=None):
    cuda_backend._no_features(features)  # the cuda backend's own policy
    return module.fwd(q, k, v, pk, pv, mask, causal, scale, need_lse)


def _bwd(module, dout, dlse, q, k, v, pk, pv, mask, out, lse, causal, scale, features=None):
    cuda_backend._no_features(features)
    dq, dk, dv, dpk, dpv = module.bwd(dout, dlse, q, k, v, pk, pv, mask, out, lse, causal, scale)
    return (dq, dk, dv, None, None) if pk is None else (dq, dk, dv, dpk, dpv)


@pytest.mark.parametrize("case", covering_grid(), ids=case_id)
def test_emulated_parity_fp16(emu, case):
    case = dict(case)
    causal = case.pop("causal")
    inputs = make_inputs(**case, dtype=torch.float16)
    assert_parity(check_backend(inputs, NAME, causal=causal, lse_grad=True))


@pytest.mark.parametrize("case", covering_grid()[::3], ids=case_id)
def test_emulated_parity_bf16(emu, case):
    case = dict(case)
    causal = case.pop("causal")
    inputs = make_inputs(**case, dtype=torch.bfloat16)
    assert_parity(check_backend(inputs, NAME, causal=causal))


@pytest.mark.parametrize("head_dim", [8, 16, 80, 96, 120])
def test_emulated_head_dims_between_tiles(emu, head_dim):
    """Head dims run on the next compiled tile (32, 64, 96, 128) with the extra columns zero-filled."""
    inputs = make_inputs(batch=2, heads_q=2, heads_kv=1, len_q=19, len_k=23, prefix_len=7, head_dim=head_dim,
                         dtype=torch.float16, padding="left")
    assert_parity(check_backend(inputs, NAME, causal=True))


@pytest.mark.parametrize("padding, causal", [("random", True), ("right", True), (None, False)])
def test_emulated_multi_tile_shapes(emu, padding, causal):
    """Several query, key and prefix tiles of every pass (64-row tiles), and Lq > Lk under causality. With
    random padding every input tile is an edge tile (the padding has holes); with right padding (one kept
    range) or none, the key walk also runs interior tiles, which skip the mask."""
    inputs = make_inputs(batch=2, heads_q=4, heads_kv=2, len_q=150, len_k=131, prefix_len=70, head_dim=32,
                         dtype=torch.float16, padding=padding)
    assert_parity(check_backend(inputs, NAME, causal=causal))


SCHEDULES = [(True, True, 0), (False, False, 1), (False, True, 2), (True, False, 3), (True, True, 4)]


@pytest.mark.parametrize("shape", [
    dict(batch=3, heads_q=4, heads_kv=2, len_q=40, len_k=70, prefix_len=20, head_dim=64, padding="right"),
    dict(batch=2, heads_q=2, heads_kv=1, len_q=130, len_k=150, prefix_len=70, head_dim=128, padding="left"),
], ids=["D64", "D128-multi-tile"])
def test_emulated_is_deterministic_across_schedules(emu, shape):
    """Thread interleavings and cp.async completion times change nothing, bit for bit: a missing barrier
    or wait shows as a difference (or as the NaN garbage shared memory starts with). Schedules: copies
    at issue or at the wait, warps interleaved or one at a time, several seeds."""
    inputs = make_inputs(**shape, dtype=torch.bfloat16)
    leaves = [inputs[n].detach().requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    results = []
    for eager, greedy, seed in SCHEDULES:
        emu.set_options(eager, greedy, seed)
        out = prefix_attention(*leaves, causal=True, key_padding_mask=inputs["key_padding_mask"], backend=NAME)
        results.append([out, *torch.autograd.grad(out.float().square().sum(), leaves)])
    emu.set_options(*SCHEDULES[0])
    assert all(torch.isfinite(t).all() for t in results[0])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_emulated_layouts_and_copies(emu):
    """Inputs the kernels cannot read in place (a non-unit last stride, a misaligned view) are copied;
    outputs keep the caller's layouts, as the fake implementations promise."""
    inputs = make_inputs(batch=2, heads_q=4, heads_kv=2, len_q=17, len_k=21, prefix_len=5, head_dim=32,
                         dtype=torch.float16)
    q = inputs["q"].transpose(-1, -2).contiguous().transpose(-1, -2)  # last-dim stride != 1
    big = torch.zeros(inputs["k"].numel() + 1, dtype=torch.float16)
    k = big[1:].view(inputs["k"].shape).copy_(inputs["k"])  # 2-byte offset: not 16-byte aligned
    inputs = dict(inputs, q=q, k=k)
    assert_parity(check_backend(inputs, NAME))
    out, lse = emu.fwd(q, k, inputs["v"], inputs["prefix_k"], inputs["prefix_v"], None, False, 0.2, True)
    assert out.stride() == torch.empty_like(q).stride()
    grads = emu.bwd(out, None, q, k, inputs["v"], inputs["prefix_k"], inputs["prefix_v"], None, out, lse, False, 0.2)
    for g, like in zip(grads, (q, k, inputs["v"], inputs["prefix_k"], inputs["prefix_v"]), strict=True):
        assert g.shape == like.shape and g.stride() == torch.empty_like(like).stride()


def test_emulated_without_prefix_returns_empty_prefix_grads(emu):
    inputs = make_inputs(batch=1, heads_q=2, heads_kv=2, len_q=5, len_k=6, prefix_len=0, head_dim=32,
                         dtype=torch.float16)
    out, lse = emu.fwd(inputs["q"], inputs["k"], inputs["v"], None, None, None, True, 0.3, False)
    assert lse.shape == (1, 2, 0)
    _, lse = emu.fwd(inputs["q"], inputs["k"], inputs["v"], None, None, None, True, 0.3, True)
    grads = emu.bwd(out, None, inputs["q"], inputs["k"], inputs["v"], None, None, None, out, lse, True, 0.3)
    assert grads[3].shape == (0,) and grads[4].shape == (0,)


def test_emulated_rows_that_see_nothing(emu):
    """P = 0 with a fully padded batch row, and causal rows before the first key: out = 0, lse = -inf,
    zero gradients, never NaN."""
    inputs = make_inputs(batch=2, heads_q=2, heads_kv=1, len_q=30, len_k=12, prefix_len=0, head_dim=32,
                         dtype=torch.float16, padding="empty")
    assert_parity(check_backend(inputs, NAME, causal=True, lse_grad=True))

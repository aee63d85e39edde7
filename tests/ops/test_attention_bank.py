"""Prefix banks: N prefixes in one batch, chosen per row by prefix_index (-1: none), of mixed lengths."""

import pytest
import torch

from prefix_kernels import prefix_attention
from prefix_kernels.testing import assert_parity, check_backend, make_inputs

BACKENDS = ("triton", "torch")


def _bank(n, hkv, p, d, dtype, device, seed=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hkv, p, d, generator=g).to(device, dtype),
            torch.randn(n, hkv, p, d, generator=g).to(device, dtype))


def _case(dtype, device, batch=5, n=3, p=13, heads=(4, 2), lengths=True, padding="right"):
    inputs = make_inputs(batch=batch, heads_q=heads[0], heads_kv=heads[1], len_q=11, len_k=17, prefix_len=0,
                         head_dim=32, dtype=dtype, device=device, padding=padding)
    inputs["prefix_k"], inputs["prefix_v"] = _bank(n, heads[1], p, 32, dtype, device)
    index = torch.tensor([2, -1, 0, 2, 1, 0, -1][:batch], device=device)
    lens = torch.tensor([13, 4, 9][:n], device=device) if lengths else None
    return inputs, index, lens


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_parity_with_reference(backend, dtype, device):
    """out, LSE and all gradients (the bank's included) against the explicit reference."""
    inputs, index, lens = _case(dtype, device)
    assert_parity(check_backend(inputs, backend, causal=True, lse_grad=True, prefix_index=index,
                                prefix_lengths=lens))


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_row_equals_the_single_prefix_call(backend, device):
    """Row b of a bank call equals a plain call with bank[index[b]][:, :length] (no prefix for -1), and each
    prefix's gradient equals the sum over the rows that use it."""
    inputs, index, lens = _case(torch.float32, device, lengths=True)
    bank_k = inputs["prefix_k"].requires_grad_()
    bank_v = inputs["prefix_v"].requires_grad_()
    q, k, v, mask = inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"]
    out = prefix_attention(q, k, v, bank_k, bank_v, prefix_index=index, prefix_lengths=lens, causal=True,
                           key_padding_mask=mask, backend=backend)
    gk, gv = torch.autograd.grad(out.square().sum(), (bank_k, bank_v))
    want_k = torch.zeros_like(gk)
    want_v = torch.zeros_like(gv)
    for b in range(q.shape[0]):
        i = int(index[b])
        if i < 0:
            row = prefix_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], causal=True, key_padding_mask=mask[b:b + 1],
                                   backend=backend)
        else:
            n = int(lens[i])
            pk = bank_k[i, :, :n].detach().requires_grad_()
            pv = bank_v[i, :, :n].detach().requires_grad_()
            row = prefix_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], pk, pv, causal=True,
                                   key_padding_mask=mask[b:b + 1], backend=backend)
            rk, rv = torch.autograd.grad(row.square().sum(), (pk, pv))
            want_k[i, :, :n] += rk
            want_v[i, :, :n] += rv
        torch.testing.assert_close(out[b:b + 1], row, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(gk, want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gv, want_v, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(gk[1, :, 4:]) == 0  # columns past prefix 1's length get no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_prefix_with_index(backend, device):
    """A single prefix [Hkv, P, D] with prefix_index in {0, -1} switches it off per row."""
    inputs = make_inputs(batch=3, len_q=7, len_k=9, prefix_len=5, head_dim=32, device=device)
    assert_parity(check_backend(inputs, backend, causal=True, prefix_index=torch.tensor([0, -1, 0], device=device)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_with_alibi_starts_input_positions_at_the_row_prefix_length(backend, device):
    inputs, index, lens = _case(torch.float32, device, padding="left")
    slopes = torch.linspace(0.05, 0.4, 4, device=device)
    offsets = -(inputs["key_padding_mask"].int().cumsum(1) == 0).sum(1).to(torch.int32)
    assert_parity(check_backend(inputs, backend, causal=True, prefix_index=index, prefix_lengths=lens,
                                alibi_slopes=slopes, alibi_offsets=offsets))


def test_bank_gradient_is_deterministic(device):
    inputs, index, lens = _case(torch.float32, device)
    bank = inputs["prefix_k"].requires_grad_()
    grads = []
    for _ in range(2):
        out = prefix_attention(inputs["q"], inputs["k"], inputs["v"], bank, inputs["prefix_v"], prefix_index=index,
                               prefix_lengths=lens, backend="triton")
        grads.append(torch.autograd.grad(out.square().sum(), bank)[0])
    assert torch.equal(grads[0], grads[1])


BAD = [
    (dict(prefix_index=None), ValueError, "needs prefix_index"),
    (dict(prefix_index=torch.tensor([0, 3])), ValueError, r"prefix_index values must be in \[-1, 2\]"),
    (dict(prefix_index=torch.tensor([0, -2])), ValueError, r"prefix_index values must be in \[-1, 2\]"),
    (dict(prefix_index=torch.tensor([0.0, 1.0])), TypeError, "prefix_index must be int32 or int64"),
    (dict(prefix_index=torch.tensor([0, 1, 2])), ValueError, r"prefix_index must have shape \(2,\)"),
    (dict(prefix_lengths=torch.tensor([1, 2, 9])), ValueError, r"prefix_lengths values must be in \[0, 5\]"),
    (dict(prefix_lengths=torch.tensor([1, 2])), ValueError, r"prefix_lengths must have shape \(3,\)"),
]


@pytest.mark.parametrize("over,exc,match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_bank_arguments(over, exc, match):
    q = torch.randn(2, 4, 3, 16)
    k = torch.randn(2, 2, 4, 16)
    bank = torch.randn(3, 2, 5, 16)
    kw = dict(prefix_index=torch.tensor([0, 2]))
    kw.update(over)
    with pytest.raises(exc, match=match):
        prefix_attention(q, k, k, bank, bank, backend="torch", **kw)

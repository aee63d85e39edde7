"""attn_bias: an additive bias on the logits (T5's relative position bias), broadcast over any of its dims.

Parity of every backend that serves it with the fp32 reference (out, LSE, the five gradients), the reference
against an explicit concatenation written here, -inf entries, and the errors for bad or differentiable biases."""

import pytest
import torch

from prefix_kernels import prefix_attention
from prefix_kernels.ops.attention import backends, check_inputs, prefix_attention_ref, select_backend
from prefix_kernels.testing import assert_parity, check_backend, compare, make_inputs

BACKENDS = ("torch", "triton")


def _bias(inputs, shape, seed=3, dtype=torch.float32, neg_inf=0.0):
    """A random bias of ``shape`` (dims of 1 broadcast), about as large as T5's (a few units), with a fraction
    ``neg_inf`` of its entries -inf."""
    g = torch.Generator().manual_seed(seed)
    bias = 2.0 * torch.randn(shape, generator=g)
    if neg_inf:
        bias = bias.masked_fill(torch.rand(shape, generator=g) < neg_inf, float("-inf"))
    return bias.to(inputs["q"].device, dtype)


def _full(inputs):
    B, Hq, Lq, _ = inputs["q"].shape
    pk = inputs["prefix_k"]
    P = 0 if pk is None else pk.shape[-2]
    return B, Hq, Lq, P + inputs["k"].shape[2]


def _bank(inputs, n, p, seed=7):
    g = torch.Generator().manual_seed(seed)
    hkv, d = inputs["k"].shape[1], inputs["k"].shape[3]
    q = inputs["q"]
    inputs["prefix_k"], inputs["prefix_v"] = (torch.randn(n, hkv, p, d, generator=g).to(q.device, q.dtype)
                                              for _ in range(2))
    return inputs


# name: (make_inputs kwargs, causal, which dims of the bias are full (B, H, Lq, cols), extra features)
CASES = {
    "full": (dict(heads_q=4, heads_kv=2, len_q=9, len_k=11, prefix_len=5, head_dim=32), False, "BHLC", {}),
    "bcast-batch-causal-padded": (dict(heads_q=4, heads_kv=2, len_q=9, len_k=13, prefix_len=5, head_dim=32,
                                       padding="right"), True, "HLC", {}),
    "bcast-heads-mqa": (dict(heads_q=4, heads_kv=1, len_q=7, len_k=11, prefix_len=3, head_dim=32), True, "BLC", {}),
    "bcast-rows": (dict(heads_q=2, heads_kv=2, len_q=7, len_k=9, prefix_len=5, head_dim=32, padding="left"), False,
                   "BHC", {}),
    "decode-row": (dict(heads_q=4, heads_kv=2, len_q=1, len_k=19, prefix_len=5, head_dim=32), True, "HC", {}),
    "no-prefix": (dict(heads_q=4, heads_kv=2, len_q=9, len_k=13, prefix_len=0, head_dim=32, padding="random"), True,
                  "BHLC", {}),
    "bcast-all-but-cols": (dict(heads_q=2, heads_kv=1, len_q=9, len_k=9, prefix_len=13, head_dim=32), True, "C", {}),
    "alibi-softcap": (dict(heads_q=4, heads_kv=2, len_q=9, len_k=11, prefix_len=5, head_dim=32, padding="right"),
                      True, "HLC", "alibi-softcap"),
    "window-dropout": (dict(heads_q=2, heads_kv=1, len_q=11, len_k=13, prefix_len=3, head_dim=32), True, "BHLC",
                       "window-dropout"),
}


def _features(inputs, extra):
    if extra == "alibi-softcap":
        Hq = inputs["q"].shape[1]
        return dict(alibi_slopes=torch.linspace(0.5, 0.05, Hq, device=inputs["q"].device), softcap=4.0)
    if extra == "window-dropout":
        return dict(sliding_window=4, dropout_p=0.25)
    return {}


def _shape_of(full, dims):
    return tuple(n if c in dims else 1 for n, c in zip(full, "BHLC", strict=True))


DTYPES = (torch.float32, torch.float16)


# fp16 on a few cases only: the Triton interpreter is slow.
PARITY = [(name, torch.float32) for name in sorted(CASES)] + [
    (name, torch.float16) for name in ("full", "bcast-batch-causal-padded", "alibi-softcap")]


@pytest.mark.parametrize(("name", "dtype"), PARITY, ids=[f"{n}-{str(d)[6:]}" for n, d in PARITY])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_parity(backend, name, dtype, device):
    kwargs, causal, dims, extra = CASES[name]
    inputs = make_inputs(**kwargs, dtype=dtype, device=device)
    bias = _bias(inputs, _shape_of(_full(inputs), dims))
    assert_parity(check_backend(inputs, backend, causal=causal, lse_grad=True, attn_bias=bias,
                                **_features(inputs, extra)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_with_a_prefix_bank(backend, device):
    """With a bank the bias columns are still [P of the bank ; Lk]: rows with a shorter prefix (or none) keep
    their masked columns masked whatever the bias holds there."""
    inputs = _bank(make_inputs(batch=3, heads_q=4, heads_kv=2, len_q=7, len_k=9, prefix_len=0, head_dim=32,
                               padding="right", device=device), n=2, p=6)
    index = torch.tensor([1, -1, 0], device=device)
    lens = torch.tensor([6, 2], device=device)
    bias = _bias(inputs, (3, 1, 7, 6 + 9))
    assert_parity(check_backend(inputs, backend, causal=True, lse_grad=True, prefix_index=index,
                                prefix_lengths=lens, attn_bias=bias))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_with_neg_inf_entries(backend, dtype, device):
    """-inf in the bias hides that key; a query whose every key is -inf sees no key: out 0, LSE -inf, zero
    gradients, no NaN (the rule of rows that see no key)."""
    inputs = make_inputs(heads_q=4, heads_kv=2, len_q=9, len_k=11, prefix_len=5, head_dim=32, padding="right",
                         dtype=dtype, device=device)
    bias = _bias(inputs, _full(inputs), neg_inf=0.3)
    bias[0, 1, 2] = float("-inf")  # query 2 of row 0, head 1: nothing visible
    bias[1, :, 4, :5] = float("-inf")  # query 4 of row 1: no prefix column
    assert_parity(check_backend(inputs, backend, causal=True, lse_grad=True, attn_bias=bias))
    args = [inputs[n].detach().requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    out, lse = prefix_attention(*args, causal=True, key_padding_mask=inputs["key_padding_mask"], attn_bias=bias,
                                return_lse=True, backend=backend)
    assert torch.equal(out[0, 1, 2], torch.zeros_like(out[0, 1, 2]))
    assert lse[0, 1, 2] == float("-inf")
    grads = torch.autograd.grad((out.float() * torch.randn_like(out.float())).sum(), args)
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][0, 1, 2], torch.zeros_like(grads[0][0, 1, 2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_in_qs_dtype_and_strided(backend, device):
    """A bias in q's dtype (fp16), and an fp32 bias given as an expanded / transposed view, give what the same
    values as a contiguous fp32 tensor give."""
    inputs = make_inputs(heads_q=4, heads_kv=2, len_q=8, len_k=8, prefix_len=3, head_dim=32, dtype=torch.float16,
                         device=device)
    args = [inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    half = _bias(inputs, (1, 4, 8, 11), dtype=torch.float16)
    want = prefix_attention(*args, attn_bias=half.float().contiguous(), backend=backend)
    got = prefix_attention(*args, attn_bias=half, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    expanded = half.float().expand(2, 4, 8, 11)
    torch.testing.assert_close(prefix_attention(*args, attn_bias=expanded, backend=backend), want, rtol=0, atol=0)
    square = _bias(inputs, (2, 4, 11, 11))[:, :, :8]  # rows of a larger tensor: stride(2) = 11
    transposed = square.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) != 1
    a = prefix_attention(*args, attn_bias=square, backend=backend)
    b = prefix_attention(*args, attn_bias=transposed, backend=backend)
    c = prefix_attention(*args, attn_bias=square.contiguous(), backend=backend)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    torch.testing.assert_close(b, c, rtol=0, atol=0)


def test_reference_bias_is_an_explicit_concat_softmax(device):
    """The reference's bias, against a concatenation and softmax written out here: T5's convention (scale 1,
    the bias added to q.k), GQA, a padding mask and a prefix; gradients of q and the prefix included."""
    B, Hq, Hkv, Lq, Lk, P, D = 2, 4, 2, 5, 7, 3, 16
    inputs = make_inputs(batch=B, heads_q=Hq, heads_kv=Hkv, len_q=Lq, len_k=Lk, prefix_len=P, head_dim=D,
                         padding="left", device=device)
    q, k, v, pk, pv = (inputs[n].double().detach().requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v"))
    mask = inputs["key_padding_mask"]
    bias = _bias(inputs, (1, Hq, Lq, P + Lk)).double()
    out, lse = prefix_attention_ref(q, k, v, pk, pv, key_padding_mask=mask, softmax_scale=1.0, attn_bias=bias)

    kk = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2).repeat_interleave(Hq // Hkv, 1)
    vv = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2).repeat_interleave(Hq // Hkv, 1)
    scores = q @ kk.transpose(-1, -2) + bias
    keep = torch.cat([torch.ones(B, P, dtype=torch.bool, device=device), mask], 1).view(B, 1, 1, P + Lk)
    scores = scores.masked_fill(~keep, float("-inf"))
    want = torch.softmax(scores, -1) @ vv
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(want)
    got = torch.autograd.grad((out * dout).sum(), (q, pk))
    exp = torch.autograd.grad((want * dout).sum(), (q, pk))
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    # And the bias does matter: without it the reference differs.
    plain, _ = prefix_attention_ref(q, k, v, pk, pv, key_padding_mask=mask, softmax_scale=1.0)
    assert (plain - want).abs().max() > 1e-2


def test_bias_is_added_after_the_softcap(device):
    """S = softcap(scale * q.k) + alibi + bias: a bias larger than the cap still moves the probabilities."""
    inputs = make_inputs(batch=1, heads_q=2, heads_kv=2, len_q=3, len_k=4, prefix_len=0, head_dim=16, device=device)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    bias = torch.zeros(1, 1, 1, 4, device=device)
    bias[..., 0] = 50.0  # far above the cap: key 0 takes (almost) all the weight
    out, _ = prefix_attention_ref(q, k, v, softcap=1.0, attn_bias=bias)
    torch.testing.assert_close(out, v[:, :, :1].expand_as(out), rtol=1e-5, atol=1e-5)


def _args(device, **over):
    q = torch.randn(2, 4, 5, 16, device=device)
    k = torch.randn(2, 2, 7, 16, device=device)
    pk = torch.randn(2, 3, 16, device=device)
    base = dict(q=q, k=k, v=k.clone(), prefix_k=pk, prefix_v=pk.clone())
    base.update(over)
    return base


@pytest.mark.parametrize("shape", [(2, 4, 5), (2, 4, 5, 7), (3, 4, 5, 10), (2, 2, 5, 10), (2, 4, 1, 1, 10)])
def test_bad_shape_names_attn_bias_and_the_expected_shape(shape, device):
    with pytest.raises(ValueError, match=r"attn_bias must have shape \[B=2 or 1, Hq=4 or 1, Lq=5 or 1, "
                                         r"P \+ Lk=10 or 1\].*got \(" + ", ".join(map(str, shape))):
        prefix_attention(**_args(device), attn_bias=torch.zeros(shape, device=device))


def test_bad_dtype_device_and_type(device):
    with pytest.raises(TypeError, match="attn_bias must be float32 .*got torch.float64"):
        prefix_attention(**_args(device), attn_bias=torch.zeros(1, 1, 1, 10, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match="attn_bias must be float32 or float16 .*got torch.bfloat16"):
        args = {n: t.half() for n, t in _args(device).items()}
        prefix_attention(**args, attn_bias=torch.zeros(1, 1, 1, 10, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="attn_bias is on meta but q is on"):
        prefix_attention(**_args(device), attn_bias=torch.zeros(1, 1, 1, 10, device="meta"))
    with pytest.raises(TypeError, match="attn_bias must be a torch.Tensor"):
        prefix_attention(**_args(device), attn_bias=[[0.0]])


def test_bias_that_requires_grad_raises(device):
    bias = torch.zeros(1, 4, 5, 10, device=device, requires_grad=True)
    with pytest.raises(ValueError, match=r"attn_bias requires grad.*no gradient.*detach\(\)"):
        prefix_attention(**_args(device), attn_bias=bias)
    prefix_attention(**_args(device), attn_bias=bias.detach())  # the remedy the message names works


def test_cuda_backend_declines_the_bias_with_its_reason(device):
    args = _args(device)
    spec, _ = check_inputs(*args.values(), attn_bias=torch.zeros(1, 4, 5, 10, device=device))
    reasons = backends.get("cuda").input_reasons(spec)
    assert any("attn_bias" in r and "CUDA kernels" in r for r in reasons), reasons
    plain, _ = check_inputs(*args.values())
    assert not any("attn_bias" in r for r in backends.get("cuda").input_reasons(plain))
    assert select_backend(*args.values(), attn_bias=torch.zeros(1, 4, 5, 10, device=device)) != "cuda"


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_only_calls(backend, device):
    """Inference (no gradient, no LSE: the torch backend's one-SDPA path in fp32), with padding, causality, ALiBi
    and a query whose every key has a -inf bias (its output is 0, not NaN)."""
    inputs = make_inputs(heads_q=4, heads_kv=2, len_q=9, len_k=11, prefix_len=5, head_dim=32, padding="right",
                         device=device)
    args = [inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    bias = _bias(inputs, (1, 4, 9, 16), neg_inf=0.2)
    bias[0, 2, 3] = float("-inf")
    kw = dict(causal=True, key_padding_mask=inputs["key_padding_mask"], attn_bias=bias)
    for extra in ({}, dict(alibi_slopes=torch.linspace(0.5, 0.05, 4, device=device))):
        with torch.no_grad():
            out = prefix_attention(*args, backend=backend, **kw, **extra)
        ref, _ = prefix_attention_ref(*(t.double() for t in args), **kw, **extra)
        base, _ = prefix_attention_ref(*args, upcast=False, **kw, **extra)
        assert_parity([compare("out", out, ref, base, 2.0, 16)])
        assert torch.equal(out[:, 2, 3][0], torch.zeros_like(out[0, 2, 3]))


def test_bias_tiles_are_never_larger_than_the_featured_ones(monkeypatch):
    """With attn_bias the launchers pick the featured tile or a smaller one (where the featured tile spills with
    the bias tile live too: kernel_report's "all" rows), never a larger one."""
    from prefix_kernels.ops.attention import triton_impl as ti

    monkeypatch.setattr(ti, "is_interpreting", lambda: False)  # the GPU tables (the interpreter takes 32 x 32)
    rows = {(k, a, bd, dt, dec, var): c for k, a, bd, dt, dec, var, c in ti.shipped_configs()}
    smaller = 0
    for (k, a, bd, dt, dec, var), cfg in rows.items():
        if var == "all":
            feat = rows[(k, a, bd, dt, dec, "scores")]
            assert cfg.block_m * cfg.block_n <= feat.block_m * feat.block_n, (k, a, bd, dt, dec)
            smaller += cfg.block_m * cfg.block_n < feat.block_m * feat.block_n
    assert smaller > 0

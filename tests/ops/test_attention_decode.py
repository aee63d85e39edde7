"""The Triton decode kernel (Lq <= 16, forward only): parity with the fp32 reference under the tolerance rule over
a covering grid of Lq, GQA layouts, prefix lengths, cache lengths and split counts, with padding, causality, ALiBi,
the sliding window, softcap and prefix banks; its LSE; which calls it serves and which it leaves to the tiled
forward, with the reasons.

Every call here is a no-grad forward (``grads=False``), the only kind the decode kernel serves. Splits are forced
with ``triton_decode.forced_split_tiles`` (1: a split per 32-key tile of the interpreter), so that short caches
still walk several splits and the merge.
"""

import contextlib
import itertools

import pytest
import torch

from prefix_kernels import prefix_attention, prefix_attention_ref
from prefix_kernels.ops.attention import backends, check_inputs, triton_decode
from prefix_kernels.testing import assert_parity, check_backend, make_inputs

from .test_attention_features import bloom_slopes

DTYPES = (torch.float32, torch.float16)
LEN_QS = (1, 2, 5, 16)
HEADS = ((4, 4), (8, 2), (8, 1))  # MHA, GQA (4 query heads per kv head), MQA (8)
PREFIX_LENS = (0, 3, 16)
LEN_KS = (1, 7, 33, 64, 97, 130, 300)
PADDINGS = (None, "left", "right", "random")
SPLITS = (None, 1, 3)  # the heuristic, a split per key tile, three tiles per split


def _splits(tiles):
    return contextlib.nullcontext() if tiles is None else triton_decode.forced_split_tiles(tiles)


def decode_grid():
    """Every (Lq, heads, P) triple once, with the cache length, causality, padding and split size rotated through
    (a covering design: each value of each axis meets many values of the others)."""
    cases = []
    for i, (len_q, (hq, hkv), p) in enumerate(itertools.product(LEN_QS, HEADS, PREFIX_LENS)):
        cases.append(dict(len_q=len_q, heads_q=hq, heads_kv=hkv, prefix_len=p, len_k=LEN_KS[i % len(LEN_KS)],
                          causal=bool(i % 2), padding=PADDINGS[(i // 2) % len(PADDINGS)],
                          splits=SPLITS[(i // 3) % len(SPLITS)]))
    return cases


def _id(c):
    return (f"Lq{c['len_q']}-H{c['heads_q']}x{c['heads_kv']}-P{c['prefix_len']}-Lk{c['len_k']}-"
            f"{'causal' if c['causal'] else 'full'}-{c['padding'] or 'nopad'}-split{c['splits'] or 'auto'}")


def _check(inputs, splits=None, causal=False, **features):
    """Parity of a no-grad call (out and LSE), and that the decode kernel served it."""
    before = triton_decode.counts["decode"]
    with _splits(splits):
        results = check_backend(inputs, "triton", causal=causal, grads=False, **features)
    assert triton_decode.counts["decode"] == before + 1, triton_decode.last_reasons
    assert_parity(results)
    return results


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", decode_grid(), ids=_id)
def test_grid(case, dtype, device):
    shape = {k: case[k] for k in ("heads_q", "heads_kv", "len_q", "len_k", "prefix_len")}
    if case["padding"] is not None and case["len_k"] == 1:
        shape["len_k"] = 5  # make_inputs' padding keeps at least one key: give it some to drop
    inputs = make_inputs(batch=2, head_dim=32, dtype=dtype, device=device, padding=case["padding"], **shape)
    _check(inputs, case["splits"], causal=case["causal"])


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"split{s or 'auto'}")
@pytest.mark.parametrize("len_q", (1, 5))
def test_head_dims_and_layouts(len_q, splits, device):
    """Odd head dims (padded to the tile), contiguous [B, H, L, D] inputs, and several row blocks (GQA 16/1 with
    Lq = 5: 80 packed rows, two 64-row blocks)."""
    for head_dim, hf in ((40, True), (16, False), (80, True)):
        inputs = make_inputs(batch=2, heads_q=16, heads_kv=1, len_q=len_q, len_k=45, prefix_len=5, head_dim=head_dim,
                             padding="right", hf_layout=hf, device=device)
        _check(inputs, splits, causal=True)


def test_prefix_in_several_splits(device):
    """A prefix longer than a split is split too (Hydragen: the prefix splits are separate sources of the one
    softmax), and rows of a bank without a prefix see empty prefix splits."""
    inputs = make_inputs(batch=3, heads_q=8, heads_kv=2, len_q=2, len_k=50, prefix_len=70, head_dim=32,
                         padding="left", device=device)
    _check(inputs, 1, causal=True)
    assert triton_decode.last_plan == (3, 2, 32)


def test_split_plan_on_a_gpu(monkeypatch):
    """The heuristic: no split when B * Hkv programs fill the GPU (two per SM); else splits of at least
    MIN_SPLIT_TILES tiles, the prefix in splits of its own, about enough to fill it."""
    monkeypatch.setattr(triton_decode, "sm_count", lambda device: 132)
    gpu = torch.device("cuda")
    assert triton_decode.plan_splits(32768, 64, 64 * 8, 64, gpu) == (0, 1, 0)  # B 64, Hkv 8: 512 programs
    prefix, inputs, cols = triton_decode.plan_splits(32768, 64, 8 * 8, 64, gpu)  # B 8, Hkv 8: 64 programs
    assert prefix == 1 and cols % 64 == 0 and cols >= 64 * triton_decode.MIN_SPLIT_TILES
    assert 4 <= prefix + inputs <= 6 and inputs * cols >= 32768
    assert triton_decode.plan_splits(100, 16, 8, 64, gpu) == (0, 1, 0)  # 3 tiles: too short to split
    p, i, cols = triton_decode.plan_splits(1024, 16, 8, 64, gpu)
    assert (p, i, cols) == (1, 4, 256)


FEATURE_CASES = {
    # name: (make_inputs kwargs, causal, features builder)
    "alibi-offsets": (dict(heads_q=8, heads_kv=2, len_q=5, len_k=70, prefix_len=3, padding="left"), True,
                      lambda inp: dict(alibi_slopes=bloom_slopes(8).to(inp["q"].device),
                                       alibi_offsets=-(inp["key_padding_mask"].int().cumsum(1) == 0).sum(1))),
    "alibi-decode": (dict(heads_q=4, heads_kv=1, len_q=1, len_k=100, prefix_len=16), True,
                     lambda inp: dict(alibi_slopes=bloom_slopes(4).to(inp["q"].device))),
    "window-1-decode": (dict(heads_q=4, heads_kv=2, len_q=1, len_k=70, prefix_len=3), True,
                        lambda inp: dict(sliding_window=1)),
    "window-7-Lq16": (dict(heads_q=8, heads_kv=2, len_q=16, len_k=100, prefix_len=16, padding="random"), True,
                      lambda inp: dict(sliding_window=7)),
    "window-40-Lq5": (dict(heads_q=8, heads_kv=1, len_q=5, len_k=130, prefix_len=0, padding="right"), True,
                      lambda inp: dict(sliding_window=40)),
    "softcap": (dict(heads_q=4, heads_kv=4, len_q=2, len_k=64, prefix_len=16, padding="random"), False,
                lambda inp: dict(softcap=2.0)),
    "everything": (dict(heads_q=8, heads_kv=2, len_q=5, len_k=97, prefix_len=16, padding="left"), True,
                   lambda inp: dict(alibi_slopes=bloom_slopes(8).to(inp["q"].device), sliding_window=33,
                                    softcap=5.0, softmax_scale=0.3)),
}


@pytest.mark.parametrize("splits", (None, 1), ids=lambda s: f"split{s or 'auto'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", sorted(FEATURE_CASES))
def test_features(name, dtype, splits, device):
    kwargs, causal, build = FEATURE_CASES[name]
    inputs = make_inputs(batch=2, head_dim=32, dtype=dtype, device=device, **kwargs)
    _check(inputs, splits, causal=causal, **build(inputs))


@pytest.mark.parametrize("splits", (None, 1), ids=lambda s: f"split{s or 'auto'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_bank(dtype, splits, device):
    """A bank of three prefixes of lengths 16, 4 and 0 (padded to P = 16), one row with none (-1)."""
    inputs = make_inputs(batch=4, heads_q=8, heads_kv=2, len_q=2, len_k=70, prefix_len=0, head_dim=32, dtype=dtype,
                         padding="right", device=device)
    g = torch.Generator().manual_seed(3)
    inputs["prefix_k"], inputs["prefix_v"] = (torch.randn(3, 2, 16, 32, generator=g).to(device, dtype)
                                              for _ in range(2))
    index = torch.tensor([2, -1, 0, 1], device=device)
    lengths = torch.tensor([16, 4, 0], device=device)
    _check(inputs, splits, causal=True, prefix_index=index, prefix_lengths=lengths)


def test_bfloat16(device):
    """bf16 runs (the interpreter computes its dots in fp32; a GPU runs them on tensor cores)."""
    inputs = make_inputs(batch=2, heads_q=8, heads_kv=2, len_q=2, len_k=70, prefix_len=16, head_dim=64,
                         dtype=torch.bfloat16, padding="left", device=device)
    _check(inputs, 1, causal=True)


def test_lse_only_when_asked_and_same_output(device):
    """Without return_lse the kernel stores no LSE, and the output is the same bits; the LSE it returns is the
    reference's (checked in every parity test) and -inf for a row that sees no key."""
    inputs = make_inputs(batch=2, heads_q=8, heads_kv=2, len_q=3, len_k=70, prefix_len=0, head_dim=32,
                         padding="empty", device=device)
    args = [inputs[n] for n in ("q", "k", "v")]
    mask = inputs["key_padding_mask"]
    for splits in (None, 1):
        with _splits(splits):
            out, lse = prefix_attention(*args, key_padding_mask=mask, return_lse=True, backend="triton")
            plain = prefix_attention(*args, key_padding_mask=mask, backend="triton")
        assert torch.equal(out, plain)
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
        ref_out, ref_lse = prefix_attention_ref(*args, key_padding_mask=mask)
        torch.testing.assert_close(lse[1], ref_lse[1].float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


def test_deterministic_and_matches_the_tiled_forward(device):
    inputs = make_inputs(batch=2, heads_q=8, heads_kv=2, len_q=4, len_k=130, prefix_len=16, head_dim=32,
                         padding="random", device=device)
    args = [inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    kw = dict(causal=True, key_padding_mask=inputs["key_padding_mask"], return_lse=True, backend="triton")
    with triton_decode.forced_split_tiles(1):
        first = prefix_attention(*args, **kw)
        second = prefix_attention(*args, **kw)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    before = dict(triton_decode.counts)
    with triton_decode.disabled():
        tiled = prefix_attention(*args, **kw)
    assert triton_decode.counts["tiled"] == before.get("tiled", 0) + 1
    assert "disabled" in triton_decode.last_reasons[0]
    torch.testing.assert_close(first[0], tiled[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first[1], tiled[1], rtol=1e-5, atol=1e-5)


def test_padded_keys_are_never_read(device):
    """NaN in padded keys and values, across splits: the output is that of finite ones."""
    inputs = make_inputs(batch=2, heads_q=4, heads_kv=2, len_q=2, len_k=70, prefix_len=3, head_dim=32,
                         padding="random", device=device)
    mask = inputs["key_padding_mask"]
    k, v = inputs["k"].clone(), inputs["v"].clone()
    k.masked_fill_(~mask[:, None, :, None], float("nan"))
    v.masked_fill_(~mask[:, None, :, None], float("nan"))
    with triton_decode.forced_split_tiles(1):
        dirty = prefix_attention(inputs["q"], k, v, inputs["prefix_k"], inputs["prefix_v"], key_padding_mask=mask)
        clean = prefix_attention(inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"],
                                 key_padding_mask=mask)
    assert torch.equal(dirty, clean)
    q = inputs["q"].clone()
    q[1, 2, 1, 0] = float("nan")  # a NaN query makes its own row NaN, and only it
    with triton_decode.forced_split_tiles(1):
        out, lse = prefix_attention(q, inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"],
                                    key_padding_mask=mask, return_lse=True)
    assert torch.isnan(out[1, 2, 1]).all() and torch.isnan(lse[1, 2, 1])
    nan_rows = torch.isnan(lse)
    assert nan_rows.sum() == 1 and torch.isfinite(out[~nan_rows]).all()


def test_grad_calls_use_the_tiled_kernels(device):
    """A call whose inputs require grad takes the tiled forward (its backward follows), with the reason; a no_grad
    call with a prefix leaf that requires grad takes the decode kernel. (An nn.Parameter passed as it is goes
    through the custom op, whose forward cannot tell no_grad from a differentiated call: the tiled forward serves
    it. The package's prefix modules hand over views, plain tensors.)"""
    inputs = make_inputs(batch=2, heads_q=8, heads_kv=2, len_q=1, len_k=40, prefix_len=3, head_dim=32,
                         device=device)
    q, k, v, pk, pv = (inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v"))
    pk = pk.clone().requires_grad_()
    before = dict(triton_decode.counts)
    out = prefix_attention(q, k, v, pk, pv, causal=True, backend="triton")
    assert triton_decode.counts["tiled"] == before.get("tiled", 0) + 1
    assert triton_decode.counts["decode"] == before.get("decode", 0)
    assert any("requires grad" in r for r in triton_decode.last_reasons), triton_decode.last_reasons
    (grad,) = torch.autograd.grad(out.sum(), pk)
    assert torch.isfinite(grad).all()
    with torch.no_grad():
        again = prefix_attention(q, k, v, pk, pv, causal=True, backend="triton")
    assert triton_decode.counts["decode"] == before.get("decode", 0) + 1 and not triton_decode.last_reasons
    torch.testing.assert_close(again, out.detach(), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        prefix_attention(q, k, v, pk.detach(), pv, causal=True, backend="triton")
    assert triton_decode.counts["decode"] == before.get("decode", 0) + 2


def test_unserved_features_are_declined_with_reasons(device):
    """Dropout (decode never trains) goes to the tiled forward, and the reason names it; so does Lq > 16 (which
    never reaches the decode kernel). The backend answers the same question for a spec."""
    inputs = make_inputs(batch=2, heads_q=4, heads_kv=2, len_q=2, len_k=40, prefix_len=3, head_dim=32,
                         device=device)
    args = [inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    before = dict(triton_decode.counts)
    prefix_attention(*args, dropout_p=0.2, backend="triton")
    assert triton_decode.counts["tiled"] == before.get("tiled", 0) + 1
    assert any("['dropout']" in r for r in triton_decode.last_reasons), triton_decode.last_reasons
    triton = backends.get("triton")
    spec, _ = check_inputs(*args, dropout_p=0.2)
    assert any("dropout" in r for r in triton.decode_reasons(spec))
    spec, _ = check_inputs(*args, sliding_window=3, causal=True, alibi_slopes=bloom_slopes(4).to(device))
    assert triton.decode_reasons(spec) == []
    assert any("requires grad" in r for r in triton.decode_reasons(spec, needs_grad=True))
    long = make_inputs(batch=1, heads_q=4, heads_kv=2, len_q=17, len_k=20, prefix_len=3, head_dim=32, device=device)
    spec, _ = check_inputs(*(long[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")))
    assert any("Lq=17" in r for r in triton.decode_reasons(spec))
    assert triton_decode.reasons(2, ("dropout", "some_future_feature"), False)[0].startswith(
        "optional features ['dropout', 'some_future_feature']")


def test_tuner_times_the_tiled_forward(device):
    """gpu-check's tuner measures the tiled forward's Lq <= 16 tile ("fwd_decode"), not the decode kernel."""
    from prefix_kernels.gpucheck import tune

    run = tune._timer("fwd_decode", tune.shapes("fwd_decode", True)[0], 32, torch.float32, device)
    before = dict(triton_decode.counts)
    run()
    assert triton_decode.counts["tiled"] == before.get("tiled", 0) + 1
    assert triton_decode.counts["decode"] == before.get("decode", 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("batch,len_k", ((2, 4097), (16, 1000), (64, 300)))
def test_gpu_decode_shapes(batch, len_k, dtype, device):
    """Decode shapes on a GPU, with the split plan of its SM count (several splits for the small batch, none for
    the big one): Llama-like GQA 32/8, D 128, P 64, left padding, bf16/fp16 tensor-core dots."""
    inputs = make_inputs(batch=batch, heads_q=32, heads_kv=8, len_q=1, len_k=len_k, prefix_len=64, head_dim=128,
                         dtype=dtype, device=device, padding="left")
    _check(inputs, None, causal=True)

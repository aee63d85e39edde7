"""The torch backend's CPU fast paths (issue 16), each against the reference under the tolerance rule, and each
shown to be the path that served the call:

- eager training through PyTorch's fused CPU kernels (GQA folded into the query rows, ALiBi in the mask),
- eager training with dropout (probabilities and keep mask kept for the backward),
- decoding by attending to the prefix and to the cache apart and merging by LSE,
- the masks those paths share across calls (sizes only, or within a memo scope, never stale).

``check_backend`` asks for the LSE, which routes training through the custom op; these tests ask for the output
alone, as models do."""

import pytest
import torch

from prefix_kernels import prefix_attention
from prefix_kernels.ops.attention import draw_dropout_seed, dropout_keep_mask, torch_impl
from prefix_kernels.ops.attention.reference import prefix_attention_ref
from prefix_kernels.ops.memo import memo_scope
from prefix_kernels.testing import GRAD_NAMES, TENSOR_NAMES, compare, make_inputs

DTYPES = (torch.float32, torch.float16)


def _dtype_id(d):
    return str(d).split(".")[-1]


def bloom_slopes(n: int) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / n) for i in range(n)], dtype=torch.float32)


def _leading_pads(mask):
    return (mask.int().cumsum(1) == 0).sum(1)


@pytest.fixture
def paths(monkeypatch):
    """Counts the calls each fast path served."""
    seen = {"fused": 0, "dropout": 0, "decode": 0}
    for name, attr, owner in (("fused", "apply", torch_impl._FusedFunction),
                              ("dropout", "apply", torch_impl._DropoutFunction)):
        original = getattr(owner, attr)

        def counted(*a, _original=original, _name=name):
            seen[_name] += 1
            return _original(*a)

        monkeypatch.setattr(owner, attr, counted)
    decode = torch_impl._decode

    def counted_decode(*a):
        seen["decode"] += 1
        return decode(*a)

    monkeypatch.setattr(torch_impl, "_decode", counted_decode)
    monkeypatch.setattr(torch_impl, "DECODE_MIN_CACHE", 0)  # the test caches are small: merge them all the same
    return seen


def _run(fn, inputs, dout, cast, grads, **kw):
    leaves = {n: cast(inputs[n]).detach().requires_grad_(grads) for n in TENSOR_NAMES if inputs[n] is not None}
    args = [leaves.get(n) for n in TENSOR_NAMES]
    with torch.set_grad_enabled(grads):
        out = fn(*args, key_padding_mask=inputs["key_padding_mask"], **kw)
    result = {"out": out}
    if grads:
        got = torch.autograd.grad((out * cast(dout)).sum(), list(leaves.values()))
        result.update({"d" + n: g for n, g in zip(leaves, got, strict=True)})
    return result


def _check(inputs, *, grads=True, causal=False, seed=1, **features):
    """ours (torch backend, no LSE asked) against the reference: out and, with grads, the five gradients."""
    q = inputs["q"]
    truth_dtype = torch.float64 if q.dtype == torch.float32 else torch.float32
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(q.dtype)
    kw = {"causal": causal, **features}

    torch.manual_seed(seed)
    ours = _run(lambda *a, **k: prefix_attention(*a, backend="torch", **k), inputs, dout, lambda t: t, grads, **kw)
    ref_kw = dict(kw)
    if features.get("dropout_p", 0.0) > 0:
        torch.manual_seed(seed)
        drawn = draw_dropout_seed(q.device)
        P = 0 if inputs["prefix_k"] is None else inputs["prefix_k"].shape[-2]
        ref_kw["dropout_keep"] = dropout_keep_mask(drawn, q.shape[0], q.shape[1], q.shape[2],
                                                   P + inputs["k"].shape[2], features["dropout_p"], "torch")

    def ref(upcast):
        return lambda *a, **k: prefix_attention_ref(*a, upcast=upcast, **k)[0]

    truth = _run(ref(True), inputs, dout, lambda t: t.to(truth_dtype), grads, **ref_kw)
    base = _run(ref(False), inputs, dout, lambda t: t, grads, **ref_kw)
    B, Hq, Lq, _ = q.shape
    Lk, Hkv = inputs["k"].shape[2], inputs["k"].shape[1]
    P = 0 if inputs["prefix_k"] is None else inputs["prefix_k"].shape[-2]
    terms = {"out": P + Lk, "dq": P + Lk, "dk": Hq // Hkv * Lq, "dv": Hq // Hkv * Lq,
             "dprefix_k": B * Hq // Hkv * Lq, "dprefix_v": B * Hq // Hkv * Lq}
    for name in ("out",) + GRAD_NAMES:
        if name in ours:
            result = compare(name, ours[name], truth[name], base[name], 2.0 if name == "out" else 3.0, terms[name])
            assert result.ok, str(result)
    return ours


TRAIN_CASES = {
    # name: (make_inputs kwargs, causal, features)
    "mha-padding": (dict(heads_q=4, heads_kv=4, len_q=17, len_k=17, prefix_len=13, padding="right"), False, {}),
    "gqa-causal": (dict(heads_q=6, heads_kv=2, len_q=19, len_k=19, prefix_len=5), True, {}),
    "mqa-causal-left": (dict(heads_q=4, heads_kv=1, len_q=9, len_k=13, prefix_len=1, padding="left"), True, {}),
    "no-prefix-empty-row": (dict(heads_q=4, heads_kv=2, len_q=7, len_k=11, prefix_len=0, padding="empty"), False,
                            {}),
    "causal-lq-above-lk": (dict(heads_q=4, heads_kv=2, len_q=13, len_k=7, prefix_len=0), True, {}),
    "window": (dict(heads_q=4, heads_kv=2, len_q=21, len_k=21, prefix_len=3, padding="random"), True,
               {"sliding_window": 4}),
    "alibi-left": (dict(heads_q=4, heads_kv=4, len_q=13, len_k=13, prefix_len=5, padding="left"), True,
                   {"alibi": True}),
    "alibi-gqa": (dict(heads_q=4, heads_kv=2, len_q=9, len_k=9, prefix_len=13), True, {"alibi": True}),
}


def _features(inputs, features):
    features = dict(features)
    if features.pop("alibi", False):
        features["alibi_slopes"] = bloom_slopes(inputs["q"].shape[1])
        if inputs["key_padding_mask"] is not None:
            features["alibi_offsets"] = -_leading_pads(inputs["key_padding_mask"])
    return features


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_eager_training_fused(paths, name, dtype):
    kwargs, causal, features = TRAIN_CASES[name]
    inputs = make_inputs(head_dim=32, dtype=dtype, **kwargs)
    features = _features(inputs, features)
    _check(inputs, causal=causal, **features)
    fused = dtype == torch.float32 or "alibi_slopes" not in features  # ALiBi in half precision: explicit path
    assert paths["fused"] == (1 if fused else 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_eager_training_dropout(paths, name, dtype):
    kwargs, causal, features = TRAIN_CASES[name]
    inputs = make_inputs(head_dim=32, dtype=dtype, **kwargs)
    _check(inputs, causal=causal, dropout_p=0.3, **_features(inputs, features))
    assert paths["dropout"] == 1


def test_eager_dropout_matches_the_custom_op_path(paths):
    """The same seed gives the same keep mask and the same result on the eager path and through the custom op
    (which regenerates the mask in its backward)."""
    inputs = make_inputs(heads_q=4, heads_kv=2, len_q=11, len_k=11, prefix_len=5, head_dim=16, padding="right")
    leaves = [inputs[n].detach().requires_grad_() for n in TENSOR_NAMES]
    results = []
    for return_lse in (False, True):
        torch.manual_seed(7)
        out = prefix_attention(*leaves, key_padding_mask=inputs["key_padding_mask"], dropout_p=0.4,
                               return_lse=return_lse, backend="torch")
        out = out[0] if return_lse else out
        results.append([out] + list(torch.autograd.grad(out.square().sum(), leaves)))
    assert paths["dropout"] == 1
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_eager_dropout_keeps_probabilities_not_scores():
    """What the dropout path holds for its backward: the fp32 probabilities and a bool keep mask per score, the
    inputs' K/V over [prefix ; input], nothing of the size of the scores beyond those two."""
    B, H, L, P, D = 2, 4, 32, 8, 16
    inputs = make_inputs(batch=B, heads_q=H, heads_kv=H, len_q=L, len_k=L, prefix_len=P, head_dim=D)
    leaves = [inputs[n].detach().requires_grad_() for n in TENSOR_NAMES]
    held = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: held.append(t) or t, lambda t: t):
        prefix_attention(*leaves, dropout_p=0.1, backend="torch")
    big = sorted(str(t.dtype) for t in held if t.numel() == B * H * L * (P + L))
    assert big == ["torch.bool", "torch.float32"], big


DECODE_CASES = {
    # name: (make_inputs kwargs, causal, features)
    "gqa-1": (dict(heads_q=8, heads_kv=2, len_q=1, len_k=37, prefix_len=13), True, {}),
    "mha-4-left": (dict(heads_q=4, heads_kv=4, len_q=4, len_k=29, prefix_len=1, padding="left"), True, {}),
    "mqa-16-random": (dict(heads_q=4, heads_kv=1, len_q=16, len_k=41, prefix_len=7, padding="random"), True, {}),
    "empty-cache-row": (dict(heads_q=4, heads_kv=2, len_q=1, len_k=23, prefix_len=5, padding="empty"), True, {}),
    "not-causal": (dict(heads_q=4, heads_kv=2, len_q=3, len_k=19, prefix_len=13, padding="right"), False, {}),
    "window": (dict(heads_q=4, heads_kv=2, len_q=2, len_k=31, prefix_len=5), True, {"sliding_window": 6}),
    "alibi-left": (dict(heads_q=4, heads_kv=4, len_q=1, len_k=27, prefix_len=13, padding="left"), True,
                   {"alibi": True}),
    "alibi-gqa-4": (dict(heads_q=8, heads_kv=2, len_q=4, len_k=19, prefix_len=5), True, {"alibi": True}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("name", sorted(DECODE_CASES))
def test_decode_merges_prefix_and_cache(paths, name, dtype):
    kwargs, causal, features = DECODE_CASES[name]
    inputs = make_inputs(batch=3, head_dim=32, dtype=dtype, **kwargs)
    features = _features(inputs, features)
    _check(inputs, grads=False, causal=causal, **features)
    merged = dtype == torch.float32 or "alibi_slopes" not in features
    assert paths["decode"] == (1 if merged else 0)


def test_decode_of_a_small_cache_takes_the_joined_path(paths, monkeypatch):
    """Below DECODE_MIN_CACHE the cache is joined to the prefix (one kernel call), with the same result."""
    inputs = make_inputs(batch=3, heads_q=4, heads_kv=2, len_q=1, len_k=17, prefix_len=5, head_dim=16,
                         padding="left")
    merged = _check(inputs, grads=False, causal=True)["out"]
    monkeypatch.setattr(torch_impl, "DECODE_MIN_CACHE", inputs["k"].numel() + 1)
    joined = _check(inputs, grads=False, causal=True)["out"]
    assert paths["decode"] == 1
    torch.testing.assert_close(joined, merged, rtol=1e-6, atol=1e-6)


def test_decode_with_a_bank_takes_the_joined_path(paths):
    inputs = make_inputs(batch=3, heads_q=4, heads_kv=2, len_q=1, len_k=17, prefix_len=5, head_dim=16)
    bank_k = torch.stack([inputs["prefix_k"], inputs["prefix_k"].flip(1)])
    bank_v = torch.stack([inputs["prefix_v"], -inputs["prefix_v"]])
    inputs = {**inputs, "prefix_k": bank_k, "prefix_v": bank_v}
    _check(inputs, grads=False, causal=True, prefix_index=torch.tensor([1, -1, 0]))
    assert paths["decode"] == 0


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_decode_never_reads_padded_cache_keys(paths, value):
    inputs = make_inputs(batch=2, heads_q=4, heads_kv=2, len_q=1, len_k=13, prefix_len=3, head_dim=16,
                         padding="left")
    clean = _check(inputs, grads=False, causal=True)["out"]
    mask = inputs["key_padding_mask"]
    k, v = inputs["k"].clone(), inputs["v"].clone()
    k[~mask[:, None, :].expand(k.shape[:3])] = float(value)
    v[~mask[:, None, :].expand(v.shape[:3])] = float(value)
    with torch.no_grad():
        out = prefix_attention(inputs["q"], k, v, inputs["prefix_k"], inputs["prefix_v"], causal=True,
                               key_padding_mask=mask, backend="torch")
    assert paths["decode"] == 2
    torch.testing.assert_close(out, clean, rtol=0, atol=0)


def test_decode_nan_query_gives_nan():
    inputs = make_inputs(batch=2, heads_q=4, heads_kv=2, len_q=1, len_k=13, prefix_len=3, head_dim=16)
    q = inputs["q"].clone()
    q[1, 2, 0, 5] = float("nan")
    with torch.no_grad():
        out = prefix_attention(q, inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"], causal=True,
                               backend="torch")
    bad = torch.zeros(out.shape[:3], dtype=torch.bool)
    bad[1, 2, 0] = True
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", ["v", "prefix_v"])
def test_decode_merge_carries_non_finite_values_as_the_formula_does(paths, where, value):
    """An Inf in a visible value makes that output column Inf, as softmax(S) @ V does (the LSE merge once computed
    it as a lerp, inf - inf = NaN); a NaN makes it NaN. Every other column stays as it was."""
    inputs = make_inputs(batch=2, heads_q=4, heads_kv=2, len_q=1, len_k=21, prefix_len=5, head_dim=16)
    t = inputs[where].clone()
    t[..., 3, 7] = value  # one key's (or prefix column's) value, for every batch row and kv head
    inputs = {**inputs, where: t}
    with torch.no_grad():
        out = prefix_attention(inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"],
                               causal=True, backend="torch")
        ref, _ = prefix_attention_ref(*(inputs[n].double() for n in ("q", "k", "v", "prefix_k", "prefix_v")),
                                      causal=True)
    assert paths["decode"] == 1
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.isinf(ref).any() or torch.isnan(ref).any()
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite].float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.sign(out[torch.isinf(ref)]), torch.sign(ref[torch.isinf(ref)]).float())


def test_masks_within_a_scope_see_in_place_edits(paths):
    """Within a memo scope the mask made from a padding mask is reused by the next call with the same tensor, but
    an in-place edit (a version bump) makes it again; outside a scope nothing is kept."""
    inputs = make_inputs(batch=2, heads_q=4, heads_kv=2, len_q=17, len_k=17, prefix_len=0, head_dim=16,
                         padding="right")  # more queries than a decode step: the fused kernel serves
    args = [inputs[n] for n in ("q", "k", "v")]
    mask = inputs["key_padding_mask"].clone()

    def ours():
        with torch.no_grad():
            return prefix_attention(*args, key_padding_mask=mask, backend="torch")

    def want():
        return prefix_attention_ref(*args, key_padding_mask=mask)[0]

    memo = torch_impl._masks.memo
    with memo_scope():
        torch.testing.assert_close(ours(), want())
        hits = memo.hits
        torch.testing.assert_close(ours(), want())
        assert memo.hits == hits + 1
        mask[1, :] = True  # in place: the version moves
        torch.testing.assert_close(ours(), want())
        assert memo.hits == hits + 1
    mask.data[0, :] = True  # behind the version counter's back, outside any scope
    torch.testing.assert_close(ours(), want())


def test_size_only_masks_are_shared_and_never_written():
    """The causal mask of a size is made once and handed to every call of that size unchanged."""
    inputs = make_inputs(batch=2, heads_q=4, heads_kv=2, len_q=9, len_k=9, prefix_len=4, head_dim=16)
    leaves = [inputs[n].detach().requires_grad_() for n in TENSOR_NAMES]
    torch_impl._masks.sized.clear()
    for _ in range(2):
        out = prefix_attention(*leaves, causal=True, backend="torch")
        out.sum().backward()
    (mask, empty), = torch_impl._masks.sized.values()
    assert empty is None
    want = torch.zeros(1, 1, 2 * 9, 4 + 9)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    want[..., 4:] = torch.zeros(9, 9).masked_fill(~causal, float("-inf")).repeat(2, 1)
    assert torch.equal(mask, want)


def test_checks_remembered_per_kind_of_call_still_catch_bad_calls():
    """check_inputs remembers the kinds of call that passed; a call differing in any checked size, dtype, device,
    flag or scalar is checked again, and a remembered kind gets its scalars normalised as the check does."""
    from prefix_kernels.ops.attention.inputs import check_inputs

    q, k = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 5, 16)
    for _ in range(2):
        spec, features = check_inputs(q, k, k, causal=True, dropout_p=0, softcap=None)
        assert features.dropout_p == 0.0 and isinstance(features.dropout_p, float)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        check_inputs(q, k, k, causal=True, dropout_p=1, softcap=None)
    with pytest.raises(TypeError, match="causal must be a bool"):
        check_inputs(q, k, k, causal=1, dropout_p=0, softcap=None)
    with pytest.raises(TypeError, match="k.dtype"):
        check_inputs(q, k.double(), k, causal=True, dropout_p=0, softcap=None)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        check_inputs(q, k, k, causal=True, alibi_slopes=torch.ones(3))
    slopes = torch.ones(4)
    assert check_inputs(q, k, k, causal=True, alibi_slopes=slopes)[1].alibi_slopes is slopes
    other = torch.ones(4)
    assert check_inputs(q, k, k, causal=True, alibi_slopes=other)[1].alibi_slopes is other


@pytest.fixture
def lean(monkeypatch):
    """Counts the calls the lean decode lane of ``infer`` served (one SDPA over the broadcast prefix, no mask)."""
    seen = {"lean": 0}
    sdpa = torch_impl.F.scaled_dot_product_attention

    def counted(*a, **k):
        if k.get("attn_mask") is None:
            seen["lean"] += 1
        return sdpa(*a, **k)

    monkeypatch.setattr(torch_impl.F, "scaled_dot_product_attention", counted)
    return seen


LEAN_CASES = {
    # name: (make_inputs kwargs, causal, lean lane expected)
    "gqa-one-query-causal": (dict(heads_q=8, heads_kv=2, len_q=1, len_k=23, prefix_len=7), True, True),
    "mha-four-queries-bidirectional": (dict(heads_q=4, heads_kv=4, len_q=4, len_k=9, prefix_len=3), False, True),
    "mqa-no-prefix": (dict(heads_q=4, heads_kv=1, len_q=1, len_k=11, prefix_len=0), True, True),
    "four-queries-causal": (dict(heads_q=4, heads_kv=2, len_q=4, len_k=9, prefix_len=3), True, False),
    "padded-cache": (dict(heads_q=4, heads_kv=2, len_q=1, len_k=13, prefix_len=5, padding="left"), True, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("name", sorted(LEAN_CASES))
def test_inference_lane_matches_the_reference(lean, name, dtype):
    """Output-only eager calls go through ``infer``: the lean lane where every key is visible and no feature is on,
    forward's paths otherwise; both agree with the fp64 reference."""
    kwargs, causal, expect_lean = LEAN_CASES[name]
    inputs = make_inputs(batch=3, head_dim=32, dtype=dtype, **kwargs)
    out = _check(inputs, grads=False, causal=causal)["out"]
    assert (lean["lean"] > 0) == expect_lean
    assert out.dtype == dtype and out.shape == inputs["q"].shape


def test_inference_lane_keeps_q_layout_and_a_full_padding_mask_costs_nothing(lean):
    """HF passes q as a transposed view and, for an unpadded batch, a padding mask of all True: the lane serves it,
    and the output is laid out like q wherever a dim has more than one element."""
    inputs = make_inputs(batch=2, heads_q=4, heads_kv=2, len_q=3, len_k=10, prefix_len=4, head_dim=16)
    q = inputs["q"].transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, Lq, D] over [B, Lq, Hq, D]
    full = torch.ones(2, 10, dtype=torch.bool)
    with torch.no_grad():
        out = prefix_attention(q, inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"],
                               key_padding_mask=full, backend="torch")
    assert lean["lean"] == 1
    assert out.stride() == q.stride()
    ref, _ = prefix_attention_ref(q.double(), inputs["k"].double(), inputs["v"].double(),
                                  inputs["prefix_k"].double(), inputs["prefix_v"].double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_inference_lane_propagates_nan_queries(lean):
    inputs = make_inputs(batch=2, heads_q=4, heads_kv=2, len_q=2, len_k=9, prefix_len=3, head_dim=16)
    q = inputs["q"].clone()
    q[0, 3, 1, 2] = float("nan")
    with torch.no_grad():
        out = prefix_attention(q, inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"], backend="torch")
    assert lean["lean"] == 1
    bad = torch.zeros(out.shape[:3], dtype=torch.bool)
    bad[0, 3, 1] = True
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()


def test_calls_with_every_option_off_share_no_features():
    """check_inputs hands the shared NO_FEATURES to a call whose options are all off (HF passes softcap=None,
    dropout_p=0.0, ...), first call and repeats alike; an option that is on still gets its own record."""
    from prefix_kernels.ops.attention import check_inputs
    from prefix_kernels.ops.attention.inputs import NO_FEATURES

    inputs = make_inputs(batch=2, heads_q=4, heads_kv=2, len_q=1, len_k=9, prefix_len=3, head_dim=16)
    args = [inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    off = {"softcap": None, "dropout_p": 0.0, "sliding_window": None, "prefix_index": None}
    for _ in range(2):
        _, features = check_inputs(*args, causal=True, **off)
        assert features is NO_FEATURES
    _, features = check_inputs(*args, causal=True, **{**off, "softcap": 30.0})
    assert features is not NO_FEATURES and features.softcap == 30.0
    with pytest.raises(ValueError, match="softcap"):
        check_inputs(*args, causal=True, **{**off, "softcap": -1.0})


BIAS_CASES = {
    # name: (make_inputs kwargs, causal, bias dims kept (B, H, L = query, C = column), dropout_p)
    "full-causal-padded": (dict(heads_q=4, heads_kv=2, len_q=9, len_k=9, prefix_len=4, padding="right"), True,
                           "BHLC", 0.0),
    "heads-columns-dropout": (dict(heads_q=4, heads_kv=4, len_q=7, len_k=11, prefix_len=3), False, "HC", 0.25),
    "batch-only-gqa-dropout": (dict(heads_q=6, heads_kv=2, len_q=5, len_k=8, prefix_len=6, padding="left"), True,
                               "BLC", 0.3),
    "no-prefix": (dict(heads_q=4, heads_kv=2, len_q=6, len_k=10, prefix_len=0), False, "BHLC", 0.0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("name", sorted(BIAS_CASES))
def test_eager_training_with_a_bias(paths, name, dtype):
    """attn_bias (T5's position bias) in eager CPU training, with and without dropout: the fused kernels (fp32) or
    the dropout path take it in their mask; out and all five gradients agree with the reference, which adds the
    same bias. (Before, the dropout path dropped the bias without a word.)"""
    kwargs, causal, dims, dropout_p = BIAS_CASES[name]
    inputs = make_inputs(batch=3, head_dim=16, dtype=dtype, **kwargs)
    B, Hq, Lq, _ = inputs["q"].shape
    P = 0 if inputs["prefix_k"] is None else inputs["prefix_k"].shape[-2]
    full = (B, Hq, Lq, P + inputs["k"].shape[2])
    shape = tuple(n if c in dims else 1 for n, c in zip(full, "BHLC", strict=True))
    bias = 2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(7))
    bias = bias.masked_fill(torch.rand(shape, generator=torch.Generator().manual_seed(8)) < 0.2, float("-inf"))
    features = {"attn_bias": bias}
    if dropout_p > 0:
        features["dropout_p"] = dropout_p
    ours = _check(inputs, grads=True, causal=causal, **features)
    served = "dropout" if dropout_p > 0 else "fused"
    assert paths[served] == (1 if dropout_p > 0 or dtype == torch.float32 else 0)
    without = _run(lambda *a, **k: prefix_attention(*a, backend="torch", **k), inputs, torch.ones_like(inputs["q"]),
                   lambda t: t, False, causal=causal, **{n: f for n, f in features.items() if n != "attn_bias"})
    if dropout_p == 0:
        assert not torch.allclose(ours["out"], without["out"])  # the bias is not ignored


def test_alibi_bias_of_a_decode_step_follows_its_offsets_and_selection():
    """The ALiBi bias of the few-query path is shared by calls of the same sizes and values: calls that differ only
    in their offsets, or in the bank rows' prefix lengths, each still match the reference (inside a memo scope,
    where the shared bias is kept)."""
    inputs = make_inputs(batch=3, heads_q=4, heads_kv=2, len_q=1, len_k=12, prefix_len=5, head_dim=16)
    slopes = bloom_slopes(4)
    with memo_scope():
        for offsets in (torch.tensor([0, 0, 0]), torch.tensor([0, -3, -1]), torch.tensor([0, 0, 0])):
            _check(inputs, grads=False, causal=True, alibi_slopes=slopes, alibi_offsets=offsets)
        bank_k = torch.stack([inputs["prefix_k"], inputs["prefix_k"].flip(1)])
        bank_v = torch.stack([inputs["prefix_v"], -inputs["prefix_v"]])
        bank = {**inputs, "prefix_k": bank_k, "prefix_v": bank_v}
        for lengths in (torch.tensor([5, 2]), torch.tensor([1, 4])):
            _check(bank, grads=False, causal=True, alibi_slopes=slopes, prefix_index=torch.tensor([1, 0, -1]),
                   prefix_lengths=lengths)

"""Planned calls (ops/attention/plan.py): a plan serves the calls that match it with prefix_attention's own result,
declines every call that differs in anything but the key length, and is never made for calls it cannot serve."""

import pytest
import torch

from prefix_kernels import plan_prefix_attention, prefix_attention
from prefix_kernels.ops.attention import backends
from prefix_kernels.ops.attention.reference import prefix_attention_ref
from prefix_kernels.ops.memo import memo_scope
from prefix_kernels.testing import compare


def _call(Lk=9, B=2, Hq=4, Hkv=2, Lq=1, P=5, D=16, dtype=torch.float32, seed=0, padded=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q = rnd(B, Lq, Hq, D).transpose(1, 2)  # HF's layout: a transposed view
    k, v = rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D)
    pk, pv = rnd(Hkv, P, D), rnd(Hkv, P, D)
    mask = None
    if padded:
        mask = torch.ones(B, Lk, dtype=torch.bool)
        mask[0, :2] = False
    return q, k, v, pk, pv, mask


def _options(mask, **extra):
    return {**dict(causal=True, key_padding_mask=mask, softmax_scale=0.25, dropout_p=0.0, sliding_window=None,
                   softcap=None, prefix_index=None, prefix_lengths=None, backend="torch"), **extra}


CASES = {
    "gqa decode": ({}, {}),
    "mha, 3 queries": ({"Hkv": 4, "Lq": 3}, {}),
    "padded keys": ({"padded": True}, {}),
    "no prefix": ({"P": 0}, {}),
    "softcap": ({}, {"softcap": 5.0}),
    "window": ({"Lq": 2}, {"sliding_window": 4}),
    "alibi": ({"Hkv": 4}, {"alibi": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_plan_serves_later_calls_with_prefix_attentions_result(case):
    """Planned on a cache of 9 keys, run on caches of 10 and 23 (a decode loop's next steps): exactly what
    prefix_attention returns for the same call, and that within the tolerance rule of the fp32 reference."""
    sizes, extra = CASES[case]
    P = sizes.get("P", 5)

    def options(mask, Lk):
        more = {k: v for k, v in extra.items() if k != "alibi"}
        if extra.get("alibi"):
            more["alibi_slopes"] = torch.linspace(0.5, 0.05, 4)
            more["alibi_offsets"] = torch.tensor([0, -Lk % 3])
        return _options(mask, **more)

    with torch.no_grad(), memo_scope():
        q, k, v, pk, pv, mask = _call(**sizes)
        if P == 0:
            pk = pv = None
        plan = plan_prefix_attention(q, k, v, pk, pv, **options(mask, 9))
        assert plan is not None and plan.backend == "torch"
        for Lk in (10, 23):
            q, k, v, pk2, pv2, mask = _call(Lk=Lk, seed=Lk, **sizes)
            pk, pv = (None, None) if P == 0 else (pk2, pv2)
            opts = options(mask, Lk)
            got = plan.run(q, k, v, pk, pv, **opts)
            assert got is not None
            expected = prefix_attention(q, k, v, pk, pv, **opts)
            assert torch.equal(got, expected) and got.stride() == expected.stride()
            ref_opts = {n: x for n, x in opts.items() if n not in ("backend", "dropout_p")}
            ref, _ = prefix_attention_ref(q, k, v, pk, pv, **ref_opts)
            base, _ = prefix_attention_ref(q, k, v, pk, pv, upcast=False, **ref_opts)
            result = compare("out", got, ref, base, 2.0, (P + Lk))
            assert result.ok, str(result)
    assert plan.runs == 2


def _planned(**sizes):
    q, k, v, pk, pv, mask = _call(**sizes)
    with torch.no_grad():
        plan = plan_prefix_attention(q, k, v, pk, pv, **_options(mask))
    assert plan is not None
    return plan


DECLINED = {
    "query heads": lambda c, o: ((c[0].repeat(1, 2, 1, 1), *c[1:]), o),
    "head dim": lambda c, o: ((*(t[..., :8] for t in c[:5]),), o),
    "batch": lambda c, o: ((*(t[:1] for t in c[:3]), *c[3:5]), o),
    "dtype": lambda c, o: ((*(t.double() for t in c[:5]),), o),
    "kv heads": lambda c, o: ((c[0], c[1][:, :1], c[2][:, :1], c[3][:1], c[4][:1]), o),
    "prefix length": lambda c, o: ((*c[:3], c[3][:, :2], c[4][:, :2]), o),
    "no prefix": lambda c, o: ((*c[:3], None, None), o),
    "v of another length": lambda c, o: ((c[0], c[1], c[2][:, :, :4], *c[3:5]), o),
    "a padding mask": lambda c, o: (c[:5], {**o, "key_padding_mask": torch.ones(2, 9, dtype=torch.bool)}),
    "causal": lambda c, o: (c[:5], {**o, "causal": False}),
    "scale": lambda c, o: (c[:5], {**o, "softmax_scale": 0.5}),
    "scale type": lambda c, o: (c[:5], {**o, "softmax_scale": 1}),
    "softcap": lambda c, o: (c[:5], {**o, "softcap": 3.0}),
    "window type": lambda c, o: (c[:5], {**o, "sliding_window": 4}),
    "backend name": lambda c, o: (c[:5], {**o, "backend": "auto"}),
    "an option left out": lambda c, o: (c[:5], {n: x for n, x in o.items() if n != "softcap"}),
    "an option more": lambda c, o: (c[:5], {**o, "alibi_slopes": torch.ones(4)}),
    "a list for the prefix": lambda c, o: ((*c[:3], c[3].tolist(), c[4]), o),
    "a list for q": lambda c, o: ((c[0].tolist(), *c[1:5]), o),
}


@pytest.mark.parametrize("change", list(DECLINED))
def test_a_plan_declines_a_call_that_differs_in_more_than_the_key_length(change):
    plan = _planned()
    call, options = DECLINED[change](_call()[:5], _options(None))
    with torch.no_grad():
        assert plan.run(*call, **options) is None
        assert plan.run(*_call()[:5], **_options(None)) is not None  # the plan still holds for its own kind
    assert plan.runs == 1


def test_a_plan_declines_when_gradients_are_wanted_or_the_call_is_traced():
    plan = _planned()
    q, k, v, pk, pv, _ = _call()
    assert plan.run(q.requires_grad_(), k, v, pk, pv, **_options(None)) is None  # grad mode on, q wants one
    with torch.no_grad():
        assert plan.run(q, k, v, pk, pv, **_options(None)) is not None  # no_grad: the same tensors serve
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = q.detach()
    mode = FakeTensorMode()
    fake = [mode.from_tensor(t) for t in (q, k, v, pk, pv)]
    with torch.no_grad():
        assert plan.run(*fake, **_options(None)) is None  # a tensor subclass
        with mode:
            assert plan.run(q, k, v, pk, pv, **_options(None)) is None  # a dispatch mode active


def test_a_plan_follows_the_environment_and_the_dispatcher(monkeypatch):
    """A backend forced by the environment, a wrapper set on backends.select (to watch the calls) and a newly
    registered backend each make the plan decline, so the call is dispatched again in full."""
    args = _call()[:5]
    monkeypatch.delenv("PREFIX_KERNELS_BACKEND", raising=False)
    plan = _planned()
    with torch.no_grad():
        monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "triton")
        assert plan.run(*args, **_options(None)) is None
        monkeypatch.delenv("PREFIX_KERNELS_BACKEND")
        assert plan.run(*args, **_options(None)) is not None
        seen = []
        original = backends.select
        monkeypatch.setattr(backends, "select", lambda spec, requested="auto": seen.append(spec) or original(
            spec, requested))
        assert plan.run(*args, **_options(None)) is None
        prefix_attention(*args, **_options(None))
        assert len(seen) == 1
        monkeypatch.setattr(backends, "select", original)
        assert plan.run(*args, **_options(None)) is not None
        generation = backends.DISPATCHER.generation
        backends.DISPATCHER.register(backends.get("torch"))  # re-registering counts as a change of backends
        assert backends.DISPATCHER.generation == generation + 1
        assert plan.run(*args, **_options(None)) is None


def test_the_environment_is_read_once_per_memo_scope(monkeypatch):
    """Inside a scope (a model's forward) the plan reads the environment once; the next scope reads it again."""
    args = _call()[:5]
    monkeypatch.delenv("PREFIX_KERNELS_BACKEND", raising=False)
    plan = _planned()
    with torch.no_grad():
        with memo_scope():
            assert plan.run(*args, **_options(None)) is not None
            monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "triton")
            assert plan.run(*args, **_options(None)) is not None  # the scope's promise: unchanged within it
        with memo_scope():
            assert plan.run(*args, **_options(None)) is None


@pytest.mark.parametrize("what", ["gradients", "bank", "lengths", "dropout", "attn_bias", "empty prefix"])
def test_calls_a_plan_cannot_serve_are_not_planned(what):
    q, k, v, pk, pv, _ = _call()
    options = _options(None)
    grad = torch.enable_grad() if what == "gradients" else torch.no_grad()
    if what == "gradients":
        q = q.detach().requires_grad_()
    elif what == "bank":
        pk, pv = pk.unsqueeze(0), pv.unsqueeze(0)
        options["prefix_index"] = torch.tensor([0, -1])
    elif what == "lengths":
        pk, pv = pk.unsqueeze(0), pv.unsqueeze(0)
        options.update(prefix_index=torch.tensor([0, 0]), prefix_lengths=torch.tensor([3]))
    elif what == "dropout":
        options["dropout_p"] = 0.1
    elif what == "attn_bias":
        options["attn_bias"] = torch.zeros(1, 4, 1, 5 + 9)
    else:
        pk, pv = pk[:, :0], pv[:, :0]
    with grad:
        assert plan_prefix_attention(q, k, v, pk, pv, **options) is None
        prefix_attention(q, k, v, pk, pv, **options)  # while the call itself is served


def test_planning_a_bad_call_raises_as_the_op_does():
    q, k, v, pk, pv, _ = _call()
    with torch.no_grad():
        with pytest.raises(ValueError, match="head_dim mismatch"):
            plan_prefix_attention(q, k[..., :8], v[..., :8], pk, pv, **_options(None))
        with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
            plan_prefix_attention(q, k, v, pk, pv, **_options(torch.ones(2, 9)))
        with pytest.raises(TypeError, match="prefix_k must be a torch.Tensor"):
            plan_prefix_attention(q, k, v, pk.tolist(), pv, **_options(None))


def test_a_backend_without_an_output_only_entry_is_planned_through_its_forward():
    """The Triton backend (here in the interpreter) has no ``infer``: its plan runs its forward without the LSE, with
    prefix_attention's result, within the tolerance rule of the fp32 reference."""
    with torch.no_grad():
        q, k, v, pk, pv, mask = _call(padded=True)
        options = {**_options(mask), "backend": "triton"}
        plan = plan_prefix_attention(q, k, v, pk, pv, **options)
        assert plan is not None and plan.backend == "triton"
        q, k, v, pk, pv, mask = _call(Lk=12, seed=3, padded=True)
        options = {**_options(mask), "backend": "triton"}
        got = plan.run(q, k, v, pk, pv, **options)
        assert got is not None and plan.runs == 1
        assert torch.equal(got, prefix_attention(q, k, v, pk, pv, **options))
        ref_opts = {n: x for n, x in options.items() if n not in ("backend", "dropout_p")}
        ref, _ = prefix_attention_ref(q, k, v, pk, pv, **ref_opts)
        base, _ = prefix_attention_ref(q, k, v, pk, pv, upcast=False, **ref_opts)
        result = compare("out", got, ref, base, 2.0, 5 + 12)
        assert result.ok, str(result)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_plan_crosses_the_merge_threshold_with_prefix_attentions_result(dtype):
    """The torch backend specialises a plan of a decode step where every key is visible (one query, no padding
    mask): one plan serves caches below and past ``DECODE_MIN_CACHE`` (one SDPA over [prefix ; cache], then the LSE
    merge), each exactly as prefix_attention serves it, within the tolerance rule; a NaN query gives NaN rows."""
    from prefix_kernels.ops.attention import torch_impl

    B, Hkv, D = 2, 2, 16
    threshold = torch_impl.DECODE_MIN_CACHE // (B * Hkv * D)  # cache length from which the merge serves
    with torch.no_grad(), memo_scope():
        q, k, v, pk, pv, _ = _call(Lk=9, B=B, Hkv=Hkv, D=D, dtype=dtype)
        plan = plan_prefix_attention(q, k, v, pk, pv, **_options(None))
        assert plan is not None and isinstance(plan._call, torch_impl._DecodeStep)
        for Lk in (10, threshold - 1, threshold, threshold + 7):
            q, k, v, pk, pv, _ = _call(Lk=Lk, B=B, Hkv=Hkv, D=D, dtype=dtype, seed=Lk)
            got = plan.run(q, k, v, pk, pv, **_options(None))
            expected = prefix_attention(q, k, v, pk, pv, **_options(None))
            assert got is not None and torch.equal(got, expected) and got.stride() == expected.stride()
            ref_opts = {n: x for n, x in _options(None).items() if n not in ("backend", "dropout_p")}
            ref, _ = prefix_attention_ref(q, k, v, pk, pv, **ref_opts)
            base, _ = prefix_attention_ref(q, k, v, pk, pv, upcast=False, **ref_opts)
            result = compare("out", got, ref, base, 2.0, 5 + Lk)
            assert result.ok, f"Lk={Lk}: {result}"
        for Lk in (10, threshold + 7):
            q, k, v, pk, pv, _ = _call(Lk=Lk, B=B, Hkv=Hkv, D=D, dtype=dtype, seed=1)
            q = q.clone()
            q[1, 3, 0, 5] = float("nan")
            got = plan.run(q, k, v, pk, pv, **_options(None))
            assert got[1, 3].isnan().all() and not got[0].isnan().any() and not got[1, :3].isnan().any()
        # the same prefix tensors again (the broadcast made once is reused), then written in place, then another batch
        q, k, v, pk, pv, _ = _call(Lk=11, B=B, Hkv=Hkv, D=D, dtype=dtype, seed=2)
        for step in range(3):
            if step == 2:
                pk.mul_(-1.5)
            got = plan.run(q, k, v, pk, pv, **_options(None))
            assert got is not None and torch.equal(got, prefix_attention(q, k, v, pk, pv, **_options(None)))
        q1, k1, v1 = q[:1], k[:1], v[:1]
        assert plan.run(q1, k1, v1, pk, pv, **_options(None)) is None  # (another batch: not this plan's call)
        plan1 = plan_prefix_attention(q1, k1, v1, pk, pv, **_options(None))
        assert torch.equal(plan1.run(q1, k1, v1, pk, pv, **_options(None)),
                           prefix_attention(q1, k1, v1, pk, pv, **_options(None)))
    assert plan.runs == 9


@pytest.mark.parametrize("what", ["padded keys", "three causal queries", "alibi"])
def test_a_plan_of_a_call_with_a_mask_or_a_feature_is_not_specialised(what):
    """Only the decode step where every key is visible takes the specialised call; the others keep the backend's
    output-only entry (which decides per call)."""
    from prefix_kernels.ops.attention import torch_impl

    sizes = {"padded keys": {"padded": True}, "three causal queries": {"Lq": 3}, "alibi": {"Hkv": 4}}[what]
    extra = {"alibi_slopes": torch.linspace(0.5, 0.05, 4), "alibi_offsets": torch.tensor([0, 1])} \
        if what == "alibi" else {}
    with torch.no_grad():
        q, k, v, pk, pv, mask = _call(**sizes)
        plan = plan_prefix_attention(q, k, v, pk, pv, **_options(mask, **extra))
    assert plan is not None and plan._call is torch_impl.infer

"""The per-call path of prefix_attention: the eager inference shortcut past the custom op, the cached
backend decision, the feature record every part reads, and the visibility rule the torch backend and the
reference share."""

import inspect
import warnings

import pytest
import torch

from prefix_kernels import backends, prefix_attention
from prefix_kernels.ops import dispatch
from prefix_kernels.ops.attention import backends as attention_backends
from prefix_kernels.ops.attention import features as record
from prefix_kernels.ops.attention import function
from prefix_kernels.ops.attention.inputs import AttentionSpec
from prefix_kernels.ops.attention.reference import visibility_mask
from prefix_kernels.testing import make_inputs


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls that go through the custom op."""
    calls = []
    real = function.attention_fwd

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(function, "attention_fwd", counting)
    return calls


def _args(**kw):
    inputs = make_inputs(len_q=kw.pop("len_q", 1), len_k=9, prefix_len=4, head_dim=16, heads_q=4, heads_kv=2,
                         padding="left", dtype=torch.float32)
    return (inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"]), \
        dict(causal=True, key_padding_mask=inputs["key_padding_mask"])


def test_eager_inference_skips_the_custom_op_and_matches_it(op_calls):
    args, kw = _args()
    with torch.no_grad():
        fast = prefix_attention(*args, **kw, return_lse=True, backend="torch")
    assert op_calls == []
    through_op = function.attention_fwd(*args, kw["key_padding_mask"], True, 16**-0.5, "torch", True,
                                        *record.NO_FEATURES.op_args())
    torch.testing.assert_close(fast, through_op, rtol=0, atol=0)


def test_calls_that_need_autograd_or_a_tracer_go_through_the_custom_op(op_calls):
    args, kw = _args(len_q=3)
    args[0].requires_grad_()
    # Eager training on the CPU: the torch backend runs its own autograd.Function, past the custom op ...
    prefix_attention(*args, **kw, backend="torch").sum().backward()
    assert len(op_calls) == 0
    # ... but not when the LSE is asked for (its gradient needs the op's backward).
    prefix_attention(*args, **kw, return_lse=True, backend="torch")[0].sum().backward()
    assert len(op_calls) == 1

    from torch._subclasses.fake_tensor import FakeTensorMode

    plain = [a.detach() for a in args]
    mode = FakeTensorMode()
    fake = [mode.from_tensor(a) for a in plain]
    with mode, torch.no_grad():
        out = prefix_attention(*fake, causal=True, backend="torch")
    assert len(op_calls) == 2 and out.shape == args[0].shape

    from torch.fx.experimental.proxy_tensor import make_fx

    def f(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, causal=True, backend="torch")

    with torch.no_grad():
        graph = make_fx(f)(*(a.detach() for a in args))
    assert "prefix_kernels.attention_fwd" in graph.code


def test_compile_fullgraph_in_inference():
    torch._dynamo.reset()
    args, kw = _args()

    def f(q, k, v, pk, pv, mask):
        return prefix_attention(q, k, v, pk, pv, causal=True, key_padding_mask=mask, backend="torch")

    with torch.no_grad():
        expected = f(*args, kw["key_padding_mask"])
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args, kw["key_padding_mask"])
    torch.testing.assert_close(got, expected)


def test_backend_decision_is_cached_and_follows_the_environment(monkeypatch):
    args, _ = _args()
    decisions = attention_backends.DISPATCHER._decisions
    decisions.clear()
    assert backends.select(_spec(args), "auto").name == backends.select(_spec(args), "auto").name
    assert len(decisions) == 1
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.select(_spec(args), "auto").name == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "no-such-backend")
    with pytest.raises(ValueError, match="unknown backend 'no-such-backend'"):
        backends.select(_spec(args), "auto")


class _Picky(dispatch.Backend):
    name = "picky"

    def input_reasons(self, spec):
        return ["it refuses everything"]


class _Any(dispatch.Backend):
    name = "any"


def test_cached_fallback_warns_again_after_the_warning_set_is_cleared():
    # A backend ahead of another that refuses this input: auto skips it with a warning, every time the
    # warning set is fresh, whether or not the decision came from the cache.
    op = dispatch.Dispatcher("test op", AttentionSpec, ("PREFIX_KERNELS_TEST_BACKEND",))
    op.register(_Picky())
    op.register(_Any())
    args, _ = _args()
    for _ in range(2):
        dispatch.forget_warnings()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert op.select(_spec(args), "auto").name == "any"
        assert any("test op: using the 'any' backend; skipped 'picky' because it refuses everything"
                   in str(w.message) for w in caught)
    assert len(op._decisions) == 1
    with pytest.raises(dispatch.BackendUnavailableError, match="backend 'picky' .* cannot serve this input:\n"
                                                               "  - it refuses everything"):
        op.select(_spec(args), "picky")
    # "cuda" is a backend of the attention op, not of this one.
    with pytest.raises(dispatch.BackendUnavailableError, match="'cuda' .* has no kernel; this op's backends are "
                                                               "\\['picky', 'any'\\]"):
        op.select(_spec(args), "cuda")
    op.unregister("picky")
    assert op.names() == ["any"]


def _spec(args):
    from prefix_kernels.ops.attention import check_inputs

    spec, _ = check_inputs(*args, causal=True)
    return spec


def test_every_public_option_is_a_documented_keyword():
    """The signatures of prefix_attention and the reference name every public option of the record, and the
    docstring documents each one."""
    names = [o.name for o in record.PUBLIC]
    for fn in (prefix_attention, record_reference()):
        params = inspect.signature(fn).parameters
        assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in names)
    for name in names:
        assert f"\n        {name}" in prefix_attention.__doc__ or f", {name}:" in prefix_attention.__doc__, name
    args, _ = _args()
    with pytest.raises(TypeError, match="unexpected keyword argument 'softcapp'"):
        prefix_attention(*args, softcapp=3.0)


def record_reference():
    from prefix_kernels.ops.attention.reference import prefix_attention_ref

    return prefix_attention_ref


def test_features_pack_into_the_custom_ops_and_back():
    """The record gives the custom ops' schemas, and Features travel through them in its order."""
    schema = str(function.attention_fwd._opoverload._schema)
    for o in record.OPTIONS:
        assert f"{o.schema} {o.name}" in schema
    f = record.Features(alibi_slopes=torch.ones(2), dropout_p=0.25, sliding_window=3, prefix_index=torch.zeros(1))
    back = record.Features.from_op_args(f.op_args())
    assert back.dropout_p == 0.25 and back.sliding_window == 3 and back.alibi_slopes is f.alibi_slopes
    assert back.active == ("alibi", "dropout", "sliding_window", "prefix_bank")
    assert back.scores == ("alibi", "dropout", "sliding_window")
    assert back.without_prefix().active == ("alibi", "dropout", "sliding_window")
    assert back.drawn(torch.device("cpu")).dropout_seed.dtype == torch.int64
    assert record.NO_FEATURES.drawn(torch.device("cpu")).dropout_seed is None


def test_triton_kernels_take_the_feature_arguments_in_the_records_order():
    """The launchers pass the feature pointers positionally in the record's order, and scalars and flags by
    name: each kernel's feature pointers must sit together in that order, and every flag it has must be one a
    feature or the launcher sets."""
    from prefix_kernels.ops.attention import triton_kernels as kern

    order = [o.pointer[0] for o in record.OPTIONS if o.pointer]
    launched = {"IS_CAUSAL", "HAS_KPM", "STORE_LSE", "HAS_DLSE", *record.KERNEL_FLAGS}
    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_prefix_dkdv_kernel"):
        args = getattr(kern, name).arg_names
        taken = [a for a in args if a in order]
        assert taken == [p for p in order if p in taken], name
        first = args.index(taken[0])
        assert args[first:first + len(taken)] == taken, name
        assert {a for a in args if a.startswith("HAS_") or a.startswith("IS_")} <= launched, name
    pointers, scalars, flags = record.Features(softcap=2.0, prefix_lengths=torch.ones(1)).kernel_args(
        kern._attn_bwd_prefix_dkdv_kernel, torch.zeros(1))
    assert [p.shape for p in pointers] == [(1,), (1,), (1,), (1,)] and pointers[2] is not pointers[0]
    bias_strides = dict.fromkeys(("stride_bias_b", "stride_bias_h", "stride_bias_m", "stride_bias_n"), 0)
    assert scalars == {"softcap": 2.0, "dropout_p": 0.0, **bias_strides}
    assert flags == {"HAS_ALIBI": False, "HAS_DROPOUT": False, "HAS_SOFTCAP": True, "HAS_INDEX": False,
                     "HAS_LENGTHS": True, "HAS_BIAS": False}
    # A tensor option's strides: 0 on its size-1 dims (the kernels broadcast them).
    bias = torch.zeros(3, 1, 5, 7)[:, :, :, :6]
    _, scalars, _ = record.Features(attn_bias=bias).kernel_args(kern._attn_bwd_prefix_dkdv_kernel, torch.zeros(1))
    assert [scalars[n] for n in bias_strides] == [35, 0, 7, 1]


def _brute_force(len_q, len_k, P, causal, kpm, window):
    B = 1 if kpm is None else kpm.shape[0]
    m = torch.zeros(B, 1, len_q, P + len_k, dtype=torch.bool)
    for b in range(B):
        for i in range(len_q):
            m[b, 0, i, :P] = True
            for j in range(len_k):
                ok = kpm is None or bool(kpm[b, j])
                if causal:
                    diag = i + len_k - len_q
                    ok = ok and j <= diag and (window is None or j > diag - window)
                m[b, 0, i, P + j] = ok
    return m


@pytest.mark.parametrize("len_q,len_k,causal,window", [
    (1, 6, True, None), (1, 6, True, 6), (1, 6, True, 3), (1, 6, False, None), (3, 6, True, None),
    (3, 6, True, 2), (5, 6, False, None), (7, 4, True, None)])
@pytest.mark.parametrize("padded", [False, True])
def test_visibility_mask_follows_the_contract(len_q, len_k, causal, window, padded):
    kpm = torch.tensor([[True] * len_k, [False] * 2 + [True] * (len_k - 2)]) if padded else None
    got = visibility_mask(len_q, len_k, 2, causal=causal, key_padding_mask=kpm, device=torch.device("cpu"),
                          sliding_window=window)
    want = _brute_force(len_q, len_k, 2, causal, kpm, window)
    if got is None:
        assert bool(want.all())
    else:
        assert torch.equal(got.expand(want.shape[0], 1, len_q, -1), want)


def _inference_cases():
    from .test_attention_features import FEATURE_CASES

    cases = {name: case for name, case in FEATURE_CASES.items() if name != "dropout" and name != "everything"}
    cases["plain-decode-padded"] = (dict(len_q=1, len_k=23, prefix_len=5, head_dim=32, padding="left"), True,
                                    lambda inp: {})
    cases["plain-no-prefix-all-padded"] = (dict(len_q=3, len_k=6, prefix_len=0, head_dim=16, padding="random"),
                                           False, lambda inp: {"key_padding_mask": torch.zeros_like(
                                               inp["key_padding_mask"])})
    cases["bank-alibi-window"] = (dict(batch=3, heads_q=4, heads_kv=2, len_q=5, len_k=17, prefix_len=6, head_dim=32,
                                       padding="left"), True,
                                  lambda inp: dict(alibi_slopes=torch.linspace(0.05, 0.5, 4), sliding_window=7,
                                                   prefix_index=torch.tensor([1, -1, 0]),
                                                   prefix_lengths=torch.tensor([6, 3])))
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", sorted(_inference_cases()))
def test_inference_path_of_the_torch_backend(name, dtype):
    """Output-only calls (no gradient, no LSE) take the torch backend's inference path (one SDPA call, with
    ALiBi as a bias in fp32): the output against the reference under the tolerance rule."""
    from prefix_kernels.ops.attention.reference import prefix_attention_ref
    from prefix_kernels.testing import compare

    kwargs, causal, build = _inference_cases()[name]
    inputs = make_inputs(**kwargs, dtype=dtype)
    features = build(inputs)
    mask = features.pop("key_padding_mask", inputs["key_padding_mask"])
    args = [inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    if "prefix_index" in features:  # a bank of two prefixes
        args[3] = torch.stack([args[3], args[3].flip(1)])
        args[4] = torch.stack([args[4], args[4].flip(1)])
    kw = dict(causal=causal, key_padding_mask=mask, **features)
    with torch.no_grad():
        out = prefix_attention(*args, **kw, backend="torch")
        truth, _ = prefix_attention_ref(*(a if a is None else a.to(torch.float64) for a in args), **kw)
        base, _ = prefix_attention_ref(*args, upcast=False, **kw)
    P = 0 if args[3] is None else args[3].shape[-2]
    result = compare("out", out, truth, base, 2.0, P + args[1].shape[2])
    assert result.ok, str(result)
    assert out.stride() == args[0].stride()


def _bank_args():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    bank = torch.randn(3, 2, 4, 16, generator=g)
    return q, k, k, bank, bank


def test_selection_values_are_checked_for_every_new_or_changed_tensor():
    """The range check of prefix_index is remembered for the tensor object, not its address or contents: a
    new tensor (even at a freed tensor's address), an in-place write, and inference tensors are checked again."""
    args = _bank_args()
    index = torch.tensor([0, 2])
    prefix_attention(*args, prefix_index=index)
    index[1] = 3  # an in-place write moves the version counter
    with pytest.raises(ValueError, match="prefix_index values must be in"):
        prefix_attention(*args, prefix_index=index)
    for _ in range(20):  # fresh tensors, some of them at a freed tensor's address
        prefix_attention(*args, prefix_index=torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="prefix_index values must be in"):
            prefix_attention(*args, prefix_index=torch.tensor([1, 3]))
    with torch.inference_mode():
        index = torch.tensor([0, 1])
        out = prefix_attention(*args, prefix_index=index)
        torch.testing.assert_close(out, prefix_attention(*args, prefix_index=index.clone()))
        index[0] = 5  # inference tensors count no writes: never remembered, so checked again
        with pytest.raises(ValueError, match="prefix_index values must be in"):
            prefix_attention(*args, prefix_index=index)


@pytest.mark.parametrize("inference", [False, True])
def test_padding_bounds_follow_writes_to_the_mask(inference):
    """The Triton kernels' padding bounds are computed once per mask tensor; a mask written in place between two
    calls (the first kept key moves) must give the second call's result, not the first's."""
    from prefix_kernels.ops.attention.triton_impl import is_interpreting

    if not (torch.cuda.is_available() or is_interpreting()):
        pytest.skip("needs the Triton kernels (a GPU or TRITON_INTERPRET=1)")
    from prefix_kernels import prefix_attention_ref

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g).to(device) for n in (3, 160, 160))
    pk, pv = (torch.randn(2, 4, 16, generator=g).to(device) for _ in range(2))
    args = (q, k, v, pk, pv)
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:  # the kernels skip whole key tiles outside the bounds: pads span several tiles
        mask = torch.ones(2, 160, dtype=torch.bool, device=device)
        mask[0, :130] = False
        first = prefix_attention(*args, key_padding_mask=mask, backend="triton")
        want_first, _ = prefix_attention_ref(*args, key_padding_mask=mask.clone())
        mask[0, :130] = True
        mask[1, 20:] = False
        second = prefix_attention(*args, key_padding_mask=mask, backend="triton")
        want_second, _ = prefix_attention_ref(*args, key_padding_mask=mask)
    torch.testing.assert_close(second, want_second, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(first, want_first, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_cuda_graph_replay_follows_a_new_mask():
    """Captured in a CUDA graph after eager calls on the same mask object, the Triton call must record its own
    padding bounds (none recalled from the memo) and need no sync for the selection check: a replay after the
    mask's contents change gives the new mask's result."""
    from prefix_kernels import prefix_attention_ref

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 64, generator=g).cuda().half() for n in (3, 160, 160))
    pk, pv = (torch.randn(3, 2, 4, 64, generator=g).cuda().half() for _ in range(2))
    index = torch.tensor([2, 0], device="cuda")
    mask = torch.ones(2, 160, dtype=torch.bool, device="cuda")
    mask[0, :130] = False

    def call():
        return prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, prefix_index=index, backend="triton")

    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            call()
            call()  # the memo now holds this mask's bounds
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        mask.copy_(torch.ones_like(mask))
        mask[1, 20:] = False
        graph.replay()
        torch.cuda.synchronize()
        want, _ = prefix_attention_ref(q, k, v, pk, pv, key_padding_mask=mask, prefix_index=index)
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_decisions_by_spec_follow_the_environment_and_the_table(monkeypatch):
    """The per-spec shortcut of select() gives what the full decision gives, and is dropped when the environment
    or the decision table changes (a spec is reused by every call of its kind)."""
    from prefix_kernels.ops.attention import backends as attention_backends
    from prefix_kernels.ops.attention import check_inputs

    q = torch.randn(1, 2, 1, 16)
    k = torch.randn(1, 2, 5, 16)
    spec, _ = check_inputs(q, k, k)
    dispatcher = attention_backends.DISPATCHER
    monkeypatch.delenv("PREFIX_KERNELS_BACKEND", raising=False)
    first = dispatcher.select(spec, "auto")
    assert dispatcher.select(spec, "auto") is first
    assert dispatcher._by_spec[id(spec)][0] is spec
    monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        dispatcher.select(spec, "auto")
    monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "torch")
    assert dispatcher.select(spec, "auto").name == "torch"
    monkeypatch.delenv("PREFIX_KERNELS_BACKEND")
    assert dispatcher.select(spec, "auto") is first
    monkeypatch.setattr(dispatcher, "_decisions", {})  # a new table: the shortcut must not answer from the old
    assert dispatcher.select(spec, "auto") is first
    assert len(dispatcher._decisions) == 1

"""Reliability of the op beyond the parity grid (issue 18): any strides on the torch backend, memos that are never
served stale, and one rule for non-finite inputs (torch backend; the Triton side is in
test_attention_nonfinite_triton.py)."""

import threading

import pytest
import torch

from prefix_kernels import prefix_attention
from prefix_kernels.ops.attention.reference import prefix_attention_ref
from prefix_kernels.testing import TENSOR_NAMES, assert_parity, check_backend, compare, make_inputs

DTYPES = (torch.float32, torch.bfloat16)


def _dtype_id(d):
    return str(d).split(".")[-1]


# ---------------------------------------------------------------------------------------------------------------
# 1. Any strides on the torch backend (PyTorch's fused CPU kernel mis-writes an output whose last dim is strided).

def _restride(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in another memory layout (a view with odd strides; same shape, same values)."""
    if layout == "last-dim-transposed":  # a .transpose(-1, -2) view: the head dim is the slowest of the two
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "reversed":  # every dim's order reversed in memory: last dim outermost
        dims = tuple(range(t.dim()))[::-1]
        return t.permute(dims).contiguous().permute(dims)
    if layout == "sliced":  # every other element of a wider last dim, at an offset (stride 2, not dense)
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    if layout == "expanded":  # stride 0 over the first dim: every batch row (or kv head) shares one slab
        return t[:1].expand(t.shape)
    raise ValueError(layout)


LAYOUTS = ("last-dim-transposed", "reversed", "sliced", "expanded")
MASKING = {"none": (None, False), "padding": ("right", False), "causal": (None, True),
           "causal+padding": ("left", True)}
SHAPES = {"gqa-prefix": dict(heads_q=4, heads_kv=2, prefix_len=5), "mha-no-prefix": dict(heads_q=2, heads_kv=2,
                                                                                          prefix_len=0)}


def _stride_inputs(shape: str, dtype, padding, layouts: dict) -> dict:
    inputs = make_inputs(batch=2, len_q=7, len_k=9, head_dim=16, dtype=dtype, padding=padding, **SHAPES[shape])
    for name, layout in layouts.items():
        if inputs[name] is not None:
            inputs[name] = _restride(inputs[name], layout)
    return inputs


NAME_SHAPES = [(name, shape) for shape in sorted(SHAPES) for name in TENSOR_NAMES
               if SHAPES[shape]["prefix_len"] > 0 or not name.startswith("prefix")]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("masking", sorted(MASKING))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("name", "shape"), NAME_SHAPES, ids=[f"{n}-{s}" for n, s in NAME_SHAPES])
def test_torch_backend_any_strides(name, shape, layout, masking, dtype):
    """out, lse and all five gradients of the torch backend (CPU training: the fused CPU kernels) match the
    reference for any one input in an odd layout, fp32 and bf16, with and without padding and causality."""
    padding, causal = MASKING[masking]
    inputs = _stride_inputs(shape, dtype, padding, {name: layout})
    assert_parity(check_backend(inputs, "torch", causal=causal))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("masking", sorted(MASKING))
def test_torch_backend_every_input_strided_at_once(masking, dtype):
    padding, causal = MASKING[masking]
    layouts = {"q": "last-dim-transposed", "k": "reversed", "v": "sliced", "prefix_k": "expanded",
               "prefix_v": "last-dim-transposed"}
    assert_parity(check_backend(_stride_inputs("gqa-prefix", dtype, padding, layouts), "torch", causal=causal))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_backend_strided_q_output_only_and_lse_without_grad(layout):
    """Inference (SDPA) and return_lse without gradients (the fused kernel's forward) on a strided q."""
    inputs = _stride_inputs("gqa-prefix", torch.float32, "right", {"q": layout})
    args = [inputs[n] for n in TENSOR_NAMES]
    want, want_lse = prefix_attention_ref(*args, key_padding_mask=inputs["key_padding_mask"], causal=True)
    with torch.no_grad():
        out = prefix_attention(*args, key_padding_mask=inputs["key_padding_mask"], causal=True, backend="torch")
        out2, lse = prefix_attention(*args, key_padding_mask=inputs["key_padding_mask"], causal=True,
                                     return_lse=True, backend="torch")
    for got in (out, out2):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 7. Non-finite inputs (torch backend). The rule: NaN/Inf in q, or in a key or value a query can see, propagates;
# input keys masked by key_padding_mask are never read (NaN or Inf there changes no output and no gradient).

# How the torch backend is reached: training through the fused CPU kernels (forward and backward), return_lse
# without gradients (the fused forward), output only (SDPA), and training on the explicit fp32 path (softcap).
MODES = ("train", "lse", "infer", "train-explicit")
NONFINITE_MASKING = {"none": (None, False), "padding": ("right", False), "causal": (None, True),
                     "causal+padding": ("right", True)}


def _nonfinite_inputs(dtype, prefix: bool, padding=None) -> dict:
    return make_inputs(batch=2, heads_q=4, heads_kv=2, len_q=6, len_k=6, prefix_len=3 if prefix else 0,
                       head_dim=16, dtype=dtype, padding=padding, seed=3)


def _attend(fn, inputs: dict, mode: str, causal: bool, cast=lambda t: t) -> dict:
    """out, lse (when the mode returns one) and, for training modes, the gradients of sum(out * dout)."""
    train = mode.startswith("train")
    leaves = {n: cast(inputs[n]).detach().requires_grad_(train) for n in TENSOR_NAMES if inputs[n] is not None}
    args = [leaves.get(n) for n in TENSOR_NAMES]
    kw = {"causal": causal, "key_padding_mask": inputs["key_padding_mask"]}
    if mode == "train-explicit":
        kw["softcap"] = 30.0
    with torch.set_grad_enabled(train):
        res = fn(args, kw, mode != "infer")
    out, lse = res if isinstance(res, tuple) else (res, None)
    result = {"out": out, "lse": lse}
    if train:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
        grads = torch.autograd.grad((out * dout).sum(), list(leaves.values()))
        result.update({"d" + n: g for n, g in zip(leaves, grads, strict=True)})
    return result


def _ours(inputs, mode, causal):
    def fn(args, kw, with_lse):
        return prefix_attention(*args, return_lse=with_lse, backend="torch", **kw)

    return _attend(fn, inputs, mode, causal)


def _truth_and_baseline(inputs, mode, causal):
    """The fp32 reference (fp64 for fp32 inputs) and the same math in the inputs' dtype."""
    def ref(upcast):
        return lambda args, kw, with_lse: prefix_attention_ref(*args, upcast=upcast, **kw)

    truth_dtype = torch.float64 if inputs["q"].dtype == torch.float32 else torch.float32
    truth = _attend(ref(True), inputs, mode, causal, cast=lambda t: t.to(truth_dtype))
    base = _attend(ref(False), inputs, mode, causal)
    return truth, base


def _assert_close_on(name, ours, truth, base, where=None):
    """The tolerance rule on the entries ``where`` selects (all of them by default); they must be finite."""
    where = torch.ones(ours.shape, dtype=torch.bool) if where is None else where.expand(ours.shape)
    x = ours.detach()[where]
    assert torch.isfinite(x).all() or name == "lse", f"{name}: non-finite where the rule wants finite values"
    factor = 2.0 if name in ("out", "lse") else 3.0
    result = compare(name, x, truth.detach()[where], base.detach()[where], factor, 16)
    assert result.ok, str(result)


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("prefix", [True, False], ids=["prefix", "no-prefix"])
@pytest.mark.parametrize("masking", sorted(NONFINITE_MASKING))
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_query_propagates(mode, masking, prefix, dtype, value):
    """A NaN or Inf in one query (batch row 0, head 1, position 2) makes that query's output and LSE non-finite
    (NaN for a NaN), as in the reference; every other output is untouched. Gradients: dq of that query is NaN, and
    NaN reaches the K/V gradients of the kv head it reads (head 0 of row 0) and of its prefix; the other row, the
    other kv head and every other query keep finite gradients that match the reference. (The fused CPU kernel
    gave a NaN query out = 0 and lse = 0 when no mask was passed.)"""
    padding, causal = NONFINITE_MASKING[masking]
    inputs = _nonfinite_inputs(dtype, prefix, padding)
    inputs["q"][0, 1, 2, 3] = float(value)
    ours = _ours(inputs, mode, causal)
    truth, base = _truth_and_baseline(inputs, mode, causal)
    if mode == "train-explicit" and value == "inf":
        # softcap saturates: c * tanh(inf) = c, so every logit is finite and so is the output (IEEE arithmetic).
        assert torch.isfinite(truth["out"]).all()
        _assert_close_on("out", ours["out"], truth["out"], base["out"])
        return
    bad_query = torch.zeros(2, 4, 6, dtype=torch.bool)
    bad_query[0, 1, 2] = True
    for name in ("out", "lse"):
        if ours[name] is None:
            continue
        got, want = ours[name].detach(), truth[name].detach()
        is_bad = torch.isnan(got) if value == "nan" else ~torch.isfinite(got)
        if name == "out":
            is_bad = is_bad.all(dim=-1)
        assert torch.equal(is_bad, bad_query), f"{name}: non-finite at {is_bad.nonzero().tolist()}"
        assert not torch.isfinite(want[0, 1, 2]).any(), "the reference propagates too"
        _assert_close_on(name, got, want, base[name], ~bad_query[..., None] if name == "out" else ~bad_query)
    if not mode.startswith("train"):
        return
    assert torch.isnan(ours["dq"][0, 1, 2]).all()
    _assert_close_on("dq", ours["dq"], truth["dq"], base["dq"], ~bad_query[..., None])
    kv_clean = torch.ones(2, 2, 1, 1, dtype=torch.bool)
    kv_clean[0, 0] = False
    for name in ("dk", "dv"):
        assert torch.isnan(ours[name][0, 0]).any(), f"{name}: the bad query's keys got no NaN gradient"
        _assert_close_on(name, ours[name], truth[name], base[name], kv_clean)
    if prefix:
        for name in ("dprefix_k", "dprefix_v"):
            assert torch.isnan(ours[name][0]).any(), f"{name}: the bad query's prefix got no NaN gradient"
            _assert_close_on(name, ours[name], truth[name], base[name], torch.tensor([False, True])[:, None, None])


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("prefix", [True, False], ids=["prefix", "no-prefix"])
@pytest.mark.parametrize("padding", ["random", "empty"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mode", MODES)
def test_masked_keys_are_never_read(mode, causal, padding, prefix, dtype, value):
    """NaN or Inf in every key and value that key_padding_mask drops changes no output, LSE or gradient: the
    result equals the reference on the same inputs with finite values there, and the gradients of those keys are
    zero ("empty": row 0 keeps no key at all). (The torch backend gave such rows NaN.)"""
    inputs = _nonfinite_inputs(dtype, prefix, padding)
    truth, base = _truth_and_baseline(inputs, mode, causal)
    poisoned = dict(inputs)
    for name in ("k", "v"):
        t = inputs[name].clone()
        t.transpose(1, 2)[~inputs["key_padding_mask"]] = float(value)
        poisoned[name] = t
    ours = _ours(poisoned, mode, causal)
    for name, x in ours.items():
        if x is not None:
            result = compare(name, x, truth[name], base[name], 2.0 if name in ("out", "lse") else 3.0, 16)
            assert result.ok, str(result)
    if mode.startswith("train"):
        dropped = ~inputs["key_padding_mask"][:, None, :, None]
        for name in ("dk", "dv"):
            assert (ours[name].masked_select(dropped) == 0).all(), f"{name} of a masked key is not zero"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("where", ["input-key-0", "prefix-key-1"])
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("masking", ["none", "causal+padding"])
@pytest.mark.parametrize("mode", MODES)
def test_nan_in_a_visible_key_propagates(mode, masking, which, where, dtype):
    """A NaN in a key (value) that queries see makes their outputs NaN (every component for a key, that
    component for a value), exactly where the reference has NaN; every other output matches the reference.
    Training: batch row 1 never reads row 0's input keys, so its gradients stay finite and right."""
    padding, causal = NONFINITE_MASKING[masking]
    inputs = _nonfinite_inputs(dtype, True, padding)
    if where == "input-key-0":  # kept by right padding, and every query sees it under causality
        inputs[which][0, 0, 0, 3] = float("nan")
    else:
        inputs["prefix_" + which][0, 1, 3] = float("nan")
    ours = _ours(inputs, mode, causal)
    truth, base = _truth_and_baseline(inputs, mode, causal)
    assert torch.isnan(truth["out"]).any()
    for name in ("out", "lse"):
        if ours[name] is None:
            continue
        want_nan = torch.isnan(truth[name].detach())
        assert torch.equal(torch.isnan(ours[name].detach()), want_nan), f"{name}: NaN at the wrong places"
        _assert_close_on(name, ours[name], truth[name], base[name], ~want_nan)
    if mode.startswith("train") and where == "input-key-0":
        row1 = torch.tensor([False, True])[:, None, None, None]
        for name in ("dq", "dk", "dv"):
            _assert_close_on(name, ours[name], truth[name], base[name], row1)
        assert torch.isnan(ours["dq"][0]).any() and torch.isnan(ours["dprefix_k"][0]).any()


# ---------------------------------------------------------------------------------------------------------------
# 6. Memos of selection checks and padding bounds are valid only inside memo_scope(): a tensor changed behind the
# version counter's back (.data, a numpy view) is never served stale.

def _bank_args():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    bank = torch.randn(3, 2, 4, 16, generator=g)
    return q, k, k, bank, bank


@pytest.mark.parametrize("edit", [".data", "numpy"])
def test_selection_check_sees_edits_that_bypass_the_version_counter(edit):
    """prefix_index checked once, then set to 1000 through .data or a numpy view (no version bump): the next call
    must check it again and raise, on every backend (the Triton kernels would read out of bounds)."""
    args = _bank_args()
    index = torch.tensor([0, 2])
    prefix_attention(*args, prefix_index=index, backend="torch")
    version = index._version
    if edit == ".data":
        index.data[1] = 1000
    else:
        index.numpy()[1] = 1000
    assert index._version == version  # the edit is invisible to the version counter
    with pytest.raises(ValueError, match=r"prefix_index values must be in \[-1, 2\].*max 1000"):
        prefix_attention(*args, prefix_index=index, backend="torch")


def _triton_or_skip():
    from prefix_kernels.ops.attention.triton_impl import is_interpreting

    if not (torch.cuda.is_available() or is_interpreting()):
        pytest.skip("needs the Triton kernels (a GPU or TRITON_INTERPRET=1)")
    return "cuda" if torch.cuda.is_available() else "cpu"


def _padding_args(device):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g).to(device) for n in (3, 160, 160))
    pk, pv = (torch.randn(2, 4, 16, generator=g).to(device) for _ in range(2))
    return q, k, v, pk, pv


@pytest.mark.parametrize("edit", [".data", "numpy"])
def test_padding_bounds_see_edits_that_bypass_the_version_counter(edit):
    """The Triton kernels skip key tiles outside each row's padding bounds. A mask edited through .data or a numpy
    view between two calls (outside any memo_scope) must give the second call the new mask's result."""
    device = _triton_or_skip()
    args = _padding_args(device)
    with torch.no_grad():
        mask = torch.ones(2, 160, dtype=torch.bool, device=device)
        mask[0, :130] = False  # row 0 keeps keys 130..159 only: its bounds skip the first tiles
        prefix_attention(*args, key_padding_mask=mask, backend="triton")
        if edit == ".data":
            mask.data[0, :130] = True
            mask.data[1, 20:] = False
        else:
            if device != "cpu":
                pytest.skip("numpy views are of CPU tensors")
            mask.numpy()[0, :130] = True
            mask.numpy()[1, 20:] = False
        out = prefix_attention(*args, key_padding_mask=mask, backend="triton")
        want, _ = prefix_attention_ref(*args, key_padding_mask=mask)
    torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)


def _memos():
    from prefix_kernels.ops.attention.inputs import _checked
    from prefix_kernels.ops.attention.triton_impl import _bounds_memo

    return _checked, _bounds_memo


def test_memo_is_used_only_inside_a_scope():
    """Outside a scope every call rechecks the selection; inside one the check runs once for the tensor, an
    in-place write (a version bump) is still caught, and the values are dropped when the scope closes."""
    from prefix_kernels.ops.memo import in_memo_scope, memo_scope

    checked, _ = _memos()
    args = _bank_args()
    index = torch.tensor([0, 2])
    hits, misses = checked.hits, checked.misses
    for _ in range(3):
        prefix_attention(*args, prefix_index=index, backend="torch")
    assert (checked.hits - hits, checked.misses - misses) == (0, 3)
    assert not in_memo_scope()
    with memo_scope():
        assert in_memo_scope()
        hits, misses = checked.hits, checked.misses
        for _ in range(3):  # three layers of one forward: one check
            prefix_attention(*args, prefix_index=index, backend="torch")
        assert (checked.hits - hits, checked.misses - misses) == (2, 1)
        other = torch.tensor([1, 1])  # a second selection in the same forward is remembered beside the first
        prefix_attention(*args, prefix_index=other, backend="torch")
        prefix_attention(*args, prefix_index=other, backend="torch")
        prefix_attention(*args, prefix_index=index, backend="torch")
        assert (checked.hits - hits, checked.misses - misses) == (4, 2)
        index[1] = 3  # an in-place write inside the scope moves the version counter: checked again
        with pytest.raises(ValueError, match="prefix_index values must be in"):
            prefix_attention(*args, prefix_index=index, backend="torch")
        index[1] = 2
        prefix_attention(*args, prefix_index=index, backend="torch")
        index.data[1] = 1000  # breaks the scope's promise: served stale until the scope closes
    assert not in_memo_scope()
    with pytest.raises(ValueError, match="prefix_index values must be in"):
        prefix_attention(*args, prefix_index=index, backend="torch")


def test_memo_scope_nests_is_per_thread_and_closes_on_errors():
    from prefix_kernels.ops.memo import in_memo_scope, memo_scope

    checked, _ = _memos()
    args = _bank_args()
    index = torch.tensor([0, 2])
    with memo_scope():
        prefix_attention(*args, prefix_index=index, backend="torch")
        with memo_scope():  # an inner scope (a model forward inside the caller's own scope) shares the values
            hits = checked.hits
            prefix_attention(*args, prefix_index=index, backend="torch")
            assert checked.hits == hits + 1
        assert in_memo_scope()
        hits = checked.hits
        prefix_attention(*args, prefix_index=index, backend="torch")
        assert checked.hits == hits + 1

        seen = {}

        def other_thread():
            seen["in_scope"] = in_memo_scope()
            before = checked.hits
            for _ in range(2):
                prefix_attention(*args, prefix_index=index, backend="torch")
            seen["hits"] = checked.hits - before

        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert seen == {"in_scope": False, "hits": 0}
    assert not in_memo_scope()
    with pytest.raises(RuntimeError, match="boom"), memo_scope():
        raise RuntimeError("boom")
    assert not in_memo_scope()
    with torch.inference_mode(), memo_scope():  # inference tensors count no writes: kept on the scope's promise
        index = torch.tensor([0, 1])
        prefix_attention(*args, prefix_index=index, backend="torch")
        hits = checked.hits
        prefix_attention(*args, prefix_index=index, backend="torch")
        assert checked.hits == hits + 1


def test_padding_bounds_computed_once_per_scope():
    """Inside a scope the Triton padding bounds of one mask are computed once for all calls (layers); outside,
    once per call; and the first call after a scope closes sees a .data edit made during it."""
    from prefix_kernels.ops.memo import memo_scope

    device = _triton_or_skip()
    _, bounds = _memos()
    args = _padding_args(device)
    mask = torch.ones(2, 160, dtype=torch.bool, device=device)
    mask[0, :130] = False
    with torch.no_grad():
        misses = bounds.misses
        prefix_attention(*args, key_padding_mask=mask, backend="triton")
        prefix_attention(*args, key_padding_mask=mask, backend="triton")
        assert bounds.misses - misses == 2
        with memo_scope():
            hits, misses = bounds.hits, bounds.misses
            first = prefix_attention(*args, key_padding_mask=mask, backend="triton")
            second = prefix_attention(*args, key_padding_mask=mask, backend="triton")
            assert (bounds.hits - hits, bounds.misses - misses) == (1, 1)
            torch.testing.assert_close(first, second, rtol=0, atol=0)
            mask.data[0, :130] = True
        out = prefix_attention(*args, key_padding_mask=mask, backend="triton")
        want, _ = prefix_attention_ref(*args, key_padding_mask=mask)
    torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)

"""Bad input gets a clear TypeError or ValueError that names the argument at fault."""

import pytest
import torch

from prefix_kernels import prefix_attention


def _ok(**over):
    args = dict(
        q=torch.randn(2, 4, 5, 32),
        k=torch.randn(2, 2, 7, 32),
        v=torch.randn(2, 2, 7, 32),
        prefix_k=torch.randn(2, 3, 32),
        prefix_v=torch.randn(2, 3, 32),
    )
    args.update(over)
    return args


def _call(args, **kw):
    a = dict(args)
    return prefix_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("prefix_k"), a.pop("prefix_v"), **a, **kw)


def test_valid_call_passes():
    assert _call(_ok(), backend="torch").shape == (2, 4, 5, 32)


BAD = [
    # (overrides, kwargs, exception, words the message must contain)
    (dict(q=[1.0]), {}, TypeError, ["q", "torch.Tensor"]),
    (dict(q=torch.randn(4, 5, 32)), {}, ValueError, ["q", "4-D"]),
    (dict(k=torch.randn(3, 2, 7, 32), v=torch.randn(3, 2, 7, 32)), {}, ValueError, ["batch", "q", "k"]),
    (dict(k=torch.randn(2, 2, 7, 16), v=torch.randn(2, 2, 7, 16)), {}, ValueError, ["head_dim", "q", "k"]),
    (dict(v=torch.randn(2, 2, 6, 32)), {}, ValueError, ["v", "shape of k"]),
    (dict(k=torch.randn(2, 3, 7, 32), v=torch.randn(2, 3, 7, 32), prefix_k=torch.randn(3, 3, 32),
          prefix_v=torch.randn(3, 3, 32)), {}, ValueError, ["4 heads", "multiple", "3 kv heads"]),
    (dict(k=torch.randn(2, 2, 7, 32, dtype=torch.float16)), {}, TypeError, ["k.dtype", "q.dtype"]),
    (dict(v=torch.randn(2, 2, 7, 32, dtype=torch.float64)), {}, TypeError, ["v.dtype"]),
    (dict(q=torch.randint(0, 3, (2, 4, 5, 32))), {}, TypeError, ["q must be float16"]),
    (dict(k=torch.randn(2, 2, 7, 32, device="meta")), {}, ValueError, ["k is on meta", "q is on cpu"]),
    (dict(prefix_v=None), {}, ValueError, ["prefix_k", "without prefix_v"]),
    (dict(prefix_k=None), {}, ValueError, ["prefix_v", "without prefix_k"]),
    (dict(prefix_k=torch.randn(2, 3, 32, dtype=torch.float16)), {}, TypeError, ["prefix_k.dtype", "q.dtype"]),
    (dict(prefix_v=torch.randn(2, 3, 32, device="meta")), {}, ValueError, ["prefix_v is on meta"]),
    (dict(prefix_k=torch.randn(4, 3, 32), prefix_v=torch.randn(4, 3, 32)), {}, ValueError,
     ["prefix_k", "kv_heads=2"]),
    (dict(prefix_k=torch.randn(2, 3, 16), prefix_v=torch.randn(2, 3, 16)), {}, ValueError, ["prefix_k", "head_dim=32"]),
    (dict(prefix_v=torch.randn(2, 4, 32)), {}, ValueError, ["prefix_v", "shape of prefix_k"]),
    (dict(prefix_k=torch.randn(3, 32), prefix_v=torch.randn(3, 32)), {}, ValueError, ["prefix_k", "3-D"]),
    ({}, dict(key_padding_mask=torch.ones(2, 7)), TypeError, ["key_padding_mask", "bool"]),
    ({}, dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError,
     ["key_padding_mask", "(batch=2, Lk=7)"]),
    ({}, dict(key_padding_mask=torch.ones(2, 1, 1, 7, dtype=torch.bool)), ValueError, ["key_padding_mask"]),
    ({}, dict(softmax_scale=float("nan")), ValueError, ["softmax_scale", "finite"]),
    ({}, dict(softmax_scale=float("inf")), ValueError, ["softmax_scale", "finite"]),
    ({}, dict(softmax_scale=torch.tensor(0.1)), TypeError, ["softmax_scale"]),
    ({}, dict(causal=1), TypeError, ["causal", "bool"]),
    (dict(q=torch.randn(2, 4, 0, 32)), {}, ValueError, ["empty input"]),
    ({}, dict(backend="cudnn"), ValueError, ["unknown backend", "cudnn"]),
    ({}, dict(backend=3), TypeError, ["backend"]),
]


@pytest.mark.parametrize("over,kw,exc,words", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input(over, kw, exc, words):
    with pytest.raises(exc) as info:
        _call(_ok(**over), **kw)
    for w in words:
        assert w in str(info.value), f"{w!r} not in message: {info.value}"

"""Non-finite inputs on the Triton backend (issue 18, item 7).

The rule: keys masked by key_padding_mask are never read, whatever they hold, so NaN or Inf in a padded key
or value reaches no output and no gradient (the padded keys' own dK/dV are exact zeros); NaN in q, or in a
key or value some query sees, propagates. Under the interpreter on CPU, the compiled kernels on a GPU.
"""

import math

import pytest
import torch

from prefix_kernels import prefix_attention
from prefix_kernels.ops.attention.triton_impl import is_interpreting
from prefix_kernels.testing import make_inputs

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or is_interpreting()),
                                reason="needs the Triton kernels (a GPU or TRITON_INTERPRET=1)")

# name: (make_inputs kwargs, prefix_attention kwargs). The interpreter tiles by 32: Lk = 70 puts padded keys
# in partial tiles beside kept ones, in whole padded tiles, and (random padding) in holes between kept keys.
CASES = {
    "right-causal-gqa": (dict(len_q=37, len_k=70, prefix_len=13, padding="right"), dict(causal=True)),
    "left-window-alibi": (dict(len_q=37, len_k=70, prefix_len=13, padding="left"),
                          dict(causal=True, sliding_window=24, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]))),
    "holes-softcap-dropout": (dict(len_q=37, len_k=70, prefix_len=40, padding="random"),
                              dict(softcap=20.0, dropout_p=0.2)),
    "empty-row-decode-mqa": (dict(len_q=1, len_k=70, prefix_len=5, heads_kv=1, padding="empty"), dict(causal=True)),
}
FILLS = {"nan": (math.nan, math.nan), "inf": (math.inf, -math.inf)}  # (padded keys, padded values)
GRADS = ("q", "k", "v", "prefix_k", "prefix_v")


def _inputs(kwargs, device):
    return make_inputs(batch=2, heads_q=4, **{"heads_kv": 2, **kwargs}, head_dim=32, device=device)


def _run(inputs, call, grads=True, seed=0):
    """out, lse and the five gradients of one Triton call (dropout seeded the same way every time)."""
    leaves = {name: inputs[name].detach().requires_grad_(grads) for name in GRADS if inputs[name] is not None}
    args = [leaves.get(name) for name in GRADS]
    torch.manual_seed(seed)
    out, lse = prefix_attention(*args, key_padding_mask=inputs["key_padding_mask"], return_lse=True,
                                backend="triton", **call)
    result = {"out": out.detach(), "lse": lse.detach()}
    if grads:
        g = torch.Generator(device="cpu").manual_seed(1)
        dout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
        dlse = torch.randn(lse.shape, generator=g).to(lse.device)
        values = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), list(leaves.values()))
        result.update({"d" + name: grad for name, grad in zip(leaves, values, strict=True)})
    return result


def _poison_pads(t, mask, value):
    """t [B, H, Lk, D] (any strides) with every padded key (mask[b, j] False) set to value."""
    t = t.clone()
    t.transpose(1, 2)[~mask] = value
    return t


@pytest.mark.parametrize("fill", sorted(FILLS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_padded_keys_and_values_are_never_read(name, fill, device):
    kwargs, call = CASES[name]
    inputs = _inputs(kwargs, device)
    mask = inputs["key_padding_mask"]
    clean = _run(inputs, call)
    key_fill, value_fill = FILLS[fill]
    poisoned = dict(inputs, k=_poison_pads(inputs["k"], mask, key_fill), v=_poison_pads(inputs["v"], mask, value_fill))
    assert not torch.isfinite(poisoned["k"]).all() and not torch.isfinite(poisoned["v"]).all()
    dirty = _run(poisoned, call)
    for what, value in clean.items():
        assert torch.isfinite(value[value > -math.inf]).all(), f"{what} is not finite with finite pads"
        assert torch.equal(dirty[what], value), f"{what} changed when the padded keys/values hold {fill}"
    for what in ("dk", "dv"):  # the padded keys' own gradients are exact zeros
        assert (dirty[what].transpose(1, 2)[~mask] == 0).all(), f"{what} of padded keys is not zero"


def test_nan_in_q_propagates_to_its_row_only(device):
    kwargs, call = CASES["holes-softcap-dropout"]
    call = {k: v for k, v in call.items() if k != "dropout_p"}
    inputs = _inputs(kwargs, device)
    clean = _run(inputs, call, grads=False)
    q = inputs["q"].clone()
    q[1, 2, 5, 7] = math.nan
    dirty = _run(dict(inputs, q=q), call, grads=False)
    assert torch.isnan(dirty["out"][1, 2, 5]).all() and torch.isnan(dirty["lse"][1, 2, 5])
    for what in ("out", "lse"):
        dirty[what][1, 2, 5] = clean[what][1, 2, 5]
        assert torch.equal(dirty[what], clean[what]), f"NaN in one query row changed another row's {what}"


def test_nan_in_a_visible_value_propagates(device):
    """A kept key's NaN value reaches every query that sees it (no causality: all of that batch row's
    queries of its kv-head group), and nothing else."""
    kwargs, call = CASES["holes-softcap-dropout"]
    inputs = _inputs(kwargs, device)
    mask = inputs["key_padding_mask"]
    j = int(torch.nonzero(mask[1])[0])
    v = inputs["v"].clone()
    v[1, 0, j, 3] = math.nan
    clean = _run(inputs, {}, grads=False)
    dirty = _run(dict(inputs, v=v), {}, grads=False)
    assert torch.isnan(dirty["out"][1, :2, :, 3]).all()  # query heads 0 and 1 share kv head 0
    dirty["out"][1, :2] = clean["out"][1, :2]
    assert torch.equal(dirty["out"], clean["out"])

"""ALiBi, attention dropout, sliding window and logit softcap: parity with the reference for every
backend, the dropout RNG contract, Bloom's ALiBi positions, and errors for bad values."""

import math

import pytest
import torch

from prefix_kernels import prefix_attention
from prefix_kernels.ops.attention import draw_dropout_seed, dropout_keep_mask
from prefix_kernels.testing import assert_parity, check_backend, make_inputs

BACKENDS = ("triton", "torch")
DTYPES = (torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu))


def bloom_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi slopes as HF Bloom builds them (geometric, with the extra interleaved ones for non-powers of 2)."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != n_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (i + 1) for i in range(0, 2 * (n_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def _leading_pads(mask):
    return (mask.int().cumsum(1) == 0).sum(1)


FEATURE_CASES = {
    # name: (make_inputs kwargs, causal, features builder)
    "alibi": (dict(heads_q=4, heads_kv=2, len_q=13, len_k=21, prefix_len=5, head_dim=32, padding="left"), True,
              lambda inp: dict(alibi_slopes=bloom_slopes(4).to(inp["q"].device),
                               alibi_offsets=-_leading_pads(inp["key_padding_mask"]).to(torch.int32))),
    "alibi-no-offsets": (dict(heads_q=6, heads_kv=3, len_q=7, len_k=7, prefix_len=13, head_dim=40), False,
                         lambda inp: dict(alibi_slopes=bloom_slopes(6).to(inp["q"].device))),
    "window-5": (dict(heads_q=4, heads_kv=1, len_q=37, len_k=53, prefix_len=13, head_dim=64, padding="right"), True,
                 lambda inp: dict(sliding_window=5)),
    "window-1-decode": (dict(len_q=1, len_k=41, prefix_len=3, head_dim=32), True,
                        lambda inp: dict(sliding_window=1)),
    "window-longer-than-seq": (dict(len_q=9, len_k=11, prefix_len=0, head_dim=32, padding="random"), True,
                               lambda inp: dict(sliding_window=40)),
    "softcap": (dict(len_q=17, len_k=19, prefix_len=13, head_dim=32, padding="random"), True,
                lambda inp: dict(softcap=2.0)),
    "dropout": (dict(heads_q=4, heads_kv=2, len_q=17, len_k=23, prefix_len=13, head_dim=32, padding="right"), True,
                lambda inp: dict(dropout_p=0.3)),
    "everything": (dict(heads_q=4, heads_kv=2, len_q=19, len_k=37, prefix_len=7, head_dim=32, padding="left"), True,
                   lambda inp: dict(alibi_slopes=bloom_slopes(4).to(inp["q"].device),
                                    alibi_offsets=-_leading_pads(inp["key_padding_mask"]).to(torch.int64),
                                    sliding_window=9, softcap=5.0, dropout_p=0.2)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", sorted(FEATURE_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_parity(backend, name, dtype, device):
    kwargs, causal, build = FEATURE_CASES[name]
    inputs = make_inputs(**kwargs, dtype=dtype, device=device)
    assert_parity(check_backend(inputs, backend, causal=causal, lse_grad=True, **build(inputs)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dropout_is_the_plain_path(backend, device):
    inputs = make_inputs(len_q=9, len_k=13, prefix_len=5, head_dim=32, padding="right", device=device)
    args = [inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    a = prefix_attention(*args, causal=True, key_padding_mask=inputs["key_padding_mask"], backend=backend)
    b = prefix_attention(*args, causal=True, key_padding_mask=inputs["key_padding_mask"], dropout_p=0.0,
                         backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_repeats_under_the_same_seed(backend, device):
    inputs = make_inputs(len_q=9, len_k=13, prefix_len=5, head_dim=32, device=device)
    leaves = [inputs[n].requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")]

    def run(seed):
        torch.manual_seed(seed)
        out = prefix_attention(*leaves, causal=True, dropout_p=0.25, backend=backend)
        return [out] + list(torch.autograd.grad(out.square().sum(), leaves))

    first, again, other = run(3), run(3), run(4)
    for x, y in zip(first, again, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_rate(backend, device):
    """The keep rate of the kernels' mask is within 3 sigma of 1 - p, and masks differ across seeds."""
    B, H, Lq, n_cols, p = 2, 3, 40, 70, 0.3
    torch.manual_seed(0)
    seeds = [draw_dropout_seed(torch.device(device)) for _ in range(2)]
    masks = [dropout_keep_mask(s, B, H, Lq, n_cols, p, backend) for s in seeds]
    n = masks[0].numel()
    sigma = math.sqrt(p * (1 - p) / n)
    for m in masks:
        assert m.shape == (B, H, Lq, n_cols)
        assert abs(m.float().mean().item() - (1 - p)) < 3 * sigma
    assert not torch.equal(masks[0], masks[1])
    # Neighbouring (row, column) cells are not copies of each other.
    assert not torch.equal(masks[0][..., 1:], masks[0][..., :-1])


def test_alibi_matches_bloom_positions(device):
    """Bloom's ALiBi over [P ones ; mask]: position = (cumsum - 1) * mask. With offsets = -(leading pads)
    our bias equals it at every kept key, for left- and right-padded rows alike."""
    B, H, L, P, D = 3, 4, 11, 5, 32
    inputs = make_inputs(batch=B, heads_q=H, heads_kv=H, len_q=L, len_k=L, prefix_len=P, head_dim=D,
                         device=device)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    mask[0, :4] = False   # left padded
    mask[1, 7:] = False   # right padded
    full = torch.cat([torch.ones(B, P, dtype=torch.bool, device=device), mask], 1)
    bloom_pos = ((full.long().cumsum(-1) - 1) * full.long()).float()           # [B, P + L]
    slopes = bloom_slopes(H).to(device)
    q, k, v, pk, pv = (inputs[n].float() for n in ("q", "k", "v", "prefix_k", "prefix_v"))
    kk = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2)
    vv = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2)
    scores = q @ kk.transpose(-1, -2) * D**-0.5 + slopes.view(1, H, 1, 1) * bloom_pos.view(B, 1, 1, P + L)
    scores = scores.masked_fill(~full.view(B, 1, 1, P + L), float("-inf"))
    expected = torch.softmax(scores, -1) @ vv
    offsets = -_leading_pads(mask)
    for backend in BACKENDS:
        out = prefix_attention(*(inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")), key_padding_mask=mask,
                               alibi_slopes=slopes, alibi_offsets=offsets, backend=backend)
        torch.testing.assert_close(out.float(), expected, atol=2e-5, rtol=2e-5)


def _args(**over):
    q = torch.randn(2, 4, 5, 16)
    k = torch.randn(2, 2, 7, 16)
    base = dict(q=q, k=k, v=k.clone(), causal=True)
    base.update(over)
    return base


BAD = [
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in [0, 1)"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    (dict(sliding_window=0), ValueError, "sliding_window must be >= 1"),
    (dict(sliding_window=2.5), TypeError, "sliding_window must be an int"),
    (dict(sliding_window=4, causal=False), ValueError, "sliding_window needs causal=True"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite float > 0"),
    (dict(softcap=-3.0), ValueError, "softcap must be a finite float > 0"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a finite float > 0"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes must have shape (Hq=4,)"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float64)), TypeError, "alibi_slopes must be float32"),
    (dict(alibi_offsets=torch.zeros(2, dtype=torch.int32)), ValueError, "alibi_offsets was given without"),
    (dict(alibi_slopes=torch.ones(4), alibi_offsets=torch.zeros(3, dtype=torch.int32)), ValueError,
     "alibi_offsets must have shape (batch=2,)"),
    (dict(alibi_slopes=torch.ones(4), alibi_offsets=torch.zeros(2)), TypeError, "alibi_offsets must be int32"),
]


@pytest.mark.parametrize("over,exc,words", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_feature_values(over, exc, words):
    a = _args(**over)
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        prefix_attention(a.pop("q"), a.pop("k"), a.pop("v"), **a)

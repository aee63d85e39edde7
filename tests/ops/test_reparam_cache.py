"""Frozen use: the prefix is computed once and reused while no gradient can flow, and recomputed as soon as
a parameter changes (optimizer steps of every flavour, load_state_dict, a swapped tensor, a cast), the
call context changes, or the cached prefix itself is written to."""

import pytest
import torch

from prefix_kernels import PrefixEncoder, modules
from prefix_kernels.ops.reparam import project_prefix_ref


@pytest.fixture
def calls(monkeypatch):
    """Counts how often the MLP runs."""
    count = {"n": 0}
    real = modules.project_prefix

    def counting(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(modules, "project_prefix", counting)
    return count


def _encoder(backend="torch", **kw):
    torch.manual_seed(0)
    return PrefixEncoder(3, 2, 1, 16, prefix_projection=True, encoder_hidden_size=8, backend=backend, **kw)


def _expected(enc, dtype=None):
    emb, first, last = enc.embedding.weight, enc.transform[0], enc.transform[2]
    return project_prefix_ref(emb, first.weight, first.bias, last.weight, last.bias, num_layers=enc.num_layers,
                              num_kv_heads=enc.num_kv_heads, head_dim=enc.head_dim, dtype=dtype).detach()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_encoder_computes_once(calls, backend):
    enc = _encoder(backend).eval().requires_grad_(False)
    first = enc()
    again = enc()
    assert again is first and calls["n"] == 1
    torch.testing.assert_close(first, _expected(enc))


def test_no_grad_eval_is_cached_and_grad_mode_is_not(calls):
    enc = _encoder().eval()
    with torch.no_grad():
        a = enc()
        assert enc() is a
    assert calls["n"] == 1
    b = enc()
    assert b.requires_grad and b is not a and calls["n"] == 2
    c = enc()
    assert c is not b and calls["n"] == 3  # with grads, every call computes (the graph is new each time)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
        lambda p: torch.optim.Adam(p, lr=0.1, foreach=False),
        lambda p: torch.optim.Adam(p, lr=0.1, foreach=True),
        lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
    ],
    ids=["sgd", "sgd-foreach", "adam-loop", "adam-foreach", "adamw-fused"],
)
def test_cache_invalidates_after_an_optimizer_step(calls, make_opt):
    enc = _encoder().eval()
    opt = make_opt(enc.parameters())
    with torch.no_grad():
        before = enc()
    enc().square().sum().backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        after = enc()
        assert enc() is after
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, _expected(enc))


def test_cache_invalidates_after_one_parameter_changes(calls):
    """Only the last layer's bias moves (the others frozen): still a recompute."""
    enc = _encoder().eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    enc.transform[2].bias.requires_grad_(True)
    opt = torch.optim.SGD([enc.transform[2].bias], lr=1.0)
    with torch.no_grad():
        before = enc()
    enc().sum().backward()
    opt.step()
    with torch.no_grad():
        after = enc()
    # d sum / d b2 = P = 3 (every token adds the bias): one SGD step at lr 1 moves every entry by -3.
    torch.testing.assert_close(after - before, torch.full_like(before, -3.0))


def test_cache_invalidates_after_load_state_dict(calls):
    enc = _encoder().eval().requires_grad_(False)
    before = enc()
    other = _encoder()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(2.0)
    enc.load_state_dict(other.state_dict())
    after = enc()
    assert calls["n"] == 2
    torch.testing.assert_close(after, _expected(other))
    assert not torch.equal(after, before)


def test_cache_invalidates_when_a_parameter_tensor_is_swapped(calls):
    enc = _encoder().eval().requires_grad_(False)
    enc()
    enc.transform[2].weight.data = enc.transform[2].weight.data * 3.0  # new storage, fresh version counter
    after = enc()
    assert calls["n"] == 2
    torch.testing.assert_close(after, _expected(enc))
    enc.to(torch.float64)
    assert enc._cache is None  # dropped by the cast itself, so the old storage is freed now
    assert enc().dtype == torch.float64 and calls["n"] == 3


def test_writing_to_the_cached_prefix_invalidates_it(calls):
    enc = _encoder().eval().requires_grad_(False)
    prefix = enc()
    prefix.zero_()
    again = enc()
    assert calls["n"] == 2
    torch.testing.assert_close(again, _expected(enc))


def test_dtype_and_autocast_are_part_of_the_key(calls):
    enc = _encoder().eval().requires_grad_(False)
    plain = enc()
    half = enc(dtype=torch.float16)
    assert half.dtype == torch.float16 and calls["n"] == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = enc()
        assert auto.dtype == torch.bfloat16 and enc() is auto
    assert calls["n"] == 3
    torch.testing.assert_close(enc(), plain)


def test_dropout_in_training_is_never_cached(calls):
    enc = _encoder(prefix_dropout=0.5).train().requires_grad_(False)
    a, b = enc(), enc()
    assert calls["n"] == 2 and not torch.equal(a, b)
    enc.eval()
    assert enc() is enc() and calls["n"] == 3


def test_frozen_encoder_in_training_mode_without_dropout_is_cached(calls):
    enc = _encoder().train().requires_grad_(False)
    assert enc() is enc() and calls["n"] == 1


def test_inference_mode_results_stay_in_inference_mode(calls):
    enc = _encoder().eval().requires_grad_(False)
    with torch.inference_mode():
        a = enc()
        assert a.is_inference() and enc() is a
    b = enc()
    assert not b.is_inference() and calls["n"] == 2
    torch.testing.assert_close(a, b)


def test_without_projection_follows_parameter_updates():
    enc = PrefixEncoder(3, 2, 1, 16).eval()
    with torch.no_grad():
        before = enc().clone()
        enc.embedding.weight.add_(1.0)
        after = enc()
    torch.testing.assert_close(after, before + 1.0)

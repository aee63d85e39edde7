"""The backend registry: auto selection, explicit choice, the environment override, reasons."""

import warnings

import pytest
import torch

from prefix_kernels import BackendUnavailableError, backends, prefix_attention, select_backend
from prefix_kernels.ops.attention.triton_impl import is_interpreting

HAS_CUDA = torch.cuda.is_available()


def _qkv(D=32, dtype=torch.float32, device="cpu"):
    q = torch.randn(1, 2, 3, D, dtype=dtype, device=device)
    k = torch.randn(1, 2, 4, D, dtype=dtype, device=device)
    return q, k, k.clone()


def test_registry_order_and_names():
    assert backends.names()[:2] == ["triton", "torch"] or backends.names()[:3] == ["cuda", "triton", "torch"]
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        backends.get("nope")


@pytest.mark.skipif(HAS_CUDA, reason="CPU behaviour")
def test_auto_on_cpu_follows_the_interpreter(monkeypatch):
    q, k, v = _qkv()
    assert select_backend(q, k, v) == ("triton" if is_interpreting() else "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend(q, k, v) == "torch"
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET is not set"):
        prefix_attention(q, k, v, backend="triton")


@pytest.mark.skipif(not (HAS_CUDA or is_interpreting()), reason="needs triton to run here")
def test_explicit_backend_lists_every_reason(device):
    q, k, v = _qkv(D=300, dtype=torch.float64, device=device)
    with pytest.raises(BackendUnavailableError) as info:
        prefix_attention(q, k, v, backend="triton")
    msg = str(info.value)
    assert "dtype torch.float64 is not supported" in msg
    assert "head dim 300 is outside 16..256" in msg
    assert "backend argument" in msg


@pytest.mark.skipif(not (HAS_CUDA or is_interpreting()), reason="needs triton to run here")
def test_auto_falls_back_with_a_stated_reason(device):
    q, k, v = _qkv(D=272, device=device)
    backends._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = prefix_attention(q, k, v)
    assert select_backend(q, k, v) == "torch"
    assert any("head dim 272" in str(w.message) and "'triton'" in str(w.message) for w in caught)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 272**-0.5, -1) @ v
    torch.testing.assert_close(out, ref)


def test_environment_variable_overrides_auto(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert select_backend(q, k, v) == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        select_backend(q, k, v)


@pytest.mark.skipif(HAS_CUDA, reason="CPU behaviour")
def test_environment_variable_is_explicit(monkeypatch):
    """A backend named by the variable that cannot serve raises, and says where the name came from."""
    q, k, v = _qkv()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError, match="PREFIX_KERNELS_BACKEND"):
        prefix_attention(q, k, v)


def test_describe_lists_backends():
    rows = backends.describe()
    assert [r["name"] for r in rows] == backends.names()
    assert all("cpu" in r["devices"] for r in rows)

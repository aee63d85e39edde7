"""The backends of the attention op: auto selection, explicit choice, the environment override, reasons
built from each backend's declared capabilities."""

import warnings

import pytest
import torch

from prefix_kernels import BackendUnavailableError, backends, prefix_attention, select_backend
from prefix_kernels.ops import dispatch
from prefix_kernels.ops.attention import backends as attention_backends
from prefix_kernels.ops.attention import check_inputs
from prefix_kernels.ops.triton_utils import is_interpreting

HAS_CUDA = torch.cuda.is_available()


def _qkv(D=32, dtype=torch.float32, device="cpu"):
    q = torch.randn(1, 2, 3, D, dtype=dtype, device=device)
    k = torch.randn(1, 2, 4, D, dtype=dtype, device=device)
    return q, k, k.clone()


def test_registry_order_and_names():
    # Until a GPU has measured both, the Triton kernels (every feature) come before the CUDA ones.
    assert backends.names() == ["triton", "cuda", "torch"]
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        backends.get("nope")


@pytest.mark.skipif(HAS_CUDA or not is_interpreting(), reason="CPU with the interpreter: cuda is faked available")
def test_auto_prefers_triton_and_cuda_serves_by_name(monkeypatch):
    """With both GPU backends able to run, "auto" takes triton; cuda is chosen when named, and by "auto" only
    for an input triton declines (head dim 8)."""
    monkeypatch.setattr(attention_backends.CudaAttention, "device_reasons", lambda self, device: [])
    cache = attention_backends.DISPATCHER._decisions
    monkeypatch.setattr(attention_backends.DISPATCHER, "_decisions", {})  # decisions taken with a faked cuda
    assert cache is not attention_backends.DISPATCHER._decisions
    q, k, v = _qkv(D=64, dtype=torch.float16)
    assert select_backend(q, k, v) == "triton"
    assert select_backend(q, k, v, backend="cuda") == "cuda"
    q, k, v = _qkv(D=8, dtype=torch.float16)
    dispatch.forget_warnings()
    with pytest.warns(UserWarning, match="using the 'cuda' backend; skipped 'triton' because head dim 8"):
        assert select_backend(q, k, v) == "cuda"
    q, k, v = _qkv(D=64, dtype=torch.float16)
    with pytest.raises(BackendUnavailableError, match=r"optional features \['softcap'\] are not implemented by "
                                                      "the CUDA kernels"):
        select_backend(q, k, v, softcap=5.0, backend="cuda")


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
    assert "head dim 300 is not supported (16..256: tiles pad the head dim to a power of two" in msg
    assert "backend argument" in msg


@pytest.mark.skipif(not (HAS_CUDA or is_interpreting()), reason="needs triton to run here")
def test_auto_falls_back_with_a_stated_reason(device):
    q, k, v = _qkv(D=272, device=device)
    dispatch.forget_warnings()
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


def test_reasons_come_from_the_declared_capabilities(monkeypatch):
    """Each reason follows from a class attribute: change the declaration and the reason follows."""
    triton = backends.get("triton")
    spec, _ = check_inputs(*_qkv(D=128, dtype=torch.float32))
    assert triton.input_reasons(spec) == []
    spec, _ = check_inputs(*_qkv(D=200, dtype=torch.float32))
    assert triton.input_reasons(spec) == [
        "float32 at head dim 200 is not supported (float32 runs as 3xTF32, which spills registers above head dim "
        "128; use bf16/fp16 or the torch backend)"]
    monkeypatch.setattr(type(triton), "SUPPORTED_FEATURES", frozenset({"alibi"}))
    q, k, v = _qkv(D=32)
    bank = torch.zeros(2, 2, 3, 32)
    spec, _ = check_inputs(q, k, v, bank, bank, prefix_index=torch.tensor([1]), softcap=3.0, dropout_p=0.1,
                           alibi_slopes=torch.ones(2))
    assert spec.features == ("alibi", "dropout", "softcap", "prefix_bank")
    assert triton.input_reasons(spec) == [
        "optional features ['dropout', 'softcap'] are not implemented by the Triton kernels yet",
        "prefix banks (prefix_index / prefix_lengths, or more than one prefix) are not implemented by the Triton "
        "kernels yet"]
    assert backends.get("torch").input_reasons(spec) == []


@pytest.mark.parametrize("device,head_dim,declined", [("cuda", 64, False), ("cuda", 96, True), ("cuda", 128, True),
                                                      ("cpu", 128, False)])
def test_triton_declines_fp32_above_64_on_a_gpu_only(device, head_dim, declined):
    """fp32 (3xTF32) above head dim 64 spills registers on a GPU (the static report), so the Triton backend declines
    it there with the reason; the interpreter, which has no registers, serves it up to 128."""
    import dataclasses

    spec, _ = check_inputs(*_qkv(D=head_dim, dtype=torch.float32))
    spec = dataclasses.replace(spec, device=torch.device(device))
    reasons = attention_backends.TritonAttention().input_reasons(spec)
    assert bool(reasons) == declined, reasons
    if declined:
        assert "not supported on a GPU" in reasons[0] and "spills registers" in reasons[0]

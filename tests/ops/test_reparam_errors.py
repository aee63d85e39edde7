"""Bad configurations and parameters get a TypeError or ValueError naming the argument at fault; backend
choice follows the registry's rules (reasons, no silent fallback, environment overrides)."""

import warnings

import pytest
import torch
from torch import nn

from prefix_kernels import BackendUnavailableError, PrefixEncoder, backends
from prefix_kernels.ops import dispatch
from prefix_kernels.ops.attention.triton_impl import is_interpreting
from prefix_kernels.ops.reparam import backends as reparam_select
from prefix_kernels.ops.reparam import project_prefix, select_backend

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((0, 2, 2, 16), {}, ValueError, "num_virtual_tokens must be >= 1, got 0"),
        ((4, 0, 2, 16), {}, ValueError, "num_layers must be >= 1"),
        ((4, 2, -1, 16), {}, ValueError, "num_kv_heads must be >= 1"),
        ((4, 2, 2, 0), {}, ValueError, "head_dim must be >= 1"),
        ((4.0, 2, 2, 16), {}, TypeError, "num_virtual_tokens must be an int, got float"),
        ((True, 2, 2, 16), {}, TypeError, "num_virtual_tokens must be an int, got bool"),
        ((4, 2, 2, 16), {"prefix_projection": 1}, TypeError, "prefix_projection must be a bool"),
        ((4, 2, 2, 16), {"prefix_projection": True, "encoder_hidden_size": 0}, ValueError,
         "encoder_hidden_size must be >= 1"),
        ((4, 2, 2, 16), {"prefix_dropout": 1.0}, ValueError, r"prefix_dropout must be in \[0, 1\)"),
        ((4, 2, 2, 16), {"prefix_dropout": "0.1"}, TypeError, "prefix_dropout must be a float"),
        ((4, 2, 2, 16), {"backend": None}, TypeError, "backend must be a string"),
    ],
)
def test_bad_configuration(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        PrefixEncoder(*args, **kwargs)


def test_hidden_size_defaults_to_token_dim_like_peft():
    enc = PrefixEncoder(4, 2, 3, 16, prefix_projection=True)
    assert enc.transform[0].weight.shape == (48, 48)
    assert enc.transform[2].weight.shape == (2 * 2 * 48, 48)


def _params(P=4, L=2, Hkv=2, D=16, H=8, dtype=torch.float32):
    T = Hkv * D
    return [torch.randn(P, T, dtype=dtype), torch.randn(H, T, dtype=dtype), torch.randn(H, dtype=dtype),
            torch.randn(2 * L * T, H, dtype=dtype), torch.randn(2 * L * T, dtype=dtype)]


SIZES = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16}


@pytest.mark.parametrize(
    "index,bad,match",
    [
        (0, torch.randn(0, 32), "embedding.weight has 0 rows: num_virtual_tokens must be >= 1"),
        (0, torch.randn(4, 30), r"embedding.weight must be \[num_virtual_tokens, token_dim=32\]"),
        (0, torch.randn(4, 32, 1), "embedding.weight must be 2-D"),
        (1, torch.randn(8, 31), r"transform.0.weight must be \[encoder_hidden_size, token_dim=32\]"),
        (2, torch.randn(9), r"transform.0.bias must be \[encoder_hidden_size=8\]"),
        (3, torch.randn(96, 8), r"transform.2.weight must be \[2 \* num_layers \* token_dim=128"),
        (3, torch.randn(128, 7), r"transform.2.weight must be .*encoder_hidden_size=8"),
        (4, torch.randn(127), r"transform.2.bias must be \[2 \* num_layers \* token_dim=128\]"),
    ],
)
def test_mismatched_sizes_name_the_parameter(index, bad, match):
    params = _params()
    params[index] = bad
    with pytest.raises(ValueError, match=match):
        project_prefix(*params, **SIZES)


def test_wrong_dtypes_name_the_parameter():
    params = _params()
    params[3] = params[3].half()
    with pytest.raises(TypeError, match=r"transform.2.weight.dtype torch.float16 differs from embedding.weight.dtype"):
        project_prefix(*params, **SIZES)
    params = _params()
    params[0] = torch.zeros(4, 32, dtype=torch.int64)
    with pytest.raises(TypeError, match="embedding.weight must be float16, bfloat16, float32 or float64"):
        project_prefix(*params, **SIZES)
    with pytest.raises(TypeError, match="dtype must be one of"):
        project_prefix(*_params(), **SIZES, dtype=torch.int32)
    with pytest.raises(TypeError, match="transform.0.bias must be a torch.Tensor, got list"):
        params = _params()
        params[2] = [0.0] * 8
        project_prefix(*params, **SIZES)
    with pytest.raises(TypeError, match="num_layers must be an int"):
        project_prefix(*_params(), num_layers=2.0, num_kv_heads=2, head_dim=16)


def test_custom_names_in_errors():
    params = _params()
    params[1] = torch.randn(8, 3)
    with pytest.raises(ValueError, match=r"w1 must be \["):
        project_prefix(*params, **SIZES, names=("embedding", "w1", "b1", "w2", "b2"))


def test_module_reports_a_replaced_parameter():
    enc = PrefixEncoder(4, 2, 2, 16, prefix_projection=True, encoder_hidden_size=8, backend="torch")
    enc.transform[2].weight = nn.Parameter(torch.randn(100, 8))
    with pytest.raises(ValueError, match="transform.2.weight must be"):
        enc()
    plain = PrefixEncoder(4, 2, 2, 16)
    plain.embedding.weight = nn.Parameter(torch.randn(4, 100))
    with pytest.raises(ValueError, match="embedding.weight must be"):
        plain()
    with pytest.raises(TypeError, match="dtype must be"):
        PrefixEncoder(4, 2, 2, 16, prefix_projection=True)(dtype="float16")


def test_loading_a_mismatched_peft_state_dict_names_the_tensor():
    small = PrefixEncoder(4, 2, 2, 16, prefix_projection=True, encoder_hidden_size=8)
    big = PrefixEncoder(4, 3, 2, 16, prefix_projection=True, encoder_hidden_size=8)
    with pytest.raises(RuntimeError, match="size mismatch for transform.2.weight"):
        small.load_state_dict(big.state_dict())
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "transform.0.weight"'):
        PrefixEncoder(4, 2, 2, 16).load_state_dict(small.state_dict())


@pytest.mark.skipif(not (HAS_CUDA or is_interpreting()), reason="needs triton to run here")
def test_explicit_triton_lists_its_reasons():
    params = [p.double() for p in _params()]
    with pytest.raises(BackendUnavailableError, match="parameters in torch.float64 computed in torch.float64"):
        project_prefix(*params, **SIZES, backend="triton")
    params = [p.half() for p in _params()]
    with pytest.raises(BackendUnavailableError, match="parameters in torch.float16 computed in torch.bfloat16"):
        project_prefix(*params, **SIZES, dtype=torch.bfloat16, backend="triton")


@pytest.mark.skipif(not (HAS_CUDA or is_interpreting()), reason="needs triton to run here")
def test_auto_falls_back_with_a_stated_reason():
    params = [p.double() for p in _params()]
    dispatch.forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = project_prefix(*params, **SIZES)
    assert out.dtype == torch.float64
    assert any("skipped 'triton'" in str(w.message) and "float64" in str(w.message) for w in caught)
    assert select_backend(*params, **SIZES) == "torch"


@pytest.mark.skipif(HAS_CUDA, reason="CPU behaviour")
def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend(*_params(), **SIZES) == "torch"
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET is not set"):
        project_prefix(*_params(), **SIZES, backend="triton")


def test_environment_variables(monkeypatch):
    params = _params()
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert select_backend(*params, **SIZES) == "torch"
    monkeypatch.setenv(reparam_select.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        select_backend(*params, **SIZES)
    # A backend the attention op has but this op lacks is an explicit request it cannot serve.
    monkeypatch.delenv(reparam_select.ENV_VAR)
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(BackendUnavailableError, match="'cuda' .* has no reparameterization kernel"):
        select_backend(*params, **SIZES)
    monkeypatch.setenv(reparam_select.ENV_VAR, "torch")
    assert select_backend(*params, **SIZES) == "torch"
    assert select_backend(*params, **SIZES, backend="torch") == "torch"
    with pytest.raises(TypeError, match="backend must be a string"):
        select_backend(*params, **SIZES, backend=1)

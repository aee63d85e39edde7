"""The CUDA extension without a GPU: it was built and loads, its ops are registered with the documented
schemas beside the Python custom ops, the Meta kernels give the right shapes, layouts and errors,
torch.compile traces through them, and the backend registry reports why it cannot serve here."""

import json
import re
import subprocess
import sys
import types

import pytest
import torch

from prefix_kernels import _ext, backends
from prefix_kernels.ops.attention import cuda as cuda_backend

BUILT = _ext.build_info().get("extension") == "built"
needs_ext = pytest.mark.skipif(not BUILT, reason=f"extension not built: {_ext.build_info().get('extension')}")

FWD_SCHEMA = ("prefix_kernels::cuda_fwd(Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, "
              "Tensor? key_padding_mask, bool causal, float softmax_scale, bool need_lse) -> (Tensor, Tensor)")
BWD_SCHEMA = ("prefix_kernels::cuda_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor? prefix_k, "
              "Tensor? prefix_v, Tensor? key_padding_mask, Tensor out, Tensor lse, bool causal, float softmax_scale)"
              " -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_build_record_says_what_happened():
    info = _ext.build_info()
    assert "extension" in info and "torch" in info
    if not BUILT:
        assert info["extension"].startswith("not built")


@needs_ext
def test_extension_loads():
    assert _ext.load() is not None, _ext.error()
    assert _ext.error() is None
    assert _ext.build_info()["archs"]


@needs_ext
def test_schemas():
    _ext.load()
    assert str(torch.ops.prefix_kernels.cuda_fwd.default._schema) == FWD_SCHEMA
    assert str(torch.ops.prefix_kernels.cuda_bwd.default._schema) == BWD_SCHEMA


@needs_ext
@pytest.mark.parametrize("first", ["extension", "python_ops"])
def test_registration_coexists_with_python_custom_ops(first):
    """TORCH_LIBRARY(prefix_kernels) in C++ and the torch.library fragments of function.py, either order."""
    imports = ["import prefix_kernels._C", "import prefix_kernels.ops.attention.function"]
    if first == "python_ops":
        imports.reverse()
    code = "; ".join(["import torch", *imports,
                      "print(torch.ops.prefix_kernels.cuda_fwd, torch.ops.prefix_kernels.attention_fwd)"])
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@needs_ext
def test_max_head_dim_matches_the_kernels():
    table = json.loads(_ext.load().kernel_table())
    assert max(r["head_dim"] for r in table) == cuda_backend.MAX_HEAD_DIM
    assert {r["dtype"] for r in table} == {"fp16", "bf16"}


@needs_ext
@pytest.mark.parametrize("with_prefix", [True, False])
def test_meta_shapes_and_layouts(with_prefix):
    _ext.load()
    ops = torch.ops.prefix_kernels
    q = _meta(2, 9, 8, 64).transpose(1, 2)  # [B, H, L, D] view of [B, L, H, D], as HF passes it
    k = _meta(2, 11, 2, 64).transpose(1, 2)
    pk = _meta(2, 5, 64) if with_prefix else None
    mask = torch.empty(2, 11, dtype=torch.bool, device="meta")
    out, lse = ops.cuda_fwd(q, k, k, pk, pk, mask, True, 0.125, True)
    assert out.shape == q.shape and out.stride() == q.stride() and out.dtype == q.dtype
    assert lse.shape == (2, 8, 9) and lse.dtype == torch.float32
    _, no_lse = ops.cuda_fwd(q, k, k, pk, pk, None, False, 0.125, False)
    assert no_lse.shape == (2, 8, 0)
    dq, dk, dv, dpk, dpv = ops.cuda_bwd(out, lse, q, k, k, pk, pk, mask, out, lse, True, 0.125)
    assert dq.stride() == q.stride() and dk.stride() == k.stride() and dv.shape == k.shape
    if with_prefix:
        assert dpk.shape == (2, 5, 64) and dpv.shape == (2, 5, 64)
    else:
        assert dpk.shape == (0,) and dpv.shape == (0,)


@needs_ext
def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _ext.load()
    with FakeTensorMode():
        q = torch.empty(1, 4, 7, 128, dtype=torch.bfloat16)
        k = torch.empty(1, 1, 9, 128, dtype=torch.bfloat16)
        pk = torch.empty(1, 3, 128, dtype=torch.bfloat16)
        out, lse = torch.ops.prefix_kernels.cuda_fwd(q, k, k, pk, pk, None, False, 0.1, True)
        assert out.shape == (1, 4, 7, 128) and lse.shape == (1, 4, 7)


@needs_ext
def test_opcheck_on_meta():
    _ext.load()
    q, k, pk = _meta(2, 4, 5, 32), _meta(2, 2, 6, 32), _meta(2, 3, 32)
    mask = torch.ones(2, 6, dtype=torch.bool, device="meta")
    torch.library.opcheck(torch.ops.prefix_kernels.cuda_fwd.default, (q, k, k, pk, pk, mask, True, 0.2, True),
                          test_utils=("test_schema", "test_faketensor"))


@needs_ext
def test_compile_fullgraph_traces_through_the_ops():
    _ext.load()
    torch._dynamo.reset()

    def layer(q, k, v, pk, pv):
        out, lse = torch.ops.prefix_kernels.cuda_fwd(q, k, v, pk, pv, None, True, 0.125, True)
        grads = torch.ops.prefix_kernels.cuda_bwd(out, None, q, k, v, pk, pv, None, out, lse, True, 0.125)
        return out * 2, grads[3]

    args = (_meta(2, 4, 5, 64), _meta(2, 2, 6, 64), _meta(2, 2, 6, 64), _meta(2, 3, 64), _meta(2, 3, 64))
    out, dpk = torch.compile(layer, fullgraph=True, backend="aot_eager")(*args)
    assert out.shape == (2, 4, 5, 64) and dpk.shape == (2, 3, 64)
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(layer, tracing_mode="fake")(*args)
    assert "cuda_fwd" in graph.code and "cuda_bwd" in graph.code


BAD_FWD = [
    (dict(q=_meta(2, 4, 5, 64, dtype=torch.float32)), r"q must be float16 or bfloat16"),
    (dict(k=_meta(2, 2, 6, 64, dtype=torch.bfloat16)), r"k.dtype .* differs from q.dtype"),
    (dict(q=_meta(2, 4, 5, 36), k=_meta(2, 2, 6, 36), v=_meta(2, 2, 6, 36)), r"head dim 36 is not supported"),
    (dict(q=_meta(2, 4, 5, 256), k=_meta(2, 2, 6, 256), v=_meta(2, 2, 6, 256)), r"head dim 256 is not supported"),
    (dict(q=_meta(2, 3, 5, 64)), r"not a multiple of the 2 kv heads"),
    (dict(v=_meta(2, 2, 7, 64)), r"v must have the shape of k"),
    (dict(pk=_meta(2, 3, 64), pv=None), r"prefix_k and prefix_v must be given together"),
    (dict(pk=_meta(4, 3, 64), pv=_meta(4, 3, 64)), r"prefix_k must be \[kv_heads=2, P, head_dim=64\]"),
    (dict(mask=torch.ones(2, 6, dtype=torch.uint8, device="meta")), r"key_padding_mask must be bool"),
    (dict(mask=torch.ones(2, 5, dtype=torch.bool, device="meta")),
     r"key_padding_mask must have shape \(batch=2, Lk=6\)"),
    (dict(q=_meta(2, 4, 5)), r"q must be 4-D"),
]


@needs_ext
@pytest.mark.parametrize("bad,message", BAD_FWD, ids=[m for _, m in BAD_FWD])
def test_bad_arguments_raise_naming_the_argument(bad, message):
    _ext.load()
    a = dict(q=_meta(2, 4, 5, 64), k=_meta(2, 2, 6, 64), v=_meta(2, 2, 6, 64), pk=None, pv=None, mask=None)
    a.update(bad)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.prefix_kernels.cuda_fwd(a["q"], a["k"], a["v"], a["pk"], a["pv"], a["mask"], False, 0.1, True)


@needs_ext
def test_bad_backward_arguments_raise():
    _ext.load()
    q, k = _meta(2, 4, 5, 64), _meta(2, 2, 6, 64)
    with pytest.raises(RuntimeError, match=r"dout must have the shape of q"):
        torch.ops.prefix_kernels.cuda_bwd(_meta(2, 4, 6, 64), None, q, k, k, None, None, None, q, q, False, 0.1)


@needs_ext
def test_cpu_tensors_are_refused():
    _ext.load()
    q = torch.zeros(1, 1, 2, 32, dtype=torch.float16)
    with pytest.raises(NotImplementedError, match="cuda_fwd"):
        torch.ops.prefix_kernels.cuda_fwd(q, q, q, None, None, None, False, 0.1, True)


def test_registry_reasons_without_a_gpu():
    cuda = backends.get("cuda")
    reasons = cuda.device_reasons(torch.device("cpu"))
    assert len(reasons) == 1
    assert ("not a CUDA device" in reasons[0]) if BUILT else ("prefix_kernels._C is not available" in reasons[0])
    from prefix_kernels.ops.attention import check_inputs

    spec, _ = check_inputs(torch.zeros(1, 2, 3, 36), torch.zeros(1, 2, 4, 36), torch.zeros(1, 2, 4, 36))
    why = cuda.input_reasons(spec)
    assert any("dtype torch.float32 is not supported" in r for r in why)
    assert any(re.search(r"head dim 36 is not supported \(a multiple of 8 up to 128", r) for r in why)


def test_backend_functions_refuse_active_features():
    from prefix_kernels.ops.attention import check_inputs
    from prefix_kernels.ops.attention.inputs import NO_FEATURES

    cuda = backends.get("cuda")
    off = types.SimpleNamespace(alibi_slopes=None, dropout_p=0.0, sliding_window=None, softcap=None)
    assert cuda_backend.active_features(None) == [] and cuda_backend.active_features(off) == []
    assert cuda_backend.active_features(NO_FEATURES) == []
    with pytest.raises(NotImplementedError, match="optional features"):
        cuda_backend.forward(None, None, None, None, None, None, False, 1.0, True,
                             features=types.SimpleNamespace(alibi_slopes=torch.ones(2)))
    with pytest.raises(NotImplementedError, match=r"\['softcap'\]"):
        cuda_backend.backward(*([None] * 10), False, 1.0, features=types.SimpleNamespace(softcap=30.0))
    with pytest.raises(NotImplementedError, match=r"\['prefix_bank'\]"):
        cuda_backend.forward(None, None, None, None, None, None, False, 1.0, True,
                             features=types.SimpleNamespace(prefix_index=torch.zeros(2, dtype=torch.long)))

    q, k = torch.zeros(2, 2, 3, 64, dtype=torch.float16), torch.zeros(2, 2, 4, 64, dtype=torch.float16)
    spec, _ = check_inputs(q, k, k, softcap=30.0)
    assert cuda.input_reasons(spec) == ["optional features ['softcap'] are not implemented by the CUDA "
                                                  "kernels yet"]
    bank = torch.zeros(3, 2, 5, 64, dtype=torch.float16)
    spec, _ = check_inputs(q, k, k, bank, bank, prefix_index=torch.tensor([0, 2]))
    assert cuda.input_reasons(spec) == ["prefix banks (prefix_index / prefix_lengths, or more than one "
                                                  "prefix) are not implemented by the CUDA kernels yet"]
    single = torch.zeros(2, 5, 64, dtype=torch.float16)
    assert cuda.input_reasons(check_inputs(q, k, k, single, single)[0]) == []


@pytest.mark.parametrize("archs,cap,ok", [
    ("8.0;9.0", (8, 0), True), ("8.0;9.0", (8, 6), True), ("8.0;9.0", (8, 9), True), ("8.0;9.0", (9, 0), True),
    ("8.0;9.0", (10, 0), False), ("8.0;9.0", (12, 0), False), ("8.6", (8, 0), False), ("9.0+PTX", (10, 0), True),
    ("9.0a", (9, 0), True), ("9.0a", (9, 1), False), ("8.0 9.0", (9, 0), True),
])
def test_archs_cover(archs, cap, ok):
    """The cuda backend declines a GPU the build has no code for (say sm_100 with the default list)."""
    assert backends.archs_cover(archs, *cap) is ok

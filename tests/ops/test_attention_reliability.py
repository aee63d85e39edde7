"""Reliability of the op beyond the parity grid (issue 18): any strides on the torch backend, memos that are never
served stale, and one rule for non-finite inputs (torch backend; the Triton side is in
test_attention_nonfinite_triton.py)."""


import pytest
import torch

from prefix_kernels import prefix_attention
from prefix_kernels.ops.attention.reference import prefix_attention_ref
from prefix_kernels.testing import TENSOR_NAMES, assert_parity, check_backend, make_inputs

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

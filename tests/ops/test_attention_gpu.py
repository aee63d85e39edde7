"""GPU-only parity of the triton and cuda backends: bf16, the shipped tile configurations (the
interpreter uses 32 x 32 tiles only), larger shapes and 64-bit offsets. Skipped without CUDA."""

import itertools

import pytest
import torch

from prefix_kernels import BackendUnavailableError, prefix_attention, select_backend
from prefix_kernels.ops.attention import triton_impl
from prefix_kernels.testing import assert_parity, check_backend, make_inputs

pytestmark = pytest.mark.gpu

HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128, 256)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _grid():
    """A covering design over head dim x dtype x prefix length x shape x mask."""
    shapes = [  # (B, Hq, Hkv, Lq, Lk)
        (3, 8, 8, 128, 128), (2, 8, 2, 257, 257), (4, 8, 1, 1, 515), (2, 16, 4, 97, 300), (1, 4, 4, 300, 97),
    ]
    prefix_lens = (0, 1, 13, 64, 128, 250)
    paddings = (None, "right", "left", "random")
    cases = []
    for i, (D, dtype) in enumerate(itertools.product(HEAD_DIMS, DTYPES)):
        if dtype == torch.float32 and D > triton_impl.MAX_HEAD_DIM_FP32_GPU:
            continue  # declined on a GPU with a reason (it spills): tested below
        B, Hq, Hkv, Lq, Lk = shapes[i % len(shapes)]
        cases.append(dict(batch=B, heads_q=Hq, heads_kv=Hkv, len_q=Lq, len_k=Lk, prefix_len=prefix_lens[i % 6],
                          head_dim=D, padding=paddings[(i // 2) % 4], causal=bool(i % 2), dtype=dtype))
    return cases


def _id(c):
    return (f"{str(c['dtype'])[6:]}-D{c['head_dim']}-B{c['batch']}-H{c['heads_q']}x{c['heads_kv']}-Lq{c['len_q']}"
            f"-Lk{c['len_k']}-P{c['prefix_len']}-{'causal' if c['causal'] else 'full'}-{c['padding'] or 'nopad'}")


@pytest.mark.parametrize("case", _grid(), ids=_id)
def test_triton_gpu_grid(case):
    case = dict(case)
    causal, dtype = case.pop("causal"), case.pop("dtype")
    inputs = make_inputs(**case, dtype=dtype, device="cuda")
    assert_parity(check_backend(inputs, "triton", causal=causal))


def _cuda_grid():
    """The same covering grid, where the CUDA kernels serve it: fp16/bf16, head dims multiple of 8 up to 128."""
    return [c for c in _grid() if c["dtype"] != torch.float32 and c["head_dim"] % 8 == 0 and c["head_dim"] <= 128]


@pytest.mark.parametrize("case", _cuda_grid(), ids=_id)
@pytest.mark.parametrize("lse_grad", [False, True])
def test_cuda_gpu_grid(case, lse_grad):
    case = dict(case)
    causal, dtype = case.pop("causal"), case.pop("dtype")
    inputs = make_inputs(**case, dtype=dtype, device="cuda")
    assert_parity(check_backend(inputs, "cuda", causal=causal, lse_grad=lse_grad))


@pytest.mark.parametrize("padding", ["empty", "left"])
def test_cuda_gpu_edge_rows(padding):
    """Rows that see no key (P = 0, a fully padded row, causal Lq > Lk) and a decode step."""
    for kw in (dict(len_q=70, len_k=33, prefix_len=0), dict(len_q=1, len_k=300, prefix_len=16)):
        inputs = make_inputs(batch=3, heads_q=8, heads_kv=2, head_dim=64, padding=padding, dtype=torch.float16,
                             device="cuda", **kw)
        assert_parity(check_backend(inputs, "cuda", causal=True, lse_grad=True))


def test_cuda_prefix_gradient_is_bitwise_deterministic():
    inputs = make_inputs(batch=16, heads_q=8, heads_kv=2, len_q=256, len_k=256, prefix_len=64, head_dim=128,
                         dtype=torch.bfloat16, device="cuda", padding="right")
    leaves = [inputs[n].detach().requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    grads = []
    for _ in range(3):
        out = prefix_attention(*leaves, causal=True, key_padding_mask=inputs["key_padding_mask"], backend="cuda")
        grads.append(torch.autograd.grad(out.float().square().sum(), leaves))
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other, strict=True))


def test_cuda_compiled_matches_eager():
    torch._dynamo.reset()
    inputs = make_inputs(batch=2, heads_q=8, heads_kv=2, len_q=65, len_k=65, prefix_len=16, head_dim=64,
                         dtype=torch.bfloat16, device="cuda", padding="left")
    mask = inputs["key_padding_mask"]

    def layer(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, causal=True, key_padding_mask=mask, backend="cuda").float().sum()

    args = [inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(*args), layer(*args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_on_gpu(dtype):
    inputs = make_inputs(batch=2, heads_q=8, heads_kv=2, len_q=65, len_k=129, prefix_len=16, head_dim=64,
                         padding="left", dtype=dtype, device="cuda")
    assert_parity(check_backend(inputs, "torch", causal=True))


def test_auto_picks_cuda_then_triton_on_gpu():
    from prefix_kernels import _ext

    q = torch.randn(2, 4, 8, 64, device="cuda", dtype=torch.bfloat16)
    assert select_backend(q, q, q) == "triton"  # until a GPU has measured both, auto prefers triton over cuda
    if _ext.load() is not None:
        assert select_backend(q, q, q, backend="cuda") == "cuda"
    q16 = torch.randn(2, 4, 8, 256, device="cuda", dtype=torch.bfloat16)
    assert select_backend(q16, q16, q16) == "triton"  # the CUDA kernels stop at head dim 128
    q32 = torch.randn(2, 4, 8, 256, device="cuda")
    assert select_backend(q32, q32, q32) == "torch"  # fp32 above D = 128: declined with a reason
    q32 = torch.randn(2, 4, 8, 128, device="cuda")
    assert select_backend(q32, q32, q32) == "torch"  # fp32 above D = 64 on a GPU: declined with a reason
    with pytest.raises(BackendUnavailableError, match="float32 at head dim 128 is not supported on a GPU"):
        prefix_attention(q32, q32, q32, backend="triton")
    with pytest.raises(BackendUnavailableError, match="float32 at head dim 256"):
        prefix_attention(q32, q32, q32, backend="triton")


def test_prefix_gradient_is_bitwise_deterministic_on_gpu():
    inputs = make_inputs(batch=16, heads_q=8, heads_kv=2, len_q=256, len_k=256, prefix_len=64, head_dim=128,
                         dtype=torch.bfloat16, device="cuda")
    pk = inputs["prefix_k"].requires_grad_()
    grads = []
    for _ in range(3):
        out = prefix_attention(inputs["q"], inputs["k"], inputs["v"], pk, inputs["prefix_v"], causal=True)
        grads.append(torch.autograd.grad(out.float().square().sum(), pk)[0])
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.slow
def test_offsets_beyond_int32():
    """K/V with more than 2**31 elements: batch offsets must be computed in 64 bits."""
    B, Hkv, Lk, D = 16, 32, 32768, 128  # 2**31 elements per tensor, 4 GiB in bf16
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    k = torch.randn(B, Hkv, Lk, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(B, Hkv, 1, D, device="cuda", dtype=torch.bfloat16)
    pk = torch.randn(Hkv, 8, D, device="cuda", dtype=torch.bfloat16)
    pv = torch.randn_like(pk)
    out = prefix_attention(q, k, v, pk, pv, causal=True)
    b = B - 1  # the last row's offsets are the ones past 2**31
    kk = torch.cat([pk, k[b]], 1).float()
    vv = torch.cat([pv, v[b]], 1).float()
    ref = torch.softmax(q[b].float() @ kk.transpose(-1, -2) * D**-0.5, -1) @ vv
    torch.testing.assert_close(out[b].float(), ref, atol=2e-2, rtol=2e-2)

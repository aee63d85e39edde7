"""PrefixEncoder on a GPU: the compiled Triton kernels against PEFT at P-Tuning v2 sizes (BERT-base) and odd
sizes, bf16 on real tensor cores, autocast, and the cache (skipped without CUDA)."""

import pytest
import torch

from prefix_kernels.ops.reparam import select_backend
from prefix_kernels.testing import assert_parity

from .reparam_cases import ODD, Case, check_against_peft, ours_from, peft_encoder

pytest.importorskip("peft")

BERT_BASE = Case(P=128, L=12, Hkv=12, D=64, hidden=512)
SMALL_P = Case(P=16, L=12, Hkv=12, D=64, hidden=512)
GQA = Case(P=61, L=4, Hkv=8, D=128, hidden=200)

DTYPES = [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16),
          (torch.float32, torch.float16)]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp32-autocast-bf16", "fp32-autocast-fp16"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,autocast", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [BERT_BASE, SMALL_P, GQA, ODD], ids=lambda c: c.id())
def test_triton_matches_peft(case, dtype, autocast):
    params = [p.to("cuda", dtype) for p in peft_encoder(case).parameters()]
    assert select_backend(*params, num_layers=case.L, num_kv_heads=case.Hkv, head_dim=case.D,
                          dtype=autocast) == "triton"
    assert_parity(check_against_peft(case, dtype, "triton", autocast=autocast, device="cuda"))


@pytest.mark.gpu
def test_frozen_inference_runs_the_mlp_once():
    enc = ours_from(peft_encoder(BERT_BASE), BERT_BASE, torch.bfloat16, "auto").cuda().eval().requires_grad_(False)
    first = enc()
    assert enc() is first
    enc.backend = "torch"  # part of the cache key: computes again, through the other backend
    again = enc()
    assert again is not first
    torch.testing.assert_close(first, again, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_deterministic_gradients():
    enc = peft_encoder(BERT_BASE)
    grads = []
    for _ in range(2):
        ours = ours_from(enc, BERT_BASE, torch.bfloat16, "triton").cuda()
        (ours().float() ** 2).sum().backward()
        grads.append([p.grad for p in ours.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)

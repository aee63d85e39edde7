"""Parity helpers: the tolerance rule, input builders and a check of any backend against the reference.

The tolerance rule (after flash-attention): a result ``x`` of dtype T passes against the truth ``ref``
(computed in fp32, or fp64 when T is fp32) if

    max |x - ref| <= factor * max |baseline - ref| + (eps(T) + eps(fp32) * sqrt(n)) * max(1, max |ref|)

where ``baseline`` is the same reference math run in T itself: what plain PyTorch achieves at that
precision. factor is 2 for outputs and LSE, 3 for gradients. The last term forgives one rounding of
the output dtype plus the random-walk growth of fp32 accumulation over the n terms of the quantity's
reduction (P + Lk for out; for a key gradient, the rows that see the key, B * group * Lq for the prefix, plus
the P + Lk terms of the softmax normaliser that every probability carries): summation order differs between a
tiled kernel and a BLAS call, and for fp32 inputs that order is all that separates them. For fp16 and
bf16 the term is far below the baseline error, so it loosens nothing there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops.attention import draw_dropout_seed, dropout_keep_mask, prefix_attention
from .ops.attention.reference import prefix_attention_ref

TENSOR_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
GRAD_NAMES = ("dq", "dk", "dv", "dprefix_k", "dprefix_v")


@dataclass
class Comparison:
    name: str
    error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return f"{self.name}: max err {self.error:.3e} <= bound {self.bound:.3e} {verdict}"


def compare(name: str, x: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor, factor: float,
            n_terms: int = 1) -> Comparison:
    """Apply the tolerance rule. Non-finite entries of ``ref`` (LSE = -inf) must match exactly."""
    x64, ref64, base64 = (t.detach().to(torch.float64).cpu() for t in (x, ref, baseline))
    finite = torch.isfinite(ref64)
    if not torch.equal(torch.isfinite(x64), finite) or not torch.equal(x64[~finite], ref64[~finite]):
        return Comparison(name, float("inf"), 0.0)
    if finite.sum() == 0:
        return Comparison(name, 0.0, 0.0)
    err = (x64[finite] - ref64[finite]).abs().max().item()
    base = (base64[finite] - ref64[finite]).abs().max().item()
    scale = max(1.0, ref64[finite].abs().max().item())
    eps = torch.finfo(x.dtype).eps + torch.finfo(torch.float32).eps * n_terms**0.5
    return Comparison(name, err, factor * base + eps * scale)


def make_inputs(
    batch: int = 2,
    heads_q: int = 4,
    heads_kv: int = 2,
    len_q: int = 37,
    len_k: int = 37,
    prefix_len: int = 13,
    head_dim: int = 64,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    padding: str | None = None,
    hf_layout: bool = True,
    seed: int = 0,
) -> dict:
    """Random inputs of prefix attention.

    ``hf_layout`` makes q, k, v transposed views of ``[B, L, H, D]`` tensors, as HF models hand them
    over. ``padding`` is None, "right", "left", "random" or "empty" (row 0 has no kept key at all).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if hf_layout:
        q = rnd(batch, len_q, heads_q, head_dim).transpose(1, 2)
        k = rnd(batch, len_k, heads_kv, head_dim).transpose(1, 2)
        v = rnd(batch, len_k, heads_kv, head_dim).transpose(1, 2)
    else:
        q = rnd(batch, heads_q, len_q, head_dim)
        k = rnd(batch, heads_kv, len_k, head_dim)
        v = rnd(batch, heads_kv, len_k, head_dim)
    prefix_k = rnd(heads_kv, prefix_len, head_dim) if prefix_len else None
    prefix_v = rnd(heads_kv, prefix_len, head_dim) if prefix_len else None
    mask = None
    if padding is not None:
        lengths = torch.randint(1, len_k + 1, (batch,), generator=g)
        lengths[0] = max(1, len_k // 2)
        cols = torch.arange(len_k)
        if padding == "right":
            mask = cols[None, :] < lengths[:, None]
        elif padding == "left":
            mask = cols[None, :] >= (len_k - lengths)[:, None]
        elif padding == "random":
            mask = torch.rand(batch, len_k, generator=g) > 0.3
        elif padding == "empty":
            mask = torch.rand(batch, len_k, generator=g) > 0.3
            mask[0] = False
        else:
            raise ValueError(f"unknown padding {padding!r}")
        mask = mask.to(device)
    return {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v, "key_padding_mask": mask}


def _run(fn, inputs: dict, dout: torch.Tensor | None, dlse: torch.Tensor | None, cast, **kwargs):
    leaves = {}
    args = {}
    for name in TENSOR_NAMES:
        t = inputs[name]
        if t is not None:
            t = cast(t).detach().requires_grad_(dout is not None)
            leaves[name] = t
        args[name] = t
    out, lse = fn(args["q"], args["k"], args["v"], args["prefix_k"], args["prefix_v"],
                  key_padding_mask=inputs["key_padding_mask"], **kwargs)
    result = {"out": out, "lse": lse}
    if dout is not None:
        loss = (out * cast(dout)).sum()
        if dlse is not None:
            loss = loss + (lse * dlse.to(lse.dtype)).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        for name, grad in zip(leaves, grads, strict=True):
            result["d" + name] = grad
    return result


def check_backend(
    inputs: dict,
    backend: str,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    grads: bool = True,
    lse_grad: bool = False,
    seed: int = 1,
    **features,
) -> list[Comparison]:
    """Compare ``prefix_attention(backend=...)`` with the reference: out, lse and (optionally) the five
    gradients, under the tolerance rule. Returns one :class:`Comparison` per quantity.

    ``features`` are passed to both (alibi_slopes, alibi_offsets, sliding_window, softcap, dropout_p).
    With dropout, the reference is given the keep mask that the backend itself reports for the seed the
    call drew, so forward and backward are both checked against the mask the kernel really applied."""
    q = inputs["q"]
    dtype = q.dtype
    truth_dtype = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    g = torch.Generator(device="cpu").manual_seed(seed)
    dout = torch.randn(q.shape, generator=g).to(q.device, dtype) if grads else None
    dlse = torch.randn(q.shape[:3], generator=g).to(q.device) if grads and lse_grad else None
    kw = {"causal": causal, "softmax_scale": softmax_scale, **features}
    ref_kw = dict(kw)
    dropout_p = features.get("dropout_p", 0.0)

    def ours_fn(*a, **k):
        return prefix_attention(*a, return_lse=True, backend=backend, **k)

    def ref_fn(upcast):
        return lambda *a, **k: prefix_attention_ref(*a, upcast=upcast, **k)

    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    ours = _run(ours_fn, inputs, dout, dlse, lambda t: t, **kw)
    if dropout_p > 0:
        torch.manual_seed(seed)  # the call drew its seed first thing: draw it again
        drawn = draw_dropout_seed(q.device)
        P = 0 if inputs["prefix_k"] is None else inputs["prefix_k"].shape[1]
        ref_kw["dropout_keep"] = dropout_keep_mask(drawn, q.shape[0], q.shape[1], q.shape[2],
                                                   P + inputs["k"].shape[2], dropout_p, backend)
    torch.random.set_rng_state(rng_state)
    kw = ref_kw
    truth = _run(ref_fn(True), inputs, dout, dlse, lambda t: t.to(truth_dtype), **kw)
    base = _run(ref_fn(False), inputs, dout, dlse, lambda t: t, **kw)
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = inputs["k"].shape[1], inputs["k"].shape[2]
    P = 0 if inputs["prefix_k"] is None else inputs["prefix_k"].shape[1]
    G = Hq // Hkv
    # Key gradients sum over the rows that see the key, and each row's probabilities carry the rounding of its
    # softmax normaliser (P + Lk terms): both chains count.
    terms = {"out": P + Lk, "lse": P + Lk, "dq": P + Lk, "dk": G * Lq + P + Lk, "dv": G * Lq + P + Lk,
             "dprefix_k": B * G * Lq + P + Lk, "dprefix_v": B * G * Lq + P + Lk}
    results = [compare("out", ours["out"], truth["out"], base["out"], 2.0, terms["out"]),
               compare("lse", ours["lse"], truth["lse"], base["lse"], 2.0, terms["lse"])]
    for name in GRAD_NAMES:
        if name in ours:
            results.append(compare(name, ours[name], truth[name], base[name], 3.0, terms[name]))
    return results


def assert_parity(results: list[Comparison]) -> None:
    failed = [str(r) for r in results if not r.ok]
    assert not failed, "tolerance rule violated:\n  " + "\n  ".join(failed)

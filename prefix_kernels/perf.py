"""What benchmarks compare: prefix attention through this library, and what users write without it.

Every provider takes the same inputs (q ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]``, prefix ``[Hkv, P, D]``,
no padding) and returns ``out [B, Hq, L, D]``. The alternatives pay for concatenating the prefix
onto K/V, as they would in a model; with causal masking they use bottom-right alignment over the
``P + L`` keys, which is exactly "the prefix is visible, the input is causal".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ops.attention import prefix_attention


@dataclass(frozen=True)
class Shape:
    batch: int
    heads_q: int
    heads_kv: int
    seq: int
    prefix: int
    head_dim: int
    causal: bool

    def forward_flops(self) -> float:
        """4 B Hq L (P + L) D, with the input part halved when causal (the prefix part never is)."""
        keys = self.prefix + (self.seq / 2 if self.causal else self.seq)
        return 4.0 * self.batch * self.heads_q * self.seq * keys * self.head_dim

    def backward_flops(self) -> float:
        return 2.5 * self.forward_flops()


def make_tensors(shape: Shape, dtype: torch.dtype, device, requires_grad: bool = True, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, H, Hkv, L, P, D = shape.batch, shape.heads_q, shape.heads_kv, shape.seq, shape.prefix, shape.head_dim

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    # q/k/v as HF hands them over: transposed views of [B, L, H, D].
    q = rnd(B, L, H, D).detach().transpose(1, 2).requires_grad_(requires_grad)
    k = rnd(B, L, Hkv, D).detach().transpose(1, 2).requires_grad_(requires_grad)
    v = rnd(B, L, Hkv, D).detach().transpose(1, 2).requires_grad_(requires_grad)
    return q, k, v, rnd(Hkv, P, D), rnd(Hkv, P, D)


def _concat(x, prefix):
    return torch.cat([prefix.unsqueeze(0).expand(x.shape[0], -1, -1, -1), x], dim=2)


def ours(backend: str = "auto") -> Callable:
    def run(q, k, v, pk, pv, causal):
        return prefix_attention(q, k, v, pk, pv, causal=causal, backend=backend)

    return run


def sdpa(kernel: str | None = None) -> Callable:
    """Concatenate, then scaled_dot_product_attention (optionally pinned to one SDPA kernel)."""

    def run(q, k, v, pk, pv, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right

        kk, vv = _concat(k, pk), _concat(v, pv)
        if q.shape[1] != k.shape[1]:  # the causal bias does not take enable_gqa: repeat K/V, as users do
            rep = q.shape[1] // k.shape[1]
            kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
        mask = causal_lower_right(q.shape[2], kk.shape[2]) if causal else None
        if kernel is None:
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        with sdpa_kernel(getattr(SDPBackend, kernel)):
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)

    return run


class FlexFallback(RuntimeError):
    """FlexAttention ran its unfused eager path (dynamo gave up compiling): not a FlexAttention timing."""


def _flex_warned() -> bool:
    from torch.nn.attention import flex_attention as module

    return "flex_attention_performance" in getattr(module, "_WARNINGS_SHOWN", ())


def flex() -> Callable:
    """Concatenate, then FlexAttention (compiled) with a bottom-right causal mask_mod.

    Compiled with dynamic shapes, so a sweep does not recompile per shape; dynamo's recompile limit is raised and
    made an error, and the first call at each shape checks that the unfused eager path (which FlexAttention warns
    about) did not run: a fallback raises :class:`FlexFallback`, so it is reported, never timed as "flex"."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    config = torch._dynamo.config
    if hasattr(config, "recompile_limit"):
        config.recompile_limit = max(config.recompile_limit, 64)
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True
    compiled = torch.compile(flex_attention, dynamic=True)
    masks: dict = {}
    checked: set = set()

    def run(q, k, v, pk, pv, causal):
        kk, vv = _concat(k, pk), _concat(v, pv)
        block_mask = None
        L, n = q.shape[2], kk.shape[2]
        if causal:
            key = (L, n, q.device)
            if key not in masks:
                offset = n - L
                masks[key] = create_block_mask(lambda b, h, i, j: j <= i + offset, None, None, L, n, device=q.device)
            block_mask = masks[key]
        shape = (tuple(q.shape), n, causal, q.dtype)
        warned = _flex_warned()
        try:
            out = compiled(q, kk, vv, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
        except Exception as e:
            if "recompile" in type(e).__name__.lower() or "limit" in str(e).lower():
                raise FlexFallback(f"dynamo's recompile limit was hit ({type(e).__name__})") from e
            raise
        if shape not in checked:
            if not warned and _flex_warned():
                raise FlexFallback("FlexAttention ran its unfused eager path (not compiled)")
            checked.add(shape)
        return out

    return run


def flash_attn() -> Callable:
    """Concatenate, then flash-attn's function (its causal mask is bottom-right aligned)."""
    from flash_attn import flash_attn_func

    def run(q, k, v, pk, pv, causal):
        kk, vv = _concat(k, pk), _concat(v, pv)
        out = flash_attn_func(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)

    return run


# Providers that hold score-sized tensors ([B, Hq, L, P + L]): about this many fp32 copies for forward + backward.
SCORE_COPIES = {"prefix_kernels[torch]": 4, "concat+sdpa": 4, "concat+sdpa[math]": 4}


def free_bytes(device: torch.device) -> int:
    """Memory a benchmark may still take: free CUDA memory, or the CPU's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def memory_reason(provider: str, shape: Shape, device: torch.device) -> str | None:
    """Why ``provider`` is skipped at ``shape`` (its score tensors would not fit), or None."""
    copies = SCORE_COPIES.get(provider)
    if not copies:
        return None
    scores = shape.batch * shape.heads_q * shape.seq * (shape.prefix + shape.seq) * 4
    free = free_bytes(device)
    if copies * scores <= 0.8 * free:
        return None
    return (f"skipped: its score tensors need about {copies * scores / 2**30:.1f} GiB ({copies} x fp32 "
            f"[{shape.batch}, {shape.heads_q}, {shape.seq}, {shape.prefix + shape.seq}]), {free / 2**30:.1f} GiB free")


def available_providers(device: torch.device) -> dict[str, Callable[[], Callable]]:
    """Provider name -> factory, for those that can run on ``device``."""
    from . import backends

    spec_device = torch.device(device)
    found: dict[str, Callable[[], Callable]] = {}
    for name in backends.names():
        if not backends.get(name).device_reasons(spec_device) and not (name == "triton" and spec_device.type == "cpu"):
            found[f"prefix_kernels[{name}]"] = lambda name=name: ours(name)
    if spec_device.type == "cuda":
        for kernel in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            found[f"concat+sdpa[{kernel.split('_')[0].lower()}]"] = lambda kernel=kernel: sdpa(kernel)
        found["concat+flex"] = flex
        try:
            import flash_attn  # noqa: F401

            found["concat+flash_attn"] = flash_attn
        except ImportError:
            pass
    else:
        found["concat+sdpa"] = lambda: sdpa(None)
    return found

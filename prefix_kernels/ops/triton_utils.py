"""What the Triton launchers of every op share: interpreter detection, the device checks, the tile table an
architecture uses, the SM count, the device context of a launch, the dot precision, and ``TileConfig``.

This module does not import Triton at module level (``import prefix_kernels`` must not load triton.language
before a user sets TRITON_INTERPRET); the launchers that need Triton import their kernels on first launch.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # Triton < 3.4 has no knobs
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_reasons(device: torch.device) -> list[str]:
    """Why Triton kernels cannot run on ``device`` at all (empty when they can): every Triton backend's check."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return [f"triton is not importable ({e})"]
    if device.type == "cpu":
        if is_interpreting():
            return []
        return ["tensors are on the CPU and TRITON_INTERPRET is not set (Triton kernels need a GPU)"]
    if device.type != "cuda":
        return [f"device type {device.type!r} is not supported (CUDA GPUs only)"]
    if torch.version.hip is not None:
        return ["ROCm builds of PyTorch are not validated for these kernels"]
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return [f"GPU compute capability sm_{major}{minor} is below sm_80 (Ampere), the oldest supported"]
    return []


@dataclass(frozen=True)
class TileConfig:
    """One launch's tile: block_m x block_n (and block_k, the reduction step of the matrix-product kernels that
    have one), with the warps and pipeline stages Triton compiles it for."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    block_k: int = 0


def arch_of(device: torch.device) -> int:
    """The tile table an architecture uses: 90 for sm_90 and newer, else 80."""
    if device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def device_ctx(t: torch.Tensor):
    """The context a launch on ``t``'s device runs in (its CUDA device; nothing for CPU tensors)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision. fp32 inputs use 3xTF32 (tensor cores, about fp32 accuracy): whoever
    passes fp32 asked for fp32 accuracy, and plain fp32 FMA dots spill registers at any useful tile."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (``triton.cdiv`` without importing Triton)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (``triton.next_power_of_2`` without importing Triton)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()

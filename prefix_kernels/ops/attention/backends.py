"""The backends of prefix attention, each declaring what it supports, and the op's dispatcher.

``backend="auto"`` walks triton > cuda > torch (:mod:`..dispatch` has the rules). Triton comes first
because it serves every feature; the CUDA kernels serve plain calls when asked for by name, and "auto"
keeps this order until a GPU has measured both. ``PREFIX_KERNELS_BACKEND`` replaces "auto" with a name.

An implementation's limits are declared by the implementation itself (``cuda.MAX_HEAD_DIM``,
``triton_impl.MAX_HEAD_DIM``, ...); each backend class below gathers them as capabilities, and
:meth:`AttentionBackend.input_reasons` turns the capabilities into reasons.
"""

from __future__ import annotations

import re

import torch

from ... import _ext
from .. import triton_utils
from ..dispatch import ENV_VAR, Backend, Dispatcher
from . import cuda, torch_impl, triton_impl
from .features import FEATURES
from .inputs import AttentionSpec

ALL_FEATURES = frozenset(f.name for f in FEATURES)
_KIND = {f.name: f for f in FEATURES}


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d)[6:] for d in dtypes)


class AttentionBackend(Backend):
    """Capabilities, overridden by each backend. ``SUPPORTED_DTYPES`` empty: any. Head dims in
    ``MIN_HEAD_DIM..MAX_HEAD_DIM`` (None: no limit), multiples of ``HEAD_DIM_MULTIPLE``, and at most
    ``MAX_HEAD_DIM_FOR[dtype]`` for the dtypes listed there; ``SUPPORTED_FEATURES``: names of
    ``features.FEATURES``. The ``WHY_*`` texts say why a limit is there, for the reasons."""

    SUPPORTED_DTYPES: tuple = ()
    WHY_DTYPES = ""
    MIN_HEAD_DIM = 1
    MAX_HEAD_DIM: int | None = None
    HEAD_DIM_MULTIPLE = 1
    WHY_HEAD_DIM = ""
    MAX_HEAD_DIM_FOR: dict = {}
    WHY_MAX_HEAD_DIM_FOR = ""
    SUPPORTED_FEATURES: frozenset = ALL_FEATURES
    KERNELS = "these kernels"  # how reasons name the implementation
    # The forward must return the LSE for the backward to use.
    lse_for_backward = True

    def input_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        D = spec.head_dim
        if self.SUPPORTED_DTYPES and spec.dtype not in self.SUPPORTED_DTYPES:
            why = f": {self.WHY_DTYPES}" if self.WHY_DTYPES else ""
            reasons.append(f"dtype {spec.dtype} is not supported ({_dtype_names(self.SUPPORTED_DTYPES)}{why})")
        top = self.MAX_HEAD_DIM
        if self.MAX_HEAD_DIM_FOR.get(spec.dtype, D) < D <= (top or D):
            reasons.append(f"{str(spec.dtype)[6:]} at head dim {D} is not supported ({self.WHY_MAX_HEAD_DIM_FOR})")
        if D < self.MIN_HEAD_DIM or (top is not None and D > top) or D % self.HEAD_DIM_MULTIPLE:
            if self.HEAD_DIM_MULTIPLE > 1:
                allowed = f"a multiple of {self.HEAD_DIM_MULTIPLE}" + (f" up to {top}" if top else "")
            else:
                allowed = f"{self.MIN_HEAD_DIM}..{top}" if top else f"at least {self.MIN_HEAD_DIM}"
            reasons.append(f"head dim {D} is not supported ({allowed}: {self.WHY_HEAD_DIM})")
        missing = [name for name in spec.features if name not in self.SUPPORTED_FEATURES]
        scores = [name for name in missing if _KIND[name].kind == "scores"]
        if scores:
            reasons.append(f"optional features {scores} are not implemented by {self.KERNELS} yet")
        for name in missing:
            if _KIND[name].kind != "scores":
                reasons.append(f"{_KIND[name].label} are not implemented by {self.KERNELS} yet")
        return reasons


def archs_cover(archs: str, major: int, minor: int) -> bool:
    """Whether a TORCH_CUDA_ARCH_LIST ("8.0;9.0", "8.6+PTX", "9.0a") yields code a GPU of compute
    capability major.minor can run: machine code of the same major and a minor no higher, or PTX of an
    architecture no newer (which the driver compiles)."""
    for m in re.finditer(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", archs):
        a_major, a_minor, suffix, ptx = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        if a_major == major and a_minor <= minor and (not suffix or a_minor == minor):
            return True
        if ptx and (a_major, a_minor) <= (major, minor):
            return True
    return False


class TritonAttention(AttentionBackend):
    name = "triton"
    description = "fused Triton kernels (CUDA GPUs sm_80+, or the CPU under TRITON_INTERPRET=1)"
    SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
    MIN_HEAD_DIM = triton_impl.MIN_HEAD_DIM
    MAX_HEAD_DIM = triton_impl.MAX_HEAD_DIM
    WHY_HEAD_DIM = ("tiles pad the head dim to a power of two; above 256 a tile no longer fits shared memory, "
                    "below 16 tensor-core dots cannot be formed")
    MAX_HEAD_DIM_FOR = {torch.float32: triton_impl.MAX_HEAD_DIM_FP32}
    WHY_MAX_HEAD_DIM_FOR = (f"float32 runs as 3xTF32, which spills registers above head dim "
                            f"{triton_impl.MAX_HEAD_DIM_FP32}; use bf16/fp16 or the torch backend")
    KERNELS = "the Triton kernels"

    def device_reasons(self, device: torch.device) -> list[str]:
        return triton_utils.device_reasons(device)

    def input_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = super().input_reasons(spec)
        gpu_top = triton_impl.MAX_HEAD_DIM_FP32_GPU
        if spec.device.type == "cuda" and spec.dtype == torch.float32 and gpu_top < spec.head_dim <= \
                triton_impl.MAX_HEAD_DIM_FP32:
            reasons.append(f"float32 at head dim {spec.head_dim} is not supported on a GPU (3xTF32 spills registers "
                           f"above head dim {gpu_top} in the backward kernels; use bf16/fp16 or the torch backend)")
        return reasons

    def decode_reasons(self, spec: AttentionSpec, needs_grad: bool = False) -> list[str]:
        """Why the decode kernel (``triton_decode``: Lq <= 16, forward only) would not serve a call of this spec
        that this backend serves (empty when it would); ``needs_grad``: a backward will follow. Imports the
        kernels (Triton must be importable)."""
        return triton_impl._decode().reasons(spec.len_q, spec.features, needs_grad)

    def impl(self):
        return triton_impl


class CudaAttention(AttentionBackend):
    name = "cuda"
    description = "CUDA C++ kernels of csrc/ (fp16/bf16 mma.sync, sm_80+; not yet validated on hardware)"
    SUPPORTED_DTYPES = cuda.DTYPES
    WHY_DTYPES = "the kernels run fp16/bf16 tensor-core products"
    MAX_HEAD_DIM = cuda.MAX_HEAD_DIM
    HEAD_DIM_MULTIPLE = cuda.HEAD_DIM_MULTIPLE
    WHY_HEAD_DIM = "rows move as 16-byte vectors, and larger tiles are not compiled"
    SUPPORTED_FEATURES = cuda.SUPPORTED_FEATURES
    KERNELS = "the CUDA kernels"

    def device_reasons(self, device: torch.device) -> list[str]:
        if _ext.load() is None:
            return [f"the CUDA extension prefix_kernels._C is not available ({_ext.error()}; "
                    f"build record: {_ext.build_info().get('extension', 'none')})"]
        if device.type != "cuda":
            return [f"tensors are on {device.type!r}, not a CUDA device (the CUDA kernels need a CUDA tensor)"]
        if torch.version.hip is not None:
            return ["ROCm builds of PyTorch are not supported by the CUDA kernels"]
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return [f"GPU compute capability sm_{major}{minor} is below sm_80 (cp.async and bf16 mma.sync need "
                    "Ampere)"]
        archs = _ext.build_info().get("archs")
        if archs and not archs_cover(archs, major, minor):
            return [f"the extension was built for TORCH_CUDA_ARCH_LIST={archs!r}, which has no code for "
                    f"sm_{major}{minor} (rebuild with that architecture in the list)"]
        return []

    def impl(self):
        return cuda


class TorchAttention(AttentionBackend):
    name = "torch"
    description = "stock PyTorch: fused CPU attention kernels over [prefix ; input], else explicit fp32 math"

    def impl(self):
        return torch_impl


DISPATCHER = Dispatcher("prefix_attention", AttentionSpec, (ENV_VAR,))
for _backend in (TritonAttention(), CudaAttention(), TorchAttention()):
    DISPATCHER.register(_backend)

# The op calls these through the module (``backends.select(...)``), so a wrapper set here sees every call.
names = DISPATCHER.names
get = DISPATCHER.get
register = DISPATCHER.register
unregister = DISPATCHER.unregister
select = DISPATCHER.select
describe = DISPATCHER.describe

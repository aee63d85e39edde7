"""The backends of the reparameterization projection, each declaring what it supports, and the op's dispatcher.

Two backends: "triton" (GPU, or the CPU under TRITON_INTERPRET=1) and "torch" (anywhere). ``backend="auto"``
takes triton when it can serve, else torch, warning once when triton could run on the device but declines the
input (:mod:`..dispatch` has the rules). ``PREFIX_KERNELS_REPARAM_BACKEND``, or else ``PREFIX_KERNELS_BACKEND``,
replaces "auto" with a name; a name the attention op knows but this op does not have (say "cuda" from
``PREFIX_KERNELS_BACKEND``) is an explicit request it cannot serve: set ``PREFIX_KERNELS_REPARAM_BACKEND`` to
pick this op's backend separately.
"""

from __future__ import annotations

import torch

from .. import triton_utils
from ..dispatch import ENV_VAR as PACKAGE_ENV_VAR
from ..dispatch import Backend, Dispatcher
from . import torch_impl, triton_impl
from .inputs import ReparamSpec

ENV_VAR = "PREFIX_KERNELS_REPARAM_BACKEND"


def _short(dtype: torch.dtype) -> str:
    return str(dtype)[6:]


class ReparamBackend(Backend):
    """Capabilities, overridden by each backend: ``SUPPORTED_DTYPE_PAIRS`` (parameter dtype, compute dtype),
    empty for any; ``MAX_NUMEL``, the largest tensor it can address (None: no limit)."""

    SUPPORTED_DTYPE_PAIRS: tuple = ()
    MAX_NUMEL: int | None = None
    WHY_MAX_NUMEL = ""

    def input_reasons(self, spec: ReparamSpec) -> list[str]:
        reasons = []
        pairs = self.SUPPORTED_DTYPE_PAIRS
        if pairs and (spec.param_dtype, spec.compute_dtype) not in pairs:
            listed = ", ".join(f"{_short(p)} -> {_short(c)}" for p, c in pairs)
            reasons.append(f"parameters in {spec.param_dtype} computed in {spec.compute_dtype} are not supported "
                           f"(parameter -> compute dtype: {listed})")
        if self.MAX_NUMEL is not None and spec.largest_numel > self.MAX_NUMEL:
            reasons.append(f"a tensor of {spec.largest_numel} elements needs 64-bit offsets ({self.WHY_MAX_NUMEL})")
        return reasons


class TritonReparam(ReparamBackend):
    name = "triton"
    description = "fused Triton kernels (CUDA GPUs sm_80+, or the CPU under TRITON_INTERPRET=1)"
    SUPPORTED_DTYPE_PAIRS = triton_impl.DTYPE_PAIRS
    MAX_NUMEL = triton_impl.MAX_NUMEL
    WHY_MAX_NUMEL = "the kernels use 32-bit offsets, up to 2**31 - 1 elements"

    def device_reasons(self, device: torch.device) -> list[str]:
        return triton_utils.device_reasons(device)

    def impl(self):
        return triton_impl


class TorchReparam(ReparamBackend):
    name = "torch"
    description = "stock PyTorch: the MLP in the compute dtype, then a copy into the prefix layout"

    def impl(self):
        return torch_impl


DISPATCHER = Dispatcher("prefix projection", ReparamSpec, (ENV_VAR, PACKAGE_ENV_VAR), action="project this prefix",
                        kernel="reparameterization kernel")
for _backend in (TritonReparam(), TorchReparam()):
    DISPATCHER.register(_backend)

names = DISPATCHER.names
get = DISPATCHER.get
select = DISPATCHER.select
describe = DISPATCHER.describe

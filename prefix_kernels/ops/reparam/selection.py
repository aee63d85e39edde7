"""Which backend serves a projection call, and why the others can't: the rules of ``prefix_kernels.backends``
applied to the reparameterization op.

The op has two backends, "triton" (GPU, or the CPU under TRITON_INTERPRET=1) and "torch" (anywhere).
``backend="auto"`` takes triton when it can serve, else torch, and warns once when triton could run on
the device but declines the input. ``PREFIX_KERNELS_REPARAM_BACKEND``, or else
``PREFIX_KERNELS_BACKEND``, replaces "auto" with a name. A backend named explicitly that cannot serve
raises :class:`BackendUnavailableError` listing every reason; that includes a name the attention op
knows but this op does not have (say "cuda" from ``PREFIX_KERNELS_BACKEND``: set
``PREFIX_KERNELS_REPARAM_BACKEND`` to pick this op's backend separately).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ... import backends
from .inputs import ReparamSpec

ENV_VAR = "PREFIX_KERNELS_REPARAM_BACKEND"
NAMES = ("triton", "torch")


def _triton_reasons(spec: ReparamSpec) -> list[str]:
    reasons = backends._triton_device_reasons(spec.device)
    if reasons:
        return reasons
    from .triton_impl import DTYPE_PAIRS, MAX_NUMEL

    if (spec.param_dtype, spec.compute_dtype) not in DTYPE_PAIRS:
        pairs = ", ".join(f"{str(p)[6:]} -> {str(c)[6:]}" for p, c in DTYPE_PAIRS)
        reasons.append(f"parameters in {spec.param_dtype} computed in {spec.compute_dtype} are not supported "
                       f"(parameter -> compute dtype: {pairs})")
    if spec.largest_numel > MAX_NUMEL:
        reasons.append(f"a tensor of {spec.largest_numel} elements needs 64-bit offsets (the kernels use 32-bit "
                       "offsets, up to 2**31 - 1 elements)")
    return reasons


def not_supported_reasons(name: str, spec: ReparamSpec) -> list[str]:
    """Why backend ``name`` cannot serve ``spec`` (empty when it can)."""
    if name == "triton":
        return _triton_reasons(spec)
    if name == "torch":
        return []
    raise ValueError(f"unknown reparam backend {name!r}")


def select(spec: ReparamSpec, requested: str = "auto") -> str:
    """The name of the backend that serves ``spec``; see the module docstring for the rules."""
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, got {type(requested).__name__}")
    values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    values["device"] = str(spec.device)
    return _select_name(requested, *values.values())


@backends._assume_constant_result
def _select_name(requested: str, *fields) -> str:
    # As for attention: a function of sizes, dtypes, device and environment only, so torch.compile
    # evaluates it once at trace time; the spec travels as plain values.
    values = dict(zip((f.name for f in dataclasses.fields(ReparamSpec)), fields, strict=True))
    values["device"] = torch.device(values["device"])
    spec = ReparamSpec(**values)
    source = "backend argument"
    if requested == "auto":
        for var in (ENV_VAR, backends.ENV_VAR):
            env = os.environ.get(var, "").strip()
            if env and env != "auto":
                requested, source = env, f"{var} environment variable"
                break
    if requested != "auto":
        if requested not in NAMES:
            if requested in backends.names():
                raise backends.BackendUnavailableError(
                    f"backend {requested!r} (from the {source}) has no reparameterization kernel; this op's "
                    f"backends are {list(NAMES)} (set {ENV_VAR} to choose one for it alone)")
            raise ValueError(f"unknown backend {requested!r}; choose 'auto' or one of {list(NAMES)}")
        reasons = not_supported_reasons(requested, spec)
        if reasons:
            raise backends.BackendUnavailableError(
                f"backend {requested!r} (from the {source}) cannot project this prefix:\n  - " + "\n  - ".join(reasons))
        return requested
    if not backends._triton_device_reasons(spec.device):
        reasons = _triton_reasons(spec)
        if not reasons:
            return "triton"
        backends._warn_once(f"prefix projection: using the 'torch' backend; skipped 'triton' because "
                            f"{', '.join(reasons)}")
    return "torch"

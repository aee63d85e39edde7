"""Backend registry: which implementation serves a prefix-attention call, and why the others can't.

Each backend answers ``not_supported_reasons(spec)`` with a list of plain-language reasons (empty
when it can serve). ``backend="auto"`` walks the preference order cuda > triton > torch and takes the
first that can serve; ``PREFIX_KERNELS_BACKEND`` replaces "auto" with a name. A backend named
explicitly (by argument or by the variable) that cannot serve raises :class:`BackendUnavailableError`
listing every reason. When "auto" has to skip a GPU backend that could otherwise run on the device,
it warns once with the reasons, so a slow fallback is never silent.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .ops.attention.inputs import AttentionSpec

ENV_VAR = "PREFIX_KERNELS_BACKEND"


class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot serve this input."""


@dataclass
class Backend:
    name: str
    description: str
    # Reasons the backend cannot run at all on this device (not input-specific).
    device_reasons: Callable[[torch.device], list[str]]
    # Reasons it cannot take this particular input.
    input_reasons: Callable[[AttentionSpec], list[str]]
    # The forward must return the LSE for the backward to use.
    lse_for_backward: bool
    _impl: Callable[[], object] = field(repr=False, default=None)

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = self.device_reasons(spec.device)
        return reasons if reasons else self.input_reasons(spec)

    def impl(self):
        """The module with ``forward`` and ``backward`` functions (imported on first use)."""
        return self._impl()


def _triton_device_reasons(device: torch.device) -> list[str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return [f"triton is not importable ({e})"]
    from .ops.attention.triton_impl import is_interpreting

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


def _triton_input_reasons(spec: AttentionSpec) -> list[str]:
    from .ops.attention.triton_impl import MAX_HEAD_DIM, MAX_HEAD_DIM_FP32, MIN_HEAD_DIM

    reasons = []
    if spec.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {spec.dtype} is not supported (float16, bfloat16, float32)")
    elif spec.dtype == torch.float32 and MAX_HEAD_DIM_FP32 < spec.head_dim <= MAX_HEAD_DIM:
        reasons.append(
            f"float32 at head dim {spec.head_dim} is not supported (float32 runs as 3xTF32, which spills "
            f"registers above head dim {MAX_HEAD_DIM_FP32}; use bf16/fp16 or the torch backend)"
        )
    if not MIN_HEAD_DIM <= spec.head_dim <= MAX_HEAD_DIM:
        reasons.append(
            f"head dim {spec.head_dim} is outside {MIN_HEAD_DIM}..{MAX_HEAD_DIM} (tiles pad the head dim to "
            "a power of two; above 256 a tile no longer fits shared memory, below 16 tensor-core dots "
            "cannot be formed)"
        )
    return reasons


def _cuda_device_reasons(device: torch.device) -> list[str]:
    from . import _ext

    if _ext.load() is None:
        return [f"the CUDA extension prefix_kernels._C is not available ({_ext.error()}; "
                f"build record: {_ext.build_info().get('extension', 'none')})"]
    if device.type != "cuda":
        return [f"tensors are on {device.type!r}, not a CUDA device (the CUDA kernels need a CUDA tensor)"]
    if torch.version.hip is not None:
        return ["ROCm builds of PyTorch are not supported by the CUDA kernels"]
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return [f"GPU compute capability sm_{major}{minor} is below sm_80 (cp.async and bf16 mma.sync need Ampere)"]
    archs = _ext.build_info().get("archs")
    if archs and not archs_cover(archs, major, minor):
        return [f"the extension was built for TORCH_CUDA_ARCH_LIST={archs!r}, which has no code for sm_{major}{minor} "
                "(rebuild with that architecture in the list)"]
    return []


def archs_cover(archs: str, major: int, minor: int) -> bool:
    """Whether a TORCH_CUDA_ARCH_LIST ("8.0;9.0", "8.6+PTX", "9.0a") yields code a GPU of compute
    capability major.minor can run: machine code of the same major and a minor no higher, or PTX of an
    architecture no newer (which the driver compiles)."""
    import re

    for m in re.finditer(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", archs):
        a_major, a_minor, suffix, ptx = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        if a_major == major and a_minor <= minor and (not suffix or a_minor == minor):
            return True
        if ptx and (a_major, a_minor) <= (major, minor):
            return True
    return False


def _cuda_input_reasons(spec: AttentionSpec) -> list[str]:
    from .ops.attention.cuda import DTYPES, HEAD_DIM_MULTIPLE, MAX_HEAD_DIM

    reasons = []
    if spec.dtype not in DTYPES:
        reasons.append(f"dtype {spec.dtype} is not supported (float16, bfloat16: the kernels run fp16/bf16 "
                       "tensor-core products)")
    if spec.head_dim % HEAD_DIM_MULTIPLE or spec.head_dim > MAX_HEAD_DIM:
        reasons.append(f"head dim {spec.head_dim} is not supported (a multiple of {HEAD_DIM_MULTIPLE} up to "
                       f"{MAX_HEAD_DIM}: rows move as 16-byte vectors, and larger tiles are not compiled)")
    if spec.features:
        reasons.append(f"optional features {spec.features} are not implemented by the CUDA kernels yet")
    if spec.prefix_count > 1 or spec.has_prefix_index or spec.has_prefix_lengths:
        reasons.append("prefix banks (prefix_index / prefix_lengths, or more than one prefix) are not implemented "
                       "by the CUDA kernels yet")
    return reasons


def _torch_device_reasons(device: torch.device) -> list[str]:
    return []


def _torch_input_reasons(spec: AttentionSpec) -> list[str]:
    return []


def _import_cuda_impl():
    from .ops.attention import cuda

    return cuda


def _import_triton_impl():
    from .ops.attention import triton_impl

    return triton_impl


def _import_torch_impl():
    from .ops.attention import torch_impl

    return torch_impl


_REGISTRY: dict[str, Backend] = {}

# Decisions already taken, keyed by everything they depend on: the request, the spec's values, the two
# environment variables read and the registered backends. A decode loop calls prefix_attention once per
# layer per token with the same sizes; walking the backends' checks every time cost more than the attention
# of a small decode step. Each entry keeps the fallback warning it raised, re-issued (once) on a hit.
_decisions: dict[tuple, tuple[str, str | None]] = {}
_MAX_DECISIONS = 4096


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend
    _decisions.clear()


register(
    Backend(
        name="cuda",
        description="CUDA C++ kernels of csrc/ (fp16/bf16 mma.sync, sm_80+; not yet validated on hardware)",
        device_reasons=_cuda_device_reasons,
        input_reasons=_cuda_input_reasons,
        lse_for_backward=True,
        _impl=_import_cuda_impl,
    )
)
register(
    Backend(
        name="triton",
        description="fused Triton kernels (CUDA GPUs sm_80+, or the CPU under TRITON_INTERPRET=1)",
        device_reasons=_triton_device_reasons,
        input_reasons=_triton_input_reasons,
        lse_for_backward=True,
        _impl=_import_triton_impl,
    )
)
register(
    Backend(
        name="torch",
        description="stock PyTorch: fused CPU attention kernels over [prefix ; input], else explicit fp32 math",
        device_reasons=_torch_device_reasons,
        input_reasons=_torch_input_reasons,
        lse_for_backward=True,
        _impl=_import_torch_impl,
    )
)

PREFERENCE = ("cuda", "triton", "torch")


def names() -> list[str]:
    """Registered backends in preference order."""
    return [n for n in PREFERENCE if n in _REGISTRY] + [n for n in _REGISTRY if n not in PREFERENCE]


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {names()}") from None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(AttentionSpec))
_DEVICE_FIELD = _SPEC_FIELDS.index("device")


def select(spec: AttentionSpec, requested: str = "auto") -> Backend:
    """Pick the backend for ``spec``; see the module docstring for the rules."""
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, got {type(requested).__name__}")
    values = [getattr(spec, name) for name in _SPEC_FIELDS]
    values[_DEVICE_FIELD] = str(spec.device)
    return _REGISTRY[_select_name(requested, *values)]


def _assume_constant_result(fn):
    """What ``torch.compiler.assume_constant_result`` does (it only sets this flag), without importing
    torch._dynamo at package import: that import takes seconds and loads triton.language, which must
    not happen before a user sets TRITON_INTERPRET. tests/ops/test_compile.py checks the flag."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _select_name(requested: str, *fields) -> str:
    # The choice depends only on sizes, dtype, device and the environment, all fixed for a traced
    # graph, so torch.compile evaluates it once at trace time instead of tracing through it. The spec
    # travels as plain values (the device as a string), which the compiler can hand over as constants.
    key = (requested, fields, os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"), tuple(names()))
    hit = _decisions.get(key)
    if hit is None:
        if len(_decisions) >= _MAX_DECISIONS:
            _decisions.clear()
        hit = _decisions[key] = _decide(requested, fields)
    name, warning = hit
    if warning is not None:
        _warn_once(warning)
    return name


def _decide(requested: str, fields: tuple) -> tuple[str, str | None]:
    """(the backend's name, the fallback warning to raise or None); raises when an explicit backend
    cannot serve."""
    values = dict(zip(_SPEC_FIELDS, fields, strict=True))
    values["device"] = torch.device(values["device"])
    spec = AttentionSpec(**values)
    source = "backend argument"
    if requested == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            requested, source = env, f"{ENV_VAR} environment variable"
    if requested != "auto":
        backend = get(requested)
        reasons = backend.not_supported_reasons(spec)
        if reasons:
            raise BackendUnavailableError(
                f"backend {requested!r} (from the {source}) cannot serve this input:\n  - "
                + "\n  - ".join(reasons)
            )
        return backend.name, None

    skipped = []
    for name in names():
        backend = _REGISTRY[name]
        if not backend.device_reasons(spec.device):
            reasons = backend.input_reasons(spec)
            if not reasons:
                warning = None
                if skipped:
                    warning = (f"prefix_attention: using the {name!r} backend; skipped "
                               + "; ".join(f"{n!r} because {', '.join(r)}" for n, r in skipped))
                return name, warning
            skipped.append((name, reasons))
    raise BackendUnavailableError("no backend can serve this input: " + str(skipped))  # torch serves all


def describe() -> list[dict]:
    """Availability of each backend on this machine (for ``python -m prefix_kernels info``)."""
    rows = []
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.insert(0, torch.device("cuda", torch.cuda.current_device()))
    for name in names():
        b = _REGISTRY[name]
        per_device = {str(d): b.device_reasons(d) for d in devices}
        rows.append({"name": name, "description": b.description, "devices": per_device})
    return rows

"""The attention op's backends, under the name the command line, the benchmarks and older code import.

Dispatch lives beside each op: ``prefix_kernels.ops.attention.backends`` (the attention backends and their
capabilities), ``prefix_kernels.ops.reparam.backends`` (the projection's), both on the shared rules of
``prefix_kernels.ops.dispatch``. This module re-exports the attention op's.
"""

from .ops.attention.backends import (
    ENV_VAR,
    AttentionBackend,
    CudaAttention,
    TorchAttention,
    TritonAttention,
    archs_cover,
    describe,
    get,
    names,
    register,
    select,
    unregister,
)
from .ops.dispatch import Backend, BackendUnavailableError

__all__ = ["ENV_VAR", "AttentionBackend", "Backend", "BackendUnavailableError", "CudaAttention", "TorchAttention",
           "TritonAttention", "archs_cover", "describe", "get", "names", "register", "select", "unregister"]

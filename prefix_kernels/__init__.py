"""prefix_kernels: fused kernels for prefix tuning and P-Tuning v2.

The public API lives here and nothing else: see ``prefix_attention`` and ``PrefixEncoder``.
"""

from .backends import BackendUnavailableError
from .modules import PrefixEncoder
from .ops.attention import prefix_attention, prefix_attention_ref, select_backend

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "PrefixEncoder",
    "__version__",
    "prefix_attention",
    "prefix_attention_ref",
    "select_backend",
]

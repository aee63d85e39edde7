"""prefix_kernels: fused kernels for prefix tuning and P-Tuning v2.

The public API lives here and nothing else: ``prefix_attention``, ``PrefixEncoder`` and ``PrefixBank`` (the
kernels and the prefix modules), and ``apply_prefix_tuning`` / ``PrefixConfig`` / ``load_peft_adapter(s)`` /
``save_peft_adapter`` (Hugging Face models and PEFT adapters; imported on first use, as they need transformers).
"""

from .modules import PrefixBank, PrefixEncoder
from .ops.attention import plan_prefix_attention, prefix_attention, prefix_attention_ref, select_backend
from .ops.dispatch import BackendUnavailableError

__version__ = "0.1.0"

# name -> module that defines it; imported on first access (PEP 562), so that `import prefix_kernels` does not
# import transformers.
_LAZY = {
    "PrefixConfig": ".integrations.hf",
    "PrefixHandle": ".integrations.hf",
    "UnsupportedModelError": ".integrations.hf",
    "apply_prefix_tuning": ".integrations.hf",
    "handle_of": ".integrations.hf",
    "supported_model_types": ".integrations.hf",
    "load_peft_adapter": ".integrations.hf.reload",
    "load_peft_adapters": ".integrations.peft",
    "save_peft_adapter": ".integrations.peft",
    "from_pretrained": ".integrations.hf.reload",
    "init_prefix_from_tokens": ".integrations.hf.init",
    "init_prefix_zeros": ".integrations.hf.init",
}

__all__ = [
    "BackendUnavailableError",
    "PrefixBank",
    "PrefixConfig",
    "PrefixEncoder",
    "PrefixHandle",
    "UnsupportedModelError",
    "__version__",
    "apply_prefix_tuning",
    "from_pretrained",
    "handle_of",
    "init_prefix_from_tokens",
    "init_prefix_zeros",
    "load_peft_adapter",
    "load_peft_adapters",
    "plan_prefix_attention",
    "prefix_attention",
    "prefix_attention_ref",
    "save_peft_adapter",
    "select_backend",
    "supported_model_types",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

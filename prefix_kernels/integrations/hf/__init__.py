"""Prefix tuning for Hugging Face transformers models, through prefix_kernels' attention.

Rooms: ``config.py`` (PrefixConfig), ``families.py`` (the per-family adapters), ``apply.py`` (apply / remove),
``registration.py`` (our name in transformers' attention and mask interfaces), ``masks.py`` (the mask function),
``attention.py`` (the attention function), ``state.py`` (the prefix once per forward, per-module slots),
``positions.py`` (position shift, ALiBi slopes), ``bloom.py`` (Bloom's instance-level attention forward),
``reference.py`` (the eager PEFT-style reference used by tests and the demo).
"""

from .apply import PrefixHandle, apply_prefix_tuning
from .config import PrefixConfig
from .families import FAMILIES, UnsupportedModelError, supported_model_types

__all__ = ["FAMILIES", "PrefixConfig", "PrefixHandle", "UnsupportedModelError", "apply_prefix_tuning",
           "supported_model_types"]

"""Prefix tuning for Hugging Face transformers models, through prefix_kernels' attention.

Rooms: ``config.py`` (PrefixConfig), ``families.py`` (the per-family adapters), ``facts.py`` (sizes, module
matching, task heads: a leaf), ``apply.py`` (apply_prefix_tuning and the handle, the user surface),
``patches.py`` (the undo stack of what applying changed), ``registration.py`` (our name in transformers'
attention and mask interfaces), ``masks.py`` (the mask function), ``attention.py`` (the attention function),
``state.py`` (the prefix once per forward, per-thread calls and selections, per-module slots), ``generation.py``
(the rows ``generate()`` repeats), ``positions.py`` (position shift, ALiBi slopes), ``heads.py`` (per-prefix task
heads), ``bloom.py`` (Bloom's instance-level attention forward), ``seq2seq.py`` (encoder-decoder sites: layout, T5's
prefix-column bias, BART-like decoder positions), ``reference.py`` (the eager PEFT-style reference
used by tests and the demo). Imports run one way: apply -> patches, state, heads, generation, registration ->
attention -> masks; nothing here imports ``integrations/peft.py``.
"""

from .apply import PrefixHandle, apply_prefix_tuning, handle_of
from .config import PrefixConfig
from .families import FAMILIES, UnsupportedModelError, supported_model_types

__all__ = ["FAMILIES", "PrefixConfig", "PrefixHandle", "UnsupportedModelError", "apply_prefix_tuning",
           "handle_of", "supported_model_types"]

"""Registration of our attention and mask functions with transformers, and the switch of a model's configs.

``register()`` adds one name, :data:`NAME`, to transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` (idempotent). That adds an entry to their registries and replaces nothing: a model
sees our functions only while its config names them, which :func:`switch` sets and :func:`restore` undoes. The
implementation a config named before is remembered, for modules that have no prefix and must be served as
before.
"""

from __future__ import annotations

import weakref

NAME = "prefix_kernels"

# id(config) -> (weak reference to the config, the implementation it named before the switch)
_PREVIOUS: dict[int, tuple[weakref.ref, str | None]] = {}


def register() -> None:
    """Make :data:`NAME` a valid attention implementation with its own mask function."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    from .attention import prefix_attention_forward
    from .masks import prefix_mask_interface

    AttentionInterface.register(NAME, prefix_attention_forward)
    AttentionMaskInterface.register(NAME, prefix_mask_interface)


def switch(config) -> str | None:
    """Point ``config`` at :data:`NAME`; returns the implementation it named before."""
    if id(config) in _PREVIOUS and _PREVIOUS[id(config)][0]() is config:
        raise ValueError(f"the config {type(config).__name__} already serves prefix tuning (remove the other handle "
                         "first)")
    previous = config._attn_implementation_internal
    _PREVIOUS[id(config)] = (weakref.ref(config), previous)
    config._attn_implementation_internal = NAME
    return previous


def restore(config) -> None:
    """Undo :func:`switch` for ``config``."""
    _, previous = _PREVIOUS.pop(id(config))
    config._attn_implementation_internal = previous


def previous_implementation(config) -> str:
    """The implementation ``config`` named before :func:`switch` ("eager" if it named none)."""
    entry = _PREVIOUS.get(id(config))
    if entry is None or entry[0]() is not config:
        raise RuntimeError(f"attention implementation {NAME!r} was called for a {type(config).__name__} that prefix "
                           "tuning did not switch (set config._attn_implementation back to what it was)")
    return entry[1] or "eager"

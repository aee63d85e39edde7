"""Instance-level ``generate`` and ``_expand_inputs_for_generation`` of a prefix-tuned model, so that a prefix
selection follows exactly the repetition of rows ``generate()`` makes (``num_beams``, ``num_return_sequences``)
and no other.

``generate()`` repeats each input row ``expand_size`` times by calling ``self._expand_inputs_for_generation``.
:class:`Generate` marks the calling thread as generating for the length of the call, and :class:`ExpandInputs`
records the ``expand_size`` of that call, which :meth:`~.state.PrefixState.begin_forward` then applies to the
selection. Both call the class's own method; they are plain objects (no closures), so the model deep-copies and
pickles with them, and ``remove()`` deletes them, uncovering the class's methods again.

On a CPU, :class:`Generate` hands a plain decoder-only call the prefix in its KV cache instead
(:mod:`.cached_generate`).
"""

from __future__ import annotations

import inspect

from . import cached_generate


def class_method(model, name: str):
    """The class's ``name`` bound to ``model`` (whatever kind of method it is), bypassing the instance attribute."""
    return inspect.getattr_static(type(model), name).__get__(model, type(model))


class Generate:
    """``model.generate``: the class's generate, inside ``state.generating()`` (and, when
    :func:`.cached_generate.prepare` takes the call, with the prefix in the cache)."""

    def __init__(self, model, state, family=None):
        self.model = model
        self.state = state
        self.family = family

    @property
    def __wrapped__(self):  # inspect.signature and help() show the class's generate
        return class_method(self.model, "generate")

    def __call__(self, *args, **kwargs):
        generate = class_method(self.model, "generate")
        family = getattr(self, "family", None)  # (None: pickled before the cache path existed)
        cached = None if family is None else cached_generate.prepare(self.model, self.state, family, args, kwargs)
        with self.state.generating():
            if cached is None:
                return generate(*args, **kwargs)
            with self.state.prefix_held_in_cache():
                return generate(**cached)


class ExpandInputs:
    """``model._expand_inputs_for_generation``: records the call's ``expand_size``, then expands as the class does."""

    def __init__(self, model, state):
        self.model = model
        self.state = state

    @property
    def __wrapped__(self):
        return class_method(self.model, "_expand_inputs_for_generation")

    def __call__(self, *args, **kwargs):
        self.state.record_expansion(kwargs.get("expand_size", args[0] if args else 1))
        return class_method(self.model, "_expand_inputs_for_generation")(*args, **kwargs)

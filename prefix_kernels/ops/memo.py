"""Memos of values derived from a tensor's contents (a range check that reads them back, padding bounds), and the
scope that makes them valid.

A model calls the attention op once per layer with the same padding mask and prefix selection, so what is derived
from their values need be computed once per forward, not once per layer. But a tensor's contents can change
without any sign the op could see cheaply: ``t.data[...] = x``, a numpy view (``t.numpy()[...] = x``), DLPack,
or any write through another tensor sharing the storage leave the version counter where it was. So the rule is:

- **Outside** :func:`memo_scope`, nothing is remembered: every call recomputes and rechecks.
- **Inside** a scope, a value is served again only for the same tensor object (held by a weak reference, so a
  new tensor at a freed one's address is a miss), an unmoved version counter where the tensor has one, and the
  same ``extra`` key. Whoever opens the scope promises that no tensor it covers is edited in place while it is
  open: a model integration opens one around one forward, within which nothing edits the mask or the selection
  between layers. Edits that bypass the version counter are seen by the first call after the scope closes.
- Scopes are per thread (a scope in one thread remembers nothing for another) and nest: the outermost one owns
  the remembered values, which are dropped when it closes.
- While a CUDA graph is being captured nothing is remembered or recalled: a replay runs the recorded kernels
  without Python, so it must record its own work. Inference tensors (``torch.inference_mode``) count no writes;
  inside a scope they are remembered on the scope's promise alone.
- Under ``torch.compile`` a scope is a no-op (the traced ops read no values back, so they have nothing to
  remember).
"""

from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["TensorMemo", "capturing", "in_memo_scope", "memo_scope", "scoped"]

_local = threading.local()


def _entries() -> dict | None:
    """This thread's remembered values while a scope is open, else None."""
    return getattr(_local, "entries", None)


class memo_scope:  # noqa: N801 (used as a function: ``with memo_scope():``)
    """Context manager within which :class:`TensorMemo` values may be served again (see the module docstring).

    Open it around a unit of work in which the tensors passed to the op are not edited in place, such as one
    forward of a model. Thread-local and nestable; re-usable but not shared between threads."""

    __slots__ = ("_opened",)

    def __init__(self):
        self._opened = []  # per __enter__: whether it opened a level (not under torch.compile)

    def __enter__(self):
        opened = not torch.compiler.is_compiling()
        self._opened.append(opened)
        if opened:
            depth = getattr(_local, "depth", 0)
            if depth == 0:
                _local.entries = {}
            _local.depth = depth + 1
        return self

    def __exit__(self, *exc):
        if self._opened.pop():
            _local.depth -= 1
            if _local.depth == 0:
                _local.entries = None
        return False


def in_memo_scope() -> bool:
    """Whether this thread is inside a :func:`memo_scope`."""
    return _entries() is not None


def scoped(key, make):
    """``make()``, made once per :func:`memo_scope` for ``key`` and served again inside it (every call outside
    one). For what holds for the whole unit of work a scope covers, as the tensors it covers do: the environment
    variables a backend choice reads are not changed in the middle of a model's forward."""
    entries = _entries()
    if entries is None:
        return make()
    key = ("scoped", key)
    value = entries.get(key, _NONE)
    if value is _NONE:
        value = entries[key] = make()
    return value


_NONE = object()


def capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on t's device: a graph replays its recorded work without running
    Python, so nothing may come from a memo filled outside it, and no value may be read back (a sync)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


class TensorMemo:
    """Values remembered per (name, tensor) inside a :func:`memo_scope`; outside one, ``get`` always misses and
    ``put`` keeps nothing. ``hits`` and ``misses`` count ``get``'s answers (for tests and diagnostics)."""

    def __init__(self):
        self.hits = 0
        self.misses = 0

    def get(self, name: str, t: torch.Tensor, extra=None):
        """The value put for this very tensor, name and extra in the current scope, or None."""
        entries = _entries()
        entry = None if entries is None or capturing(t) else entries.get((self, name, id(t)))
        if entry is not None:
            ref, version, entry_extra, value = entry
            if ref() is t and _version(t) == version and entry_extra == extra:
                self.hits += 1
                return value
        self.misses += 1
        return None

    def put(self, name: str, t: torch.Tensor, value, extra=None) -> None:
        entries = _entries()
        if entries is not None and not capturing(t):
            entries[(self, name, id(t))] = (weakref.ref(t), _version(t), extra, value)

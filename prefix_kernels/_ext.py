"""Loading of the compiled extension ``prefix_kernels._C``.

The package works without it (Triton and torch backends); when it is missing or fails to load, the
reason is kept for ``python -m prefix_kernels info`` instead of being swallowed.
"""

from __future__ import annotations

import importlib
import json
import os

_module = None
_error: str | None = None
_tried = False


def load():
    """Import the extension once; returns the module or None."""
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            _module = importlib.import_module("prefix_kernels._C")
        except ImportError as e:
            _error = f"{type(e).__name__}: {e}"
    return _module


def error() -> str | None:
    """Why the extension is not available (None when it loaded)."""
    load()
    return _error


def build_info() -> dict:
    """What setup.py recorded at build time (torch, CUDA, archs, whether the extension was built)."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"note": "no build record: running from a source tree that was not installed with pip"}

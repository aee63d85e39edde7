"""Measured tile tables, taken in preference to the built-in one of ``triton_impl.tile_config``.

A table is a JSON file written by the tuning stage of ``python -m prefix_kernels gpu-check``: the device
and Triton version it was measured with, and one entry per (kernel, BLOCK_D, element width, featured)
with the chosen tile and the timings behind the choice. It is used only on the device (by name) and the
Triton version it was measured with; anything else falls back to the built-in table, with a warning
when the table was asked for by name. Where it is looked for:

    PREFIX_KERNELS_TILES=/path/to/tiles.json   that file
    PREFIX_KERNELS_TILES=none                  no measured table at all
    (unset)                                    prefix_kernels/tiles/<device slug>.json, when shipped

:func:`overrides` sets entries for the current thread of work (the tuner's candidates); those apply
anywhere, the interpreter included.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import warnings
from dataclasses import dataclass

ENV_VAR = "PREFIX_KERNELS_TILES"
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tiles")
FORMAT = 1
KERNELS = ("fwd", "fwd_decode", "bwd_dkdv", "bwd_prefix_dkdv", "bwd_dq")
FIELDS = ("block_m", "block_n", "num_warps", "num_stages")

Key = tuple  # (kernel, block_d, element width 2 | 4, featured)


@dataclass(frozen=True)
class Table:
    device: str
    triton: str
    arch: int
    entries: dict  # Key -> (block_m, block_n, num_warps, num_stages)
    source: str


def slug(text: str) -> str:
    """A device name as a file name: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def key(kernel: str, block_d: int, elem_bytes: int, featured: bool = False) -> Key:
    return (kernel, int(block_d), 4 if elem_bytes >= 4 else 2, bool(featured))


def _pow2(n) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def parse(data: dict, source: str = "<dict>") -> Table:
    """Validate a table's JSON document; ValueError names the field that is wrong."""
    def bad(what):
        return ValueError(f"tile table {source}: {what}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"'format' must be {FORMAT}")
    for field in ("device", "triton"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise bad(f"'{field}' must be a non-empty string")
    if data.get("arch") not in (80, 90):
        raise bad("'arch' must be 80 or 90")
    entries = {}
    for i, e in enumerate(data.get("entries", [])):
        where = f"entries[{i}]"
        if e.get("kernel") not in KERNELS:
            raise bad(f"{where}.kernel must be one of {KERNELS}, got {e.get('kernel')!r}")
        if not _pow2(e.get("block_d")) or e["block_d"] < 16:
            raise bad(f"{where}.block_d must be a power of two >= 16")
        if e.get("elem_bytes") not in (2, 4):
            raise bad(f"{where}.elem_bytes must be 2 or 4")
        cfg = e.get("config", {})
        values = tuple(cfg.get(f) for f in FIELDS) if isinstance(cfg, dict) else ()
        if len(values) != 4 or not all(_pow2(v) for v in values[:3]) or min(values[:2]) < 16:
            raise bad(f"{where}.config needs block_m, block_n (powers of two >= 16), num_warps (a power of two) "
                      f"and num_stages, got {cfg!r}")
        if not isinstance(values[3], int) or not 1 <= values[3] <= 8:
            raise bad(f"{where}.config.num_stages must be an int in 1..8")
        entries[key(e["kernel"], e["block_d"], e["elem_bytes"], e.get("featured", False))] = values
    return Table(data["device"], data["triton"], data["arch"], entries, source)


def load(path: str) -> Table:
    with open(path) as f:
        return parse(json.load(f), path)


@functools.cache
def from_environment() -> tuple[Table | None, str]:
    """The measured table for this process (looked up once), and a sentence saying which and why."""
    requested = os.environ.get(ENV_VAR, "")
    if requested.lower() in ("none", "off", "0"):
        return None, f"built-in ({ENV_VAR}={requested})"
    import torch

    if not torch.cuda.is_available():
        return None, "built-in (no CUDA device)"
    import triton

    name = torch.cuda.get_device_name(torch.cuda.current_device())
    path = requested or os.path.join(SHIPPED_DIR, f"{slug(name)}.json")
    if not requested and not os.path.exists(path):
        return None, f"built-in (no measured table for {name})"
    try:
        table = load(path)
    except (OSError, ValueError) as e:
        reason = f"built-in ({path} not used: {e})"
    else:
        if table.device != name:
            reason = f"built-in ({path} was measured on {table.device}, this is {name})"
        elif table.triton != triton.__version__:
            reason = f"built-in ({path} was measured with Triton {table.triton}, this is {triton.__version__})"
        else:
            return table, f"{path} (measured on {name}, Triton {table.triton}, {len(table.entries)} entries)"
    if requested:
        warnings.warn(f"{ENV_VAR}: {reason}", stacklevel=2)
    return None, reason


_active: list[dict] = []


@contextlib.contextmanager
def overrides(entries: dict):
    """Use ``{key(...): (block_m, block_n, num_warps, num_stages)}`` inside the block (the tuner's candidates)."""
    _active.append(dict(entries))
    try:
        yield
    finally:
        _active.pop()


def lookup(kernel: str, block_d: int, elem_bytes: int, featured: bool, arch: int, interpreting: bool):
    """The measured (block_m, block_n, num_warps, num_stages) for this launch, or None for the built-in one."""
    k = key(kernel, block_d, elem_bytes, featured)
    for entries in reversed(_active):
        if k in entries:
            return entries[k]
    if interpreting:
        return None
    table = from_environment()[0]
    if table is None or table.arch != arch:
        return None
    return table.entries.get(k)


def describe() -> str:
    """Which tile table the launchers use in this process."""
    return from_environment()[1]

"""Shifting the real tokens' positions by P, the way a prefix held in the KV cache shifts them.

With PEFT the prefix occupies the first P cache slots, so a model that derives positions from the cache length
(RoPE, GPT-2's and BERT's learned positions, OPT's mask cumsum, RoBERTa's padding-aware ids) puts the first
real token at P, and PEFT adds P to position ids passed explicitly. Our prefix is not in the cache, so a forward
pre-hook on the module that consumes the position ids (the rotary embedding, the position embedding table) adds
P to them. Positions below ``first`` mark padding in some families (OPT: -1, RoBERTa: padding_idx) and stay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PositionSpec:
    """Where a family's position ids enter: the module at ``path`` (relative to the base model) receives them
    as positional argument ``index`` or keyword ``keyword``. ``first(config)`` is the first real position.
    ``shared``: the keyword holds one ``[L]`` row for the whole batch and the embedding broadcasts it
    (:class:`~.seq2seq.ShiftSharedPositions` shifts it, per row when needed)."""

    path: str
    index: int
    keyword: str
    first: object = None  # callable(config) -> int; None means 0
    shared: bool = False  # the keyword holds one [L] row for the whole batch (BART-like decoders), see seq2seq.py

    def first_position(self, config) -> int:
        return 0 if self.first is None else int(self.first(config))


class ShiftPositions:
    """Forward pre-hook adding the state's offset to the position ids at or above ``first`` (while
    ``state.enabled``): P, or with a per-row prefix selection each row's own prefix length (0 for a row without
    a prefix), so that every row gets the positions of the single-prefix model of its prefix. Position ids
    shared by the batch (``[1, L]``) then become ``[B, L]``."""

    def __init__(self, spec: PositionSpec, first: int, state):
        self.index = spec.index  # plain values only (a spec's ``first`` may be a lambda): pickles and copies
        self.keyword = spec.keyword
        self.first = first
        self.state = state

    def _shift(self, positions):
        if not isinstance(positions, torch.Tensor):
            return positions
        offset = self.state.position_offsets()
        if isinstance(offset, torch.Tensor):
            offset = offset.view(-1, *([1] * (positions.dim() - 1))).to(positions.dtype)
            return torch.where(positions >= self.first, positions + offset, positions)
        if positions.is_floating_point():
            return torch.where(positions >= self.first, positions + offset, positions)
        return torch.add(positions, positions >= self.first, alpha=offset)  # (two ops: once per forward)

    def __call__(self, module, args, kwargs):
        if not self.state.enabled or self.state.prefix_in_cache():  # (transformers counts a cached prefix)
            return None
        if kwargs.get(self.keyword) is not None:
            kwargs = {**kwargs, self.keyword: self._shift(kwargs[self.keyword])}
            return args, kwargs
        if len(args) > self.index:
            args = (*args[:self.index], self._shift(args[self.index]), *args[self.index + 1:])
            return args, kwargs
        return None


def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """ALiBi slopes ``[num_heads]`` fp32 (Press et al.): for the largest power of two n <= num_heads, the geometric
    sequence 2^(-8 k / n), k = 1..n; further heads take the odd terms of the sequence for 2n."""
    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
    slopes += [2.0 ** (-8.0 * k / (2 * n)) for k in range(1, 2 * (num_heads - n), 2)]
    return torch.tensor(slopes, dtype=torch.float32, device=device)

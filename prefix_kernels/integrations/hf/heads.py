"""Per-prefix task heads for a prefix bank: each prefix trains (or loads) its own copy of every module in
``modules_to_save``, and each batch row goes through the copy of its row's prefix.

P-Tuning v2 trains a classifier beside each task's prefix, and a PEFT adapter saves it with the prefix; serving
twenty tasks from one batch therefore needs twenty heads, each applied to its own rows. :class:`RoutedHead`
stands in for the head module in the model: it splits its input's batch rows by the forward's prefix selection,
runs each group through its prefix's head (rows without a prefix, and the whole batch inside
``handle.disabled()``, through the model's own head), and puts the outputs back in row order. A head's gradient
is thereby the sum over its rows.
"""

from __future__ import annotations

import torch
from torch import nn


class RoutedHead(nn.Module):
    """One task head per prefix of a bank, chosen per batch row.

    Args:
        original: the model's own head (rows without a prefix; the model inside ``handle.disabled()``).
        heads: one trainable copy per prefix, in bank order.
        state: the model's :class:`~.state.PrefixState` (its ``rows`` are this forward's selection).
    """

    def __init__(self, original: nn.Module, heads: list[nn.Module], state):
        super().__init__()
        self.original = original
        self.heads = nn.ModuleList(heads)
        object.__setattr__(self, "_state", state)  # not a submodule: the state is no module

    def forward(self, x, *args, **kwargs):
        state = self._state
        if not state.enabled:
            return self.original(x, *args, **kwargs)
        rows = state.rows
        if rows is None:  # a bank of one without a selection
            return self.heads[0](x, *args, **kwargs)
        if args or kwargs or not isinstance(x, torch.Tensor):
            raise TypeError("a per-prefix head takes one tensor input (batch rows first)")
        if x.shape[0] != rows.shape[0]:
            raise ValueError(f"the head got {x.shape[0]} rows, the prefix selection has {rows.shape[0]}")
        if torch.compiler.is_compiling():
            return self._dense(x, rows)
        groups = state.row_groups()
        if len(groups) == 1:
            (value, _), = groups
            return (self.original if value < 0 else self.heads[value])(x)
        parts, order = [], []
        for value, index in groups:
            parts.append((self.original if value < 0 else self.heads[value])(x.index_select(0, index)))
            order.append(index)
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"the heads of the prefixes in this batch give outputs of different shapes {shapes} "
                             "(e.g. different numbers of labels): such tasks cannot share one batch")
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(parts).index_select(0, inverse)

    def _dense(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Inside torch.compile: every head on every row, each row keeping its own head's output (grouping rows
        by value needs data-dependent shapes a graph cannot hold). Same outputs and gradients as the grouped
        path (a head's output at the rows of other prefixes gets no gradient); N + 1 times the head's work,
        small for a classifier head."""
        outs = [self.original(x)] + [head(x) for head in self.heads]
        shapes = {tuple(o.shape[1:]) for o in outs}
        if len(shapes) > 1:
            raise ValueError(f"the heads of the prefixes of this bank give outputs of different shapes {shapes} "
                             "(e.g. different numbers of labels): they cannot share one compiled batch")
        stacked = torch.stack(outs)  # [N + 1, B, ...]: slot 0 is the model's own head (rows with index -1)
        pick = (rows.long() + 1).view(1, -1, *([1] * (stacked.dim() - 2))).expand(1, *stacked.shape[1:])
        return stacked.gather(0, pick).squeeze(0)

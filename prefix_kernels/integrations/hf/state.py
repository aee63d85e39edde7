"""The prefix of one prefix-tuned model, computed once per forward, and the per-module slots that read it.

:class:`PrefixState` owns nothing but references: the :class:`~prefix_kernels.PrefixEncoder` (a submodule of
the model) and per-forward results. A forward pre-hook on the base model calls :meth:`PrefixState.begin_forward`,
which computes every layer's prefix in one encoder call, in the dtype the attention will see (the attention
weights' dtype, or the autocast dtype); every layer then reads its slice. Computing it there, before any layer
runs, keeps it out of the layers' checkpointed regions: gradient checkpointing recomputes each layer against the
very prefix tensor of its forward (the tensor stays referenced until the next forward). A layer that sees another
dtype gets the prefix computed for that dtype on first use.

:class:`PrefixSlot` is what each attention module holds: its own layer's index into that prefix (not looked up
through ``layer_idx``, which e.g. T5 shares between self- and cross-attention). ``fetch`` is the one place
where a module obtains its prefix.

Many prefixes in one batch: the encoder may be a :class:`~prefix_kernels.PrefixBank` of N prefixes, and a
*selection* (set through the handle, kept here) says which prefix each batch row uses (-1: none, the base model).
At each forward :meth:`PrefixState.begin_forward` resolves the selection against that forward's batch size once
(``generate()`` with beams or several sequences per prompt repeats each row r times: the selection is repeated
the same way) into ``rows`` ``[B]`` and each row's prefix length ``row_lengths`` ``[B]``, which the attention,
the position shift and Bloom's ALiBi offsets read. A single prefix takes a selection too (0 or -1 per row).
"""

from __future__ import annotations

import torch

from ...modules import PrefixBank, PrefixEncoder
from .positions import alibi_slopes


class PrefixState:
    """Shared by the slots of one model. ``enabled`` is False inside ``handle.disabled()``."""

    def __init__(self, encoder: PrefixEncoder | PrefixBank, *, backend: str, shift_positions: bool,
                 probe: torch.nn.Module, layer: torch.nn.Module | None = None):
        self.encoder = encoder
        self.probe = probe  # an attention module: its weights' dtype is the attention's dtype
        self.layer = layer  # the first layer: transformers marks gradient checkpointing on it
        self.backend = backend
        self.shift_positions = shift_positions
        self.enabled = True
        self._prefix: dict[torch.dtype, torch.Tensor] = {}
        self.fetches = 0
        self.selection: torch.Tensor | None = None  # [n] int64 on the CPU, set through the handle
        self.rows: torch.Tensor | None = None  # this forward's [B] prefix index (None: every row uses the prefix)
        self.row_lengths: torch.Tensor | None = None  # this forward's [B] int64 prefix length per row
        self._resolved: dict = {}  # (B, device) -> (rows, row_lengths), for the current selection
        self._groups: list | None = None  # this forward's [(prefix, row indices)], made on first use

    @property
    def is_bank(self) -> bool:
        return isinstance(self.encoder, PrefixBank)

    @property
    def num_prefixes(self) -> int:
        return len(self.encoder) if self.is_bank else 1

    @property
    def names(self) -> tuple[str, ...]:
        return self.encoder.names if self.is_bank else ("default",)

    def lengths(self) -> tuple[int, ...]:
        return self.encoder.lengths if self.is_bank else (self.encoder.num_virtual_tokens,)

    def select(self, selection) -> None:
        """Set (or clear, with None) the per-row selection: a [n] int tensor or a list of ints (-1: no prefix),
        names, or None entries (no prefix). Checked here, against the bank."""
        self._resolved = {}
        if selection is None:
            self.selection = None
            return
        if isinstance(selection, torch.Tensor):
            if selection.dim() != 1 or selection.dtype.is_floating_point or selection.dtype == torch.bool:
                raise ValueError(f"a prefix index must be a 1-D integer tensor [batch], got {selection.dtype} of "
                                 f"shape {tuple(selection.shape)}")
            index = selection.detach().to("cpu", torch.int64)
        else:
            if isinstance(selection, (str, int)):
                raise TypeError("a prefix selection names each batch row's prefix: pass a list or a 1-D tensor "
                                f"(one entry per row), got {selection!r}")
            index = torch.tensor([self._entry(e) for e in selection], dtype=torch.int64)
        if index.numel() == 0:
            raise ValueError("a prefix selection needs at least one row")
        bad = (index < -1) | (index >= self.num_prefixes)
        if bool(bad.any()):
            raise IndexError(f"prefix index {int(index[bad][0])} out of range: the model holds {self.num_prefixes} "
                             f"prefix(es) {list(self.names)}; use 0..{self.num_prefixes - 1}, or -1 for no prefix")
        self.selection = index

    def _entry(self, entry) -> int:
        if entry is None:
            return -1
        if isinstance(entry, str):
            if entry not in self.names:
                raise KeyError(f"no prefix named {entry!r}; the model holds {list(self.names)}")
            return self.names.index(entry)
        if isinstance(entry, bool) or not isinstance(entry, int):
            raise TypeError(f"a prefix selection entry is a name, an int or None, got {entry!r}")
        return entry

    def _resolve(self, batch: int | None, device: torch.device) -> None:
        """This forward's ``rows`` and ``row_lengths`` from the selection and the batch size."""
        index = self.selection
        if index is None:
            if self.num_prefixes > 1:
                raise ValueError(f"this model holds a bank of {self.num_prefixes} prefixes {list(self.names)}: say "
                                 "which one each batch row uses, with handle.use_prefix(...) or "
                                 "handle.set_prefix_index(...) (-1 or None for the base model)")
            self.rows = self.row_lengths = None  # a bank of one: every row uses it (fetch serves it as one prefix)
            return
        key = (batch, device)
        if key not in self._resolved:
            n = index.numel()
            if batch is not None and batch != n:
                if batch % n:
                    raise ValueError(f"the prefix selection has {n} rows but the batch has {batch}: give one entry "
                                     f"per row (generate() with beams or several sequences per prompt repeats each "
                                     f"row r times; the selection is repeated likewise when {batch} = {n} x r)")
                index = index.repeat_interleave(batch // n)
            lengths = torch.tensor(self.lengths(), dtype=torch.int64)
            row_lengths = torch.where(index >= 0, lengths[index.clamp(min=0)], 0)
            self._resolved[key] = (index.to(device), row_lengths.to(device))
        self.rows, self.row_lengths = self._resolved[key]

    def row_groups(self) -> list[tuple[int, torch.Tensor]]:
        """This forward's rows grouped by prefix: ``[(prefix or -1, row indices [n_i])]`` (for per-prefix heads)."""
        if self._groups is None:
            rows = self.rows
            values = rows.cpu()
            self._groups = [(int(v), (values == v).nonzero().view(-1).to(rows.device)) for v in values.unique()]
        return self._groups
    @property
    def num_virtual_tokens(self) -> int:
        return self.encoder.num_virtual_tokens

    def probe_device(self) -> torch.device:
        weight = next(self.probe.parameters(), None)
        return torch.device("cpu") if weight is None else weight.device

    def attention_dtype(self) -> torch.dtype | None:
        """The dtype q will have in the attention: the autocast dtype under autocast, else the weights' dtype."""
        weight = next(self.probe.parameters(), None)
        if weight is None or not weight.is_floating_point():
            return None
        device = weight.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return weight.dtype

    def _check_checkpointing(self) -> None:
        """Reentrant checkpointing runs one backward per layer, each reaching through the shared prefix into the
        encoder's graph, which the first one frees: refuse it with the remedy, unless that graph holds nothing."""
        layer = self.layer
        if layer is None or not getattr(layer, "gradient_checkpointing", False) or not torch.is_grad_enabled():
            return
        options = getattr(getattr(layer, "_gradient_checkpointing_func", None), "keywords", None) or {}
        encoders = self.encoder.encoders if self.is_bank else [self.encoder]
        saves = any(e.prefix_projection or (e.training and e.prefix_dropout > 0) for e in encoders)
        if options.get("use_reentrant") and saves and any(p.requires_grad for p in self.encoder.parameters()):
            from .training import checkpointing_call_text

            raise ValueError("prefix tuning with a projection or prefix dropout needs non-reentrant activation "
                             "checkpointing (one prefix feeds every layer): call "
                             f"{checkpointing_call_text(use_reentrant=False)}, transformers' default")

    def begin_forward(self, module, args, kwargs) -> None:
        """Forward pre-hook of the base model: forget the previous forward's prefix and compute this one's; resolve
        the row selection against this forward's batch."""
        self._prefix = {}
        self.fetches = 0
        self._groups = None
        if self.enabled:
            self._resolve(_batch_size(args, kwargs), self.probe_device())
            self._check_checkpointing()
            dtype = self.attention_dtype()
            if dtype is not None:
                self.prefix(dtype)

    def position_offsets(self):
        """How far to shift this forward's real positions: P (an int), or ``[B]`` per row with a selection."""
        return self.num_virtual_tokens if self.row_lengths is None else self.row_lengths

    def prefix(self, dtype: torch.dtype) -> torch.Tensor:
        """Every layer's prefix ``[num_layers, 2, Hkv, P, D]`` (a bank: ``[num_layers, 2, N, Hkv, Pmax, D]``) in
        ``dtype``, computed once per forward."""
        prefix = self._prefix.get(dtype)
        if prefix is None:
            prefix = self.encoder(dtype=dtype)
            self._prefix[dtype] = prefix
        return prefix


class PrefixSlot:
    """One attention module's place in the prefix: layer ``index`` of ``state``."""

    def __init__(self, state: PrefixState, index: int, previous: str):
        self.state = state
        self.index = index
        self.previous = previous  # the attention implementation that served this module before
        self._alibi: dict[torch.device, torch.Tensor] = {}

    def alibi_slopes(self, num_heads: int, device: torch.device) -> torch.Tensor:
        """ALiBi slopes ``[num_heads]`` fp32 on ``device``, made once per device (for families with ALiBi)."""
        slopes = self._alibi.get(device)
        if slopes is None:
            slopes = self._alibi[device] = alibi_slopes(num_heads, device)
        return slopes

    def fetch(self, dtype: torch.dtype, batch: int):
        """This layer's ``(prefix_k, prefix_v, prefix_index, prefix_lengths)`` in ``dtype``: the prefix ``[Hkv, P,
        D]`` shared by the batch, or a bank ``[N, Hkv, Pmax, D]`` (views), with each row's ``[B]`` index into it
        (None: every row uses the one prefix) and the prefixes' ``[N]`` lengths (None: all full)."""
        state = self.state
        state.fetches += 1
        layer = state.prefix(dtype)[self.index]
        rows = state.rows
        if rows is None and state.is_bank:  # a bank of one without a selection: its one prefix, for every row
            return layer[0, 0], layer[1, 0], None, None
        if rows is not None and rows.shape[0] != batch:
            raise ValueError(f"the attention got a batch of {batch} rows, but the prefix selection was resolved for "
                             f"{rows.shape[0]} at the start of the forward")
        lengths = None
        if state.is_bank and not state.encoder.uniform():
            lengths = state.encoder.prefix_lengths(layer.device)
        return layer[0], layer[1], rows, lengths

    def __repr__(self) -> str:
        return f"PrefixSlot(layer={self.index}, previous={self.previous!r})"


def _batch_size(args, kwargs) -> int | None:
    """The batch size of a base model's forward: from input_ids (its first argument) or inputs_embeds."""
    for value in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None

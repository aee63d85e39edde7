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
"""

from __future__ import annotations

import torch

from ...modules import PrefixEncoder
from .positions import alibi_slopes


class PrefixState:
    """Shared by the slots of one model. ``enabled`` is False inside ``handle.disabled()``."""

    def __init__(self, encoder: PrefixEncoder, *, backend: str, shift_positions: bool, probe: torch.nn.Module,
                 layer: torch.nn.Module | None = None):
        self.encoder = encoder
        self.probe = probe  # an attention module: its weights' dtype is the attention's dtype
        self.layer = layer  # the first layer: transformers marks gradient checkpointing on it
        self.backend = backend
        self.shift_positions = shift_positions
        self.enabled = True
        self._prefix: dict[torch.dtype, torch.Tensor] = {}
        self.fetches = 0

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
        saves = self.encoder.prefix_projection or (self.encoder.training and self.encoder.prefix_dropout > 0)
        if options.get("use_reentrant") and saves and any(p.requires_grad for p in self.encoder.parameters()):
            raise ValueError("prefix tuning with a projection or prefix dropout needs non-reentrant gradient "
                             "checkpointing (one prefix feeds every layer): call gradient_checkpointing_enable("
                             "gradient_checkpointing_kwargs={'use_reentrant': False}), transformers' default")

    def begin_forward(self, *_args) -> None:
        """Forward pre-hook of the base model: forget the previous forward's prefix and compute this one's."""
        self._prefix = {}
        self.fetches = 0
        if self.enabled:
            self._check_checkpointing()
            dtype = self.attention_dtype()
            if dtype is not None:
                self.prefix(dtype)

    def prefix(self, dtype: torch.dtype) -> torch.Tensor:
        """Every layer's prefix ``[num_layers, 2, Hkv, P, D]`` in ``dtype``, computed once per forward."""
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

    def fetch(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (prefix_k, prefix_v), each ``[Hkv, P, D]`` in ``dtype`` (views, shared by the batch)."""
        self.state.fetches += 1
        layer = self.state.prefix(dtype)[self.index]
        return layer[0], layer[1]

    def __repr__(self) -> str:
        return f"PrefixSlot(layer={self.index}, previous={self.previous!r})"

"""``PrefixEncoder``: the learned prefix of prefix tuning / P-Tuning v2, computed once per step in the
layout the attention kernels read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ops.reparam import project_prefix, to_prefix_layout
from .ops.reparam.inputs import check_config, compute_dtype_for


@dataclass
class _Cached:
    """A computed prefix and what it was computed from. Valid while every parameter still has the same
    storage (``aliases`` share it, so its address cannot be reused) and version counter, the call
    context (``key``) is the same, and the prefix itself was not written to."""

    aliases: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]
    key: tuple
    out: torch.Tensor
    out_version: int | None

    def matches(self, params, key) -> bool:
        if key != self.key or (self.out_version is not None and self.out._version != self.out_version):
            return False
        return all(
            p.data_ptr() == a.data_ptr() and p.shape == a.shape and p.dtype == a.dtype and p.device == a.device
            and p._version == v
            for p, a, v in zip(params, self.aliases, self.versions, strict=True)
        )


class PrefixEncoder(nn.Module):
    """The learned prefix K/V of every layer, as one ``[num_layers, 2, num_kv_heads, P, head_dim]`` tensor.

    Parameters and their names match PEFT's prefix-tuning ``PrefixEncoder``, so its state dict loads with
    ``strict=True`` and saves back the same, and a PEFT-trained adapter yields the prefix PEFT feeds each
    layer (``out[l, 0]`` = keys, ``out[l, 1]`` = values, for every batch row):

    - ``prefix_projection=False``: ``embedding.weight [P, 2 * L * T]``, T = num_kv_heads * head_dim. The
      prefix is a strided view of it: no copy, no kernel.
    - ``prefix_projection=True``: ``embedding.weight [P, T]``, ``transform.0`` = Linear(T, H),
      ``transform.2`` = Linear(H, 2 * L * T), H = encoder_hidden_size (default T, as PEFT). The MLP
      runs once per forward through ``project_prefix`` (a fused Triton kernel on GPUs), never per batch
      row, and writes the layout directly. ``transform`` is an ``nn.Sequential`` for the names and for
      inspection; forward does not call it.

    Frozen use: when no gradient can flow (no parameter requires grad, or grad mode is off) and dropout
    is inactive, the prefix is cached and returned again until a parameter changes (its version counter
    or storage; an optimizer step or ``load_state_dict`` does both) or the call context does (dtype,
    autocast, backend, inference mode). Inference therefore pays for the MLP once. The cached tensor is
    returned as is: writing to it in place invalidates the cache.

    Args:
        num_virtual_tokens: P, the prefix length.
        num_layers, num_kv_heads, head_dim: the model's layers and K/V head shape (GQA: the kv heads).
        prefix_projection: learn the prefix through the MLP (P-Tuning v2 / Li & Liang) or directly.
        encoder_hidden_size: the MLP's hidden size (default: token dim); unused without projection.
        prefix_dropout: dropout on the prefix in training (P-Tuning v2 applies the hidden dropout there).
            One mask per step, shared by the batch rows, since the prefix is computed once per step.
        backend: for the projection: "auto", "triton" or "torch" (see ``project_prefix``).
        device, dtype: of the parameters, as for ``nn.Linear``.
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int, *,
                 prefix_projection: bool = False, encoder_hidden_size: int | None = None,
                 prefix_dropout: float = 0.0, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        hidden = check_config(num_virtual_tokens, num_layers, num_kv_heads, head_dim, prefix_projection,
                              encoder_hidden_size, prefix_dropout)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.prefix_projection = prefix_projection
        self.encoder_hidden_size = hidden
        self.prefix_dropout = float(prefix_dropout)
        self.backend = backend
        token_dim = num_kv_heads * head_dim
        out_features = 2 * num_layers * token_dim
        factory = {"device": device, "dtype": dtype}
        if prefix_projection:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **factory)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, hidden, **factory),
                nn.Tanh(),
                nn.Linear(hidden, out_features, **factory),
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out_features, **factory)
        self._cache: _Cached | None = None

    def extra_repr(self) -> str:
        extra = f", encoder_hidden_size={self.encoder_hidden_size}" if self.prefix_projection else ""
        return (f"num_virtual_tokens={self.num_virtual_tokens}, num_layers={self.num_layers}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"prefix_projection={self.prefix_projection}{extra}, prefix_dropout={self.prefix_dropout}")

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() swap the parameters' storage: drop the cached prefix at once, so that
        # it does not keep the old storage alive until the next forward.
        self._cache = None
        return super()._apply(fn, recurse)

    def _params(self) -> tuple[torch.Tensor, ...]:
        if not self.prefix_projection:
            return (self.embedding.weight,)
        first, last = self.transform[0], self.transform[2]
        return self.embedding.weight, first.weight, first.bias, last.weight, last.bias

    def _compute(self, params, dtype):
        sizes = {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim}
        if self.prefix_projection:
            return project_prefix(*params, dtype=dtype, backend=self.backend, **sizes)
        (weight,) = params
        if weight.shape != (self.num_virtual_tokens, 2 * self.num_layers * self.num_kv_heads * self.head_dim):
            raise ValueError(f"embedding.weight must be [num_virtual_tokens={self.num_virtual_tokens}, 2 * num_layers "
                             f"* num_kv_heads * head_dim], got shape {tuple(weight.shape)}")
        prefix = to_prefix_layout(weight, **sizes)
        return prefix if dtype is None or dtype == weight.dtype else prefix.to(dtype)

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The prefix ``[num_layers, 2, num_kv_heads, P, head_dim]``; ``prefix[l]`` unpacks into layer l's
        (prefix_k, prefix_v) views ``[num_kv_heads, P, head_dim]``, which prefix_attention takes as they are.

        ``dtype``: of the result. Default: with projection, the autocast dtype under autocast, else the
        parameters' dtype; without projection, the parameters' dtype (the view of embedding.weight).
        """
        params = self._params()
        weight = params[0]
        if self.prefix_projection:
            dtype = compute_dtype_for(weight.dtype, weight.device, dtype)
        elif dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
        dropout = self.training and self.prefix_dropout > 0.0
        grads = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if grads or dropout or torch.compiler.is_compiling():
            self._cache = None
            prefix = self._compute(params, dtype)
            return F.dropout(prefix, self.prefix_dropout, training=True) if dropout else prefix
        inference = torch.is_inference_mode_enabled()
        key = (dtype, self.backend, inference)
        if self._cache is not None and self._cache.matches(params, key):
            return self._cache.out
        self._cache = None  # let the old prefix go before computing the new one
        prefix = self._compute(params, dtype)
        self._cache = _Cached(
            aliases=tuple(p.detach() for p in params),
            versions=tuple(p._version for p in params),
            key=key,
            out=prefix,
            out_version=None if prefix.is_inference() else prefix._version,
        )
        return prefix


class PrefixBank(nn.Module):
    """N learned prefixes of one model, served together: the bank ``[num_layers, 2, N, num_kv_heads, Pmax,
    head_dim]`` that :func:`prefix_kernels.prefix_attention` reads with a per-row ``prefix_index``.

    Why a container of N :class:`PrefixEncoder` rather than one encoder with a prefix axis: each prefix keeps
    its own length, projection, hidden size and dropout (adapters trained apart, with different
    ``num_virtual_tokens``, share a bank), its own PEFT parameter names (``encoders.<i>.embedding.weight`` is
    a PrefixEncoder's state dict, so each prefix saves and loads as its own adapter), and its own frozen-use
    cache. The cost is N encoder calls per step instead of one fused call, which is small beside the
    attention: the encoders run once per step, never per batch row. Prefixes shorter than Pmax are
    zero-padded; ``prefix_lengths()`` tells the attention to mask their tails.

    The stacked bank is itself cached: when every encoder returns its cached prefix (nothing can take a
    gradient and nothing changed), the previous stack is returned again, not rebuilt.

    Args:
        encoders: the prefixes, in bank order (a sequence, or a mapping name -> encoder).
        names: one name per prefix (default ``"0"``, ``"1"``, ...); with a mapping, its keys.
    """

    def __init__(self, encoders, names=None):
        super().__init__()
        if isinstance(encoders, Mapping):
            if names is not None:
                raise ValueError("give names either as the mapping's keys or as names, not both")
            names, encoders = list(encoders.keys()), list(encoders.values())
        encoders = list(encoders)
        if not encoders:
            raise ValueError("a prefix bank needs at least one prefix")
        if not all(isinstance(e, PrefixEncoder) for e in encoders):
            raise TypeError("a prefix bank holds PrefixEncoder modules")
        names = [str(i) for i in range(len(encoders))] if names is None else [str(n) for n in names]
        if len(names) != len(encoders) or len(set(names)) != len(names) or not all(names):
            raise ValueError(f"need {len(encoders)} distinct non-empty names, got {names}")
        first = encoders[0]
        for name, e in zip(names, encoders, strict=True):
            got = (e.num_layers, e.num_kv_heads, e.head_dim)
            want = (first.num_layers, first.num_kv_heads, first.head_dim)
            if got != want:
                raise ValueError(f"prefix {name!r} has (num_layers, num_kv_heads, head_dim) {got}, the bank {want}")
        self.names = tuple(names)
        self.encoders = nn.ModuleList(encoders)
        self.num_layers, self.num_kv_heads, self.head_dim = first.num_layers, first.num_kv_heads, first.head_dim
        self.lengths = tuple(e.num_virtual_tokens for e in encoders)
        self.num_virtual_tokens = max(self.lengths)  # Pmax
        self._lengths: dict[torch.device, torch.Tensor] = {}
        self._cache: tuple | None = None

    def __len__(self) -> int:
        return len(self.encoders)

    def extra_repr(self) -> str:
        return f"names={list(self.names)}, lengths={list(self.lengths)}"

    def _apply(self, fn, recurse=True):
        self._cache = None
        self._lengths = {}
        return super()._apply(fn, recurse)

    def index_of(self, prefix) -> int:
        """The bank position of ``prefix`` (a name, or an int in [0, N))."""
        if isinstance(prefix, str):
            if prefix not in self.names:
                raise KeyError(f"no prefix named {prefix!r} in the bank; names: {list(self.names)}")
            return self.names.index(prefix)
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix < len(self):
            raise ValueError(f"prefix must be a name or an int in [0, {len(self)}), got {prefix!r}")
        return prefix

    def uniform(self) -> bool:
        """Whether every prefix has the bank's length (then no tail needs masking)."""
        return all(p == self.num_virtual_tokens for p in self.lengths)

    def prefix_lengths(self, device) -> torch.Tensor:
        """``[N]`` int32: each prefix's length, on ``device`` (made once per device)."""
        device = torch.device(device)
        lengths = self._lengths.get(device)
        if lengths is None:
            lengths = self._lengths[device] = torch.tensor(self.lengths, dtype=torch.int32, device=device)
        return lengths

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The bank ``[num_layers, 2, N, num_kv_heads, Pmax, head_dim]``: ``bank[l, 0]`` and ``bank[l, 1]`` are
        layer l's keys and values ``[N, num_kv_heads, Pmax, head_dim]``, zero past each prefix's length."""
        outs = [e(dtype=dtype) for e in self.encoders]
        compiling = torch.compiler.is_compiling()
        cache = None if compiling else self._cache
        if cache is not None and cache[0] == dtype and all(
                a is b and (v is None or a._version == v) for a, b, v in zip(outs, cache[1], cache[2], strict=True)):
            return cache[3]
        self._cache = None
        out_dtype = outs[0].dtype if dtype is None else dtype
        pmax = self.num_virtual_tokens
        padded = [F.pad(o.to(out_dtype), (0, 0, 0, pmax - o.shape[3])) if o.shape[3] < pmax else o.to(out_dtype)
                  for o in outs]
        bank = torch.stack(padded, dim=2)
        if not bank.requires_grad and not compiling:
            versions = tuple(None if o.is_inference() else o._version for o in outs)
            self._cache = (dtype, tuple(outs), versions, bank)
        return bank

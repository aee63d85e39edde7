"""``PrefixEncoder``: the learned prefix of prefix tuning / P-Tuning v2, computed once per step in the
layout the attention kernels read.
"""

from __future__ import annotations

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

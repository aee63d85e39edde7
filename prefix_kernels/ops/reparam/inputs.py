"""Validation of the reparameterization MLP's configuration and parameters.

Every entry point funnels through :func:`check_config` (sizes given to a constructor) or
:func:`check_params` (the tensors of one call), so that a bad call fails the same way whichever
backend would have served it: a ``TypeError`` for a wrong type or dtype, a ``ValueError`` for a wrong
size, shape or device, each naming the argument at fault.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Names of the five parameters in PEFT's prefix encoder, used in error messages by default.
PEFT_NAMES = ("embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")


@dataclass(frozen=True)
class ReparamSpec:
    """The sizes and dtypes of one validated projection call (tensors are not kept).

    out_features = 2 * num_layers * token_dim, token_dim = num_kv_heads * head_dim.
    """

    num_tokens: int
    token_dim: int
    hidden: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    device: torch.device

    @property
    def out_features(self) -> int:
        return 2 * self.num_layers * self.token_dim

    @property
    def largest_numel(self) -> int:
        """Elements of the largest tensor involved (the second weight, or the output)."""
        return max(self.out_features * self.hidden, self.out_features * self.num_tokens,
                   self.token_dim * max(self.hidden, self.num_tokens))


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def positive_int(name: str, value) -> int:
    """``value`` as an int >= 1, or a TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_config(num_virtual_tokens, num_layers, num_kv_heads, head_dim, prefix_projection, encoder_hidden_size,
                 prefix_dropout) -> int | None:
    """Check a PrefixEncoder configuration; returns the MLP's hidden size (None without projection).

    ``encoder_hidden_size`` defaults to token_dim = num_kv_heads * head_dim, as in PEFT. Without
    projection it is accepted and unused, as in PEFT (whose configs always carry it).
    """
    positive_int("num_virtual_tokens", num_virtual_tokens)
    positive_int("num_layers", num_layers)
    positive_int("num_kv_heads", num_kv_heads)
    positive_int("head_dim", head_dim)
    if not isinstance(prefix_projection, bool):
        raise TypeError(f"prefix_projection must be a bool, got {type(prefix_projection).__name__}")
    hidden = None
    if encoder_hidden_size is not None:
        hidden = positive_int("encoder_hidden_size", encoder_hidden_size)
    if isinstance(prefix_dropout, bool) or not isinstance(prefix_dropout, (int, float)):
        raise TypeError(f"prefix_dropout must be a float, got {type(prefix_dropout).__name__}")
    if not 0.0 <= prefix_dropout < 1.0:
        raise ValueError(f"prefix_dropout must be in [0, 1), got {prefix_dropout}")
    if not prefix_projection:
        return None
    return hidden if hidden is not None else num_kv_heads * head_dim


def compute_dtype_for(param_dtype: torch.dtype, device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the projection computes and returns in.

    An explicit ``dtype`` wins. Otherwise, under autocast for the parameters' device type, floating
    parameters other than float64 compute in the autocast dtype (as ``nn.Linear`` would); else in the
    parameters' own dtype.
    """
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {', '.join(str(d) for d in FLOAT_DTYPES)} or None, got {dtype!r}")
        return dtype
    if param_dtype != torch.float64 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


def check_params(embedding, w1, b1, w2, b2, *, num_layers, num_kv_heads, head_dim, dtype=None,
                 names=PEFT_NAMES) -> ReparamSpec:
    """Check the parameters of one projection call and return its :class:`ReparamSpec`.

    Shapes (PEFT's prefix encoder with projection, T = num_kv_heads * head_dim, N = 2 * num_layers * T):
    embedding ``[P, T]``, w1 ``[H, T]``, b1 ``[H]``, w2 ``[N, H]``, b2 ``[N]``. All five share one
    floating dtype and one device; any strides are accepted. ``names`` label the five in errors.
    """
    L = positive_int("num_layers", num_layers)
    Hkv = positive_int("num_kv_heads", num_kv_heads)
    D = positive_int("head_dim", head_dim)
    tensors = (embedding, w1, b1, w2, b2)
    for name, t in zip(names, tensors, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if embedding.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{names[0]} must be float16, bfloat16, float32 or float64, got {embedding.dtype}")
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if t.dtype != embedding.dtype:
            raise TypeError(f"{name}.dtype {t.dtype} differs from {names[0]}.dtype {embedding.dtype}; "
                            "give all parameters one dtype")
        if t.device != embedding.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {embedding.device}")

    T = Hkv * D
    N = 2 * L * T
    if embedding.dim() != 2:
        raise ValueError(f"{names[0]} must be 2-D [num_virtual_tokens, token_dim], got shape {_shape(embedding)}")
    P = embedding.shape[0]
    if P == 0:
        raise ValueError(f"{names[0]} has 0 rows: num_virtual_tokens must be >= 1")
    if embedding.shape[1] != T:
        raise ValueError(f"{names[0]} must be [num_virtual_tokens, token_dim={T}] (token_dim = num_kv_heads {Hkv} "
                         f"* head_dim {D}), got shape {_shape(embedding)}")
    if w1.dim() != 2 or w1.shape[1] != T or w1.shape[0] == 0:
        raise ValueError(f"{names[1]} must be [encoder_hidden_size, token_dim={T}], got shape {_shape(w1)}")
    H = w1.shape[0]
    if tuple(b1.shape) != (H,):
        raise ValueError(f"{names[2]} must be [encoder_hidden_size={H}], got shape {_shape(b1)}")
    if tuple(w2.shape) != (N, H):
        raise ValueError(f"{names[3]} must be [2 * num_layers * token_dim={N}, encoder_hidden_size={H}] "
                         f"(num_layers {L}, token_dim {T}), got shape {_shape(w2)}")
    if tuple(b2.shape) != (N,):
        raise ValueError(f"{names[4]} must be [2 * num_layers * token_dim={N}], got shape {_shape(b2)}")
    compute = compute_dtype_for(embedding.dtype, embedding.device, dtype)
    return ReparamSpec(num_tokens=P, token_dim=T, hidden=H, num_layers=L, num_kv_heads=Hkv, head_dim=D,
                       param_dtype=embedding.dtype, compute_dtype=compute, device=embedding.device)

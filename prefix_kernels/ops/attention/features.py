"""The optional features of prefix attention, recorded once.

:data:`FEATURES` lists each feature with its :class:`Option` s, the optional arguments that carry it. An
option's entry says everything the rest of the package needs to know about it:

- its name: the keyword of ``prefix_attention`` and the reference, the attribute of :class:`Features`, the
  argument of the custom ops (whose schemas are generated from this table, in this order);
- its type in the custom ops' schema and the value that means "off" (its default);
- how it reaches the Triton kernels: the constexpr flag set when it is on, and the kernel argument that
  carries it (a pointer, typed for the static report, or a scalar with the value passed when off);
- its check (``check_inputs`` calls it with the call's sizes).

A feature's ``kind`` says what it does to attention: "scores" features change the score matrix (they count
as "featured" for the Triton tile choice, and backends without them decline), "keys" features choose the keys
each row sees. Backends declare the features they implement (``SUPPORTED_FEATURES``); the spec of a call
names the active ones.

Adding a feature: its entry here, its math in the reference, the torch backend and the kernels.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


@dataclass(slots=True)
class CheckContext:
    """What an option's check may look at: the call's sizes and every optional value given."""

    batch: int
    heads_q: int
    prefix_len: int
    len_q: int
    len_k: int
    dtype: torch.dtype  # q's
    n_prefixes: int
    device: torch.device
    causal: bool
    has_prefix: bool
    given: dict
    # (name, tensor, lo, hi, what): raises unless every value is in [lo, hi] (eager calls only; remembered per
    # tensor object, so a model's layers check a selection once per forward).
    check_values: Callable


def _tensor(name, t, ctx, dtypes, size, shape_text):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d)[6:] for d in dtypes)}, got {t.dtype}")
    if tuple(t.shape) != (size,):
        raise ValueError(f"{name} must have shape {shape_text}, got {_shape(t)}")
    if t.device != ctx.device:
        raise ValueError(f"{name} is on {t.device} but q is on {ctx.device}")
    return t


_INTS = (torch.int32, torch.int64)


def _check_alibi_slopes(t, ctx):
    return _tensor("alibi_slopes", t, ctx, (torch.float32,), ctx.heads_q,
                   f"(Hq={ctx.heads_q},), one slope per query head")


def _check_alibi_offsets(t, ctx):
    if isinstance(t, torch.Tensor) and ctx.given.get("alibi_slopes") is None:
        raise ValueError("alibi_offsets was given without alibi_slopes")
    return _tensor("alibi_offsets", t, ctx, _INTS, ctx.batch, f"(batch={ctx.batch},)")


def _check_attn_bias(t, ctx):
    """An additive bias [B or 1, Hq or 1, Lq or 1, P + Lk or 1], fp32 or q's dtype, on q's device, without
    gradient (the kernels compute none: it is a frozen base model's position bias)."""
    full = (ctx.batch, ctx.heads_q, ctx.len_q, ctx.prefix_len + ctx.len_k)
    want = (f"[B={full[0]} or 1, Hq={full[1]} or 1, Lq={full[2]} or 1, P + Lk={full[3]} or 1] "
            f"(P={ctx.prefix_len} prefix columns, then Lk={ctx.len_k} input keys)")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"attn_bias must be a torch.Tensor of shape {want}, got {type(t).__name__}")
    if t.dim() != 4 or any(n not in (1, m) for n, m in zip(t.shape, full, strict=True)):
        raise ValueError(f"attn_bias must have shape {want}, each dim full or 1, got {_shape(t)}")
    allowed = (torch.float32,) if ctx.dtype == torch.float32 else (torch.float32, ctx.dtype)
    if t.dtype not in allowed:
        raise TypeError(f"attn_bias must be {' or '.join(str(d)[6:] for d in allowed)} (float32, or q's dtype), "
                        f"got {t.dtype}")
    if t.device != ctx.device:
        raise ValueError(f"attn_bias is on {t.device} but q is on {ctx.device}")
    if t.requires_grad:
        raise ValueError("attn_bias requires grad, but prefix_attention computes no gradient for it (it is meant "
                         "for a frozen base model's position bias, such as T5's): pass attn_bias.detach(), or use "
                         "prefix_attention_ref, which is differentiable in it")
    return t


def broadcast_strides(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides with 0 for its size-1 dims: a kernel indexing it at the full size reads the broadcast."""
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride(), strict=True))


def _check_dropout_p(p, ctx):
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return float(p)


def _check_sliding_window(w, ctx):
    if isinstance(w, bool) or not isinstance(w, int):
        raise TypeError(f"sliding_window must be an int or None, got {type(w).__name__}")
    if w < 1:
        raise ValueError(f"sliding_window must be >= 1 (keys seen per query), got {w}")
    if not ctx.causal:
        raise ValueError("sliding_window needs causal=True (a window below the diagonal, as in Mistral)")
    return w


def _check_softcap(c, ctx):
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise TypeError(f"softcap must be a float or None, got {type(c).__name__}")
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"softcap must be a finite float > 0, got {c}")
    return float(c)


def _selection(name, size, lo, hi, what):
    def check(t, ctx):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not ctx.has_prefix:
            raise ValueError(f"{name} was given without a prefix")
        if t.dtype not in _INTS:
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        n = size(ctx)
        if tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {_shape(t)}")
        if t.device != ctx.device:
            raise ValueError(f"{name} is on {t.device} but q is on {ctx.device}")
        ctx.check_values(name, t, lo(ctx), hi(ctx), what(ctx))
        return t

    return check


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    """The int64 seed of one dropout call, drawn from the device's default generator (so torch.manual_seed
    makes runs repeatable, and torch.compile / CUDA graphs see an ordinary random op, no host sync)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


@dataclass(frozen=True)
class Option:
    """One optional argument. ``flag``: the Triton constexpr that is True when it is on. ``pointer``: (kernel
    argument, element type) of a tensor option; ``scalar``: (kernel argument, value passed when off) of a
    scalar one. ``draw``: for an internal option (not a keyword of ``prefix_attention``), how the op makes it
    when its feature is on."""

    name: str
    schema: str  # its type in the custom ops' schema
    off: object = None
    flag: str | None = None
    pointer: tuple[str, str] | None = None
    scalar: tuple[str, object] | None = None
    check: Callable | None = None
    draw: Callable[[torch.device], torch.Tensor] | None = None
    strides: tuple[str, ...] = ()

    @property
    def public(self) -> bool:
        return self.draw is None

    @property
    def is_tensor(self) -> bool:
        return self.schema.startswith("Tensor")

    def is_on(self, value) -> bool:
        """Whether ``value`` turns the option on (given, and not the "off" value)."""
        return value is not None and (self.is_tensor or value != self.off)


@dataclass(frozen=True)
class Feature:
    name: str
    options: tuple[Option, ...]
    kind: str = "scores"  # "scores": changes the score matrix; "keys": chooses each row's keys
    label: str = ""  # how a reason names a "keys" feature a backend lacks
    needs_prefix: bool = False  # its options mean nothing without a prefix (dropped when P = 0)


FEATURES = (
    Feature("alibi", (
        Option("alibi_slopes", "Tensor?", flag="HAS_ALIBI", pointer=("ALIBI", "*fp32"), check=_check_alibi_slopes),
        Option("alibi_offsets", "Tensor?", flag="HAS_ALIBI_OFF", pointer=("ALIBI_OFF", "*i32"),
               check=_check_alibi_offsets),
    )),
    Feature("dropout", (
        Option("dropout_p", "float", off=0.0, flag="HAS_DROPOUT", scalar=("dropout_p", 0.0), check=_check_dropout_p),
        Option("dropout_seed", "Tensor?", pointer=("SEED", "*i64"), draw=draw_dropout_seed),
    )),
    Feature("sliding_window", (
        Option("sliding_window", "int?", flag="HAS_WINDOW", scalar=("window", 0), check=_check_sliding_window),
    )),
    Feature("softcap", (
        Option("softcap", "float?", flag="HAS_SOFTCAP", scalar=("softcap", 1.0), check=_check_softcap),
    )),
    Feature("prefix_bank", (
        Option("prefix_index", "Tensor?", flag="HAS_INDEX", pointer=("PIDX", "*i64"),
               check=_selection("prefix_index", lambda c: c.batch, lambda c: -1, lambda c: c.n_prefixes - 1,
                                lambda c: f"-1 or a prefix of the bank of {c.n_prefixes}")),
        Option("prefix_lengths", "Tensor?", flag="HAS_LENGTHS", pointer=("PLEN", "*i64"),
               check=_selection("prefix_lengths", lambda c: c.n_prefixes, lambda c: 0, lambda c: c.prefix_len,
                                lambda c: f"prefix lengths, at most P={c.prefix_len}")),
    ), kind="keys", label="prefix banks (prefix_index / prefix_lengths, or more than one prefix)", needs_prefix=True),
    Feature("attn_bias", (
        Option("attn_bias", "Tensor?", flag="HAS_BIAS", pointer=("BIAS", "*fp32"), check=_check_attn_bias,
               strides=("stride_bias_b", "stride_bias_h", "stride_bias_m", "stride_bias_n")),
    )),
)

OPTIONS = tuple(o for f in FEATURES for o in f.options)
PUBLIC = tuple(o for o in OPTIONS if o.public)
FEATURE_OF = {o.name: f for f in FEATURES for o in f.options}
# The Triton constexpr flags of the features (the report compiles every kernel with all off and all on).
KERNEL_FLAGS = tuple(o.flag for o in OPTIONS if o.flag)
# Element types of the features' pointer arguments, for the static report.
POINTER_TYPES = dict(o.pointer for o in OPTIONS if o.pointer)
# The features' scalar kernel arguments that are floats (the others are ints, strides included).
FLOAT_SCALARS = tuple(o.scalar[0] for o in OPTIONS if o.scalar and isinstance(o.scalar[1], float))
# The options as arguments of a custom op's schema, in the record's order.
SCHEMA = ", ".join(f"{o.schema} {o.name}" for o in OPTIONS)


class _Record:
    """The methods of :class:`Features` (a frozen dataclass with one field per option)."""

    def op_args(self) -> tuple:
        """The values in the record's order: the custom ops' feature arguments."""
        return tuple(getattr(self, o.name) for o in OPTIONS)

    @classmethod
    def from_op_args(cls, args) -> Features:
        return cls(**dict(zip((o.name for o in OPTIONS), args, strict=True)))

    def _on(self, feature: Feature) -> bool:
        for name, is_tensor, off in _TESTS[feature.name]:
            value = getattr(self, name)
            if value is not None and (is_tensor or value != off):
                return True
        return False

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the features in use, in the record's order (plain loops: this runs on every call)."""
        return tuple(f.name for f in FEATURES if self._on(f))

    @property
    def scores(self) -> tuple[str, ...]:
        """The active features that change the score matrix (ALiBi, dropout, window, softcap)."""
        return tuple(n for n in self.active if _BY_NAME[n].kind == "scores")

    def replace(self, **changes) -> Features:
        return dataclasses.replace(self, **changes)

    def without_prefix(self) -> Features:
        """The same call without a prefix: options that need one are dropped."""
        return self.replace(**{o.name: o.off for f in FEATURES if f.needs_prefix for o in f.options})

    def drawn(self, device: torch.device) -> Features:
        """With the internal options of the active features made (the dropout seed)."""
        made = {o.name: o.draw(device) for o in _DRAWN if self._on(FEATURE_OF[o.name])}
        return self.replace(**made) if made else self

    def kernel_args(self, kernel, dummy: torch.Tensor):
        """(pointers, scalars, flags) that pass these features to the Triton ``kernel``: the pointer arguments it
        takes in the record's order (``dummy`` for those off), and its feature scalars (strides included) and
        flags by name."""
        names = set(kernel.arg_names)
        pointers, scalars, flags = [], {}, {}
        for o in OPTIONS:
            value = getattr(self, o.name)
            on = o.is_on(value)
            if o.pointer and o.pointer[0] in names:
                pointers.append(value if on else dummy)
            if o.scalar and o.scalar[0] in names:
                scalars[o.scalar[0]] = value if on else o.scalar[1]
            if o.strides and o.strides[0] in names:
                scalars.update(zip(o.strides, broadcast_strides(value) if on else (0,) * len(o.strides),
                                   strict=True))
            if o.flag and o.flag in names:
                flags[o.flag] = on
        return pointers, scalars, flags


_BY_NAME = {f.name: f for f in FEATURES}
# Per feature, (option, is a tensor, its "off" value): what Features._on tests.
_TESTS = {f.name: tuple((o.name, o.is_tensor, o.off) for o in f.options) for f in FEATURES}
_DRAWN = tuple(o for o in OPTIONS if o.draw)

Features = dataclasses.make_dataclass(
    "Features", [(o.name, object, field(default=o.off)) for o in OPTIONS], bases=(_Record,), frozen=True)
Features.__module__ = __name__
Features.__doc__ = """The optional inputs of one call, as every backend receives them: one field per option of
the record (all off by default), read by name (``features.alibi_slopes``).

Shapes: alibi_slopes ``[Hq]`` fp32, alibi_offsets ``[B]`` int, dropout_seed an int64 scalar tensor on the
inputs' device from which every kernel regenerates the same keep mask, prefix_index ``[B]`` and prefix_lengths
``[N]`` int (backends see every prefix as a bank ``[N, Hkv, P, D]``; a single shared prefix is a bank of one),
attn_bias ``[B or 1, Hq or 1, Lq or 1, P + Lk or 1]`` fp32 or q's dtype (added to the logits)."""

NO_FEATURES = Features()


def check(ctx: CheckContext) -> Features:
    """The validated features of a call (``ctx.given``: the optional keywords passed, at least one)."""
    values = {}
    for name, value in ctx.given.items():
        o = _PUBLIC_BY_NAME.get(name)
        if o is None:
            raise TypeError(f"unexpected keyword argument {name!r}; the optional features are "
                            f"{list(_PUBLIC_BY_NAME)}")
        values[name] = None if value is None and o.off is None else o.check(value, ctx)
    return Features(**values)


_PUBLIC_BY_NAME = {o.name: o for o in PUBLIC}


def with_options(fn):
    """``fn``, whose ``**options`` take the record's public options, with a signature naming them (for help(),
    inspect and editors)."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.off) for o in PUBLIC]
    fn.__signature__ = sig.replace(parameters=params)
    return fn

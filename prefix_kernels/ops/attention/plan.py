"""Planned output-only calls: prefix attention checked and dispatched once, then replayed on a decode loop's hot path.

A decode loop calls the op once per layer per token, and from one token to the next the calls differ in their key
length alone. :func:`plan_prefix_attention` runs the full checks and the backend choice for such a call once and
returns a :class:`PrefixAttentionPlan`; :meth:`PrefixAttentionPlan.run` serves a later call that matches it through
the chosen backend's output-only entry directly (or the call the backend's ``specialize`` made for such calls: the
torch backend decides a decode step where every key is visible once), and returns None for one that does not (the
caller then sends it through :func:`~prefix_kernels.ops.attention.prefix_attention`, and may plan again).
FlashInfer's decode wrappers split plan and run the same way; here every run checks that the plan still holds.

A call matches when it has the plan's sizes (the key length aside), dtypes and devices, the same flags, scale,
backend name and scalar options, tensor options of the same shapes, dtypes and devices (only options whose checks
read nothing else: ALiBi's slopes and offsets), no gradient wanted, plain eager mode, and the dispatcher sees what
it saw at planning: the same registered backends, the same ``select`` (a wrapper set on ``backends.select`` to
watch the calls is not bypassed) and the same environment (read once per :func:`~..memo.memo_scope`, a model's
forward, else at every run). No backend's choice depends on the key length, so a plan holds as the cache grows.

Calls that are never planned, and so always take the full path: calls that want gradients or the LSE, traced or
compiled calls and tensor subclasses, a prefix bank or per-prefix lengths, dropout, an empty prefix, and tensor
options whose checks read values (``attn_bias``).
"""

from __future__ import annotations

import torch

from ..memo import scoped
from . import backends
from .features import NO_FEATURES, Features
from .inputs import _KEYABLE_TENSORS, check_inputs
from .inputs import plain_eager as _eager

__all__ = ["PrefixAttentionPlan", "plan_prefix_attention"]

_UNPLANNED_OPTIONS = ("prefix_index", "prefix_lengths")


def _environment() -> tuple:
    return scoped(_ENVIRONMENT, backends.DISPATCHER._environment)


_ENVIRONMENT = ("prefix_attention", "environment")


def _wants_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_dispatch_depth = getattr(torch._C, "_len_torch_dispatch_stack", None)


def plan_prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, causal=False, key_padding_mask=None,
                          softmax_scale=None, backend="auto", **options) -> PrefixAttentionPlan | None:
    """A plan for calls like this one (same arguments as ``prefix_attention``, ``return_lse`` excepted), or None
    when such calls are not planned (see the module docstring). Bad input raises as ``prefix_attention`` would."""
    if _wants_grad((q, k, v, prefix_k, prefix_v)):  # training: nothing to plan, and nothing checked twice
        return None
    for name, value in options.items():  # (the options' names and types alone: nothing checked twice either)
        if type(value) is torch.Tensor and name not in _KEYABLE_TENSORS:
            return None
        if name in _UNPLANNED_OPTIONS and value is not None:
            return None
    if options.get("dropout_p") not in (None, 0, 0.0):
        return None
    spec, features = check_inputs(q, k, v, prefix_k, prefix_v, causal=causal, key_padding_mask=key_padding_mask,
                                  softmax_scale=softmax_scale, **options)
    if not _eager(q, k, v, prefix_k, prefix_v):
        return None
    if prefix_k is not None and (prefix_k.dim() != 3 or prefix_k.shape[-2] == 0):
        return None
    select = backends.select
    env = _environment()
    chosen = select(spec, backend)
    impl = chosen.impl()
    special = getattr(impl, "specialize", None)
    call = None if special is None else special(q, k, prefix_k, key_padding_mask, causal, features)
    if call is None:
        call = getattr(impl, "infer", None)
    if call is None:
        def call(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, features, _forward=impl.forward):
            return _forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, False, features)[0]
    return PrefixAttentionPlan(q, k, prefix_k, key_padding_mask, causal, softmax_scale, backend, options,
                               spec.softmax_scale, features, chosen.name, call, select, env)


class PrefixAttentionPlan:
    """One planned kind of call (see the module docstring). ``backend``: the name of the backend that serves it."""

    __slots__ = ("q_shape", "dtype", "device", "heads_kv", "head_dim", "prefix_shape", "has_mask", "causal",
                 "scale_arg", "scale", "requested", "_names", "_types", "_values", "_tensors", "_normalised",
                 "features", "backend", "_call", "_select", "_generation", "_decisions", "_env", "_prefix", "runs")

    def __init__(self, q, k, prefix_k, key_padding_mask, causal, softmax_scale, requested, options, scale,
                 features: Features, backend: str, call, select, env):
        self.q_shape, self.dtype, self.device = q.shape, q.dtype, q.device
        self.heads_kv, self.head_dim = k.shape[1], k.shape[3]
        self.prefix_shape = None if prefix_k is None else prefix_k.shape
        self.has_mask = key_padding_mask is not None
        self.causal, self.scale_arg, self.scale, self.requested = causal, softmax_scale, scale, requested
        # The options as given, in the caller's order (a model's layers pass them the same way every time): their
        # names and types, the scalars' values, each tensor's (position, shape, dtype, device); and the scalars as
        # their checks normalised them, for the Features of a run.
        self._names = tuple(options)
        values = tuple(options.values())
        self._types = tuple(map(type, values))
        self._tensors = tuple((i, t.shape, t.dtype, t.device) for i, t in enumerate(values) if type(t) is torch.Tensor)
        self._values = tuple(None if type(x) is torch.Tensor else x for x in values)
        self._normalised = {n: getattr(features, n) for n, x in options.items() if type(x) is not torch.Tensor}
        self.features = features if features is NO_FEATURES else None  # else made per run, from its tensors
        self.backend, self._call, self._select, self._env = backend, call, select, env
        self._generation = backends.DISPATCHER.generation
        self._decisions = backends.DISPATCHER._decisions  # tests fake another machine with a new table
        self._prefix = None  # (prefix_k, prefix_v) of the last call served: the same tensors again need no checks
        self.runs = 0  # calls served (for tests and diagnostics)

    def run(self, q, k, v, prefix_k=None, prefix_v=None, *, causal=False, key_padding_mask=None, softmax_scale=None,
            backend="auto", **options) -> torch.Tensor | None:
        """``out [B, Hq, Lq, D]`` as ``prefix_attention`` returns it, for a call that matches the plan; None for
        one that does not (nothing has run then)."""
        if (causal is not self.causal or backend != self.requested or type(softmax_scale) is not
                type(self.scale_arg) or softmax_scale != self.scale_arg):
            return None
        values = tuple(options.values())
        if tuple(options) != self._names or tuple(map(type, values)) != self._types:
            return None
        if (type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor
                or (prefix_k is not None and type(prefix_k) is not torch.Tensor)
                or (prefix_v is not None and type(prefix_v) is not torch.Tensor)):
            return None  # (a subclass or anything else: the full path checks it and says what is wrong)
        if q.shape != self.q_shape or q.dtype is not self.dtype or q.device != self.device:
            return None
        ks = k.shape
        if (len(ks) != 4 or ks[0] != self.q_shape[0] or ks[1] != self.heads_kv or ks[3] != self.head_dim
                or ks[2] < 1 or v.shape != ks or k.dtype is not self.dtype or v.dtype is not self.dtype
                or k.device != self.device or v.device != self.device):
            return None
        last = self._prefix
        if last is not None and prefix_k is last[0] and prefix_v is last[1]:
            pass  # (a decode loop's layer gets the same prefix views at every step: their dtype and device cannot
            # change, and a size changed in place fails the kernels' own checks)
        elif prefix_k is None or prefix_v is None:
            if self.prefix_shape is not None or prefix_k is not prefix_v:
                return None
        elif (self.prefix_shape is None or prefix_k.shape != self.prefix_shape or prefix_v.shape != self.prefix_shape
              or prefix_k.dtype is not self.dtype or prefix_v.dtype is not self.dtype
              or prefix_k.device != self.device or prefix_v.device != self.device):
            return None
        if key_padding_mask is None:
            if self.has_mask:
                return None
        elif (not self.has_mask or type(key_padding_mask) is not torch.Tensor
              or key_padding_mask.dtype is not torch.bool or key_padding_mask.shape != (ks[0], ks[2])
              or key_padding_mask.device != self.device):
            return None
        values_given = values
        if self._tensors:
            for i, shape, dtype, device in self._tensors:
                t = values[i]
                if t.shape != shape or t.dtype is not dtype or t.device != device:
                    return None
            values = tuple(None if type(x) is torch.Tensor else x for x in values)
        if values != self._values:
            return None
        # (plain_eager and _wants_grad, spelled out: this runs once per layer per token)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or (
                prefix_k is not None and (prefix_k.requires_grad or prefix_v.requires_grad))):
            return None
        if (torch.compiler.is_compiling() or _dispatch_depth is None or _dispatch_depth() > 0 or _wrapped(q)
                or _wrapped(k) or _wrapped(v) or (prefix_k is not None and (_wrapped(prefix_k) or _wrapped(prefix_v)))):
            return None
        dispatcher = backends.DISPATCHER
        if (backends.select is not self._select or dispatcher.generation != self._generation
                or dispatcher._decisions is not self._decisions or _environment() != self._env):
            return None
        features = self.features
        if features is None:
            tensors = {self._names[i]: values_given[i] for i, *_ in self._tensors}
            features = Features(**self._normalised, **tensors)
        self.runs += 1
        if prefix_k is not None:
            self._prefix = (prefix_k, prefix_v)
        return self._call(q, k, v, prefix_k, prefix_v, key_padding_mask, self.causal, self.scale, features)

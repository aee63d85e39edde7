"""Which implementation serves a call, and why the others can't: one small dispatcher shared by every op.

Each op declares its backends as :class:`Backend` subclasses whose class attributes state what they
support (dtypes, head dims, features, ...); ``not_supported_reasons(spec)`` turns those declarations into
plain-language reasons (empty when the backend can serve). A :class:`Dispatcher` holds one op's backends in
preference order:

- ``backend="auto"`` takes the first backend that can serve; when it had to skip one that could run on the
  device but declined the input, it warns once with the reasons, so a slow fallback is never silent;
- the op's environment variables (first set wins) replace "auto" with a name;
- a backend named explicitly (by argument or variable) that cannot serve raises
  :class:`BackendUnavailableError` listing every reason, as does a name that another op has but this one
  lacks (say "cuda" for an op without a CUDA kernel); an unknown name is a ValueError.

Decisions are cached by everything they depend on (the spec's values, the variables read, the registered
backends), and the cached lookup is marked as a constant for torch.compile, which evaluates it once at trace
time instead of tracing through it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch

# The variable every op reads to replace "auto" (an op may read its own first).
ENV_VAR = "PREFIX_KERNELS_BACKEND"


class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot serve this input."""


class Backend:
    """One implementation of an op. Subclasses declare ``name``, ``description`` and their capabilities, and
    answer ``impl()`` with the module (or object) holding the implementation's functions."""

    name: str = ""
    description: str = ""

    def device_reasons(self, device: torch.device) -> list[str]:
        """Why the backend cannot run on this device at all (not input-specific)."""
        return []

    def input_reasons(self, spec) -> list[str]:
        """Why it cannot take this particular input (the device aside)."""
        return []

    def not_supported_reasons(self, spec) -> list[str]:
        return self.device_reasons(spec.device) or self.input_reasons(spec)

    def impl(self):
        raise NotImplementedError(f"backend {self.name!r} has no implementation")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def assume_constant_result(fn):
    """What ``torch.compiler.assume_constant_result`` does (it only sets this flag), without importing
    torch._dynamo at package import: that import takes seconds and loads triton.language, which must
    not happen before a user sets TRITON_INTERPRET. tests/ops/test_compile.py checks the flag."""
    fn._dynamo_marked_constant = True
    return fn


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=5)


def forget_warnings() -> None:
    """Let every fallback warning be raised once more (tests)."""
    _warned.clear()


_DISPATCHERS: dict[str, Dispatcher] = {}
_MAX_DECISIONS = 4096


class Dispatcher:
    """The backends of one op, in preference order, and the rules above.

    ``op``: how warnings name the op. ``action``: what errors say a backend cannot do ("serve this input").
    ``kernel``: what an op's backend is called in the error for a name only other ops have. ``env_vars``: the
    variables that replace "auto", the op's own first. ``spec_type``: the frozen dataclass of one call's
    sizes (tensors are not kept), which must have a ``device`` field.
    """

    def __init__(self, op: str, spec_type: type, env_vars: tuple[str, ...], action: str = "serve this input",
                 kernel: str = "kernel"):
        self.op, self.spec_type, self.env_vars, self.action, self.kernel = op, spec_type, env_vars, action, kernel
        self._backends: dict[str, Backend] = {}
        # A decode loop calls the op once per layer per token with the same sizes: walking the backends'
        # checks every time cost more than the attention of a small decode step. Each entry keeps the
        # fallback warning it raised, re-issued (once) on a hit.
        self._decisions: dict[tuple, tuple[str, str | None]] = {}
        self._fields = tuple(f.name for f in dataclasses.fields(spec_type))
        self._device_field = self._fields.index("device")
        # The same decisions by spec object (check_inputs hands the same spec to every call of a kind): id(spec)
        # -> (spec, requested, environment, decision, the _decisions it came from). Holding the spec keeps its id
        # from being reused; a new _decisions table (tests fake devices that way) invalidates every entry.
        self._by_spec: dict[int, tuple] = {}
        # Bumped whenever the backends change (what a planned call checks: see attention/plan.py).
        self.generation = 0
        _DISPATCHERS[op] = self

    def register(self, backend: Backend) -> None:
        """Add ``backend`` (after those registered before it, which is its preference order)."""
        self._backends[backend.name] = backend
        self._decisions.clear()
        self._by_spec.clear()
        self.generation += 1

    def unregister(self, name: str) -> None:
        self._backends.pop(name, None)
        self._decisions.clear()
        self.generation += 1
        self._by_spec.clear()

    def names(self) -> list[str]:
        """Registered backends in preference order."""
        return list(self._backends)

    def get(self, name: str) -> Backend:
        try:
            return self._backends[name]
        except KeyError:
            raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {self.names()}") from None

    def select(self, spec, requested: str = "auto") -> Backend:
        """The backend that serves ``spec``; see the module docstring for the rules."""
        if not isinstance(requested, str):
            raise TypeError(f"backend must be a string, got {type(requested).__name__}")
        if not torch.compiler.is_compiling():
            env = self._environment()
            hit = self._by_spec.get(id(spec))
            if (hit is not None and hit[0] is spec and hit[1] == requested and hit[2] == env
                    and hit[4] is self._decisions):
                return self._backends[self._announce(hit[3])]
            values = [getattr(spec, name) for name in self._fields]
            values[self._device_field] = str(spec.device)
            decision = self._decision(requested, tuple(values), env)
            if len(self._by_spec) >= _MAX_DECISIONS:
                self._by_spec.clear()
            self._by_spec[id(spec)] = (spec, requested, env, decision, self._decisions)
            return self._backends[self._announce(decision)]
        values = [getattr(spec, name) for name in self._fields]
        values[self._device_field] = str(spec.device)
        return self._backends[_select_name(self.op, requested, *values)]

    def describe(self) -> list[dict]:
        """Availability of each backend on this machine (for ``python -m prefix_kernels info``)."""
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.insert(0, torch.device("cuda", torch.cuda.current_device()))
        return [{"name": b.name, "description": b.description,
                 "devices": {str(d): b.device_reasons(d) for d in devices}} for b in self._backends.values()]

    def _environment(self) -> tuple:
        """The variables a decision reads."""
        get = os.environ.get
        return (*(get(var) for var in self.env_vars), get("TRITON_INTERPRET"))

    def _decision(self, requested: str, fields: tuple, env: tuple) -> tuple[str, str | None]:
        key = (requested, fields, env, tuple(self._backends))
        hit = self._decisions.get(key)
        if hit is None:
            if len(self._decisions) >= _MAX_DECISIONS:
                self._decisions.clear()
            hit = self._decisions[key] = self._decide(requested, fields)
        return hit

    @staticmethod
    def _announce(decision: tuple[str, str | None]) -> str:
        name, warning = decision
        if warning is not None:
            warn_once(warning)
        return name

    def _cached(self, requested: str, fields: tuple) -> str:
        return self._announce(self._decision(requested, fields, self._environment()))

    def _decide(self, requested: str, fields: tuple) -> tuple[str, str | None]:
        """(the backend's name, the fallback warning to raise or None); raises when an explicit backend
        cannot serve."""
        values = dict(zip(self._fields, fields, strict=True))
        values["device"] = torch.device(values["device"])
        spec = self.spec_type(**values)
        source = "backend argument"
        if requested == "auto":
            for var in self.env_vars:
                env = os.environ.get(var, "").strip()
                if env and env != "auto":
                    requested, source = env, f"{var} environment variable"
                    break
        if requested != "auto":
            if requested not in self._backends and any(requested in d._backends for d in _DISPATCHERS.values()):
                raise BackendUnavailableError(
                    f"backend {requested!r} (from the {source}) has no {self.kernel}; this op's backends are "
                    f"{self.names()} (set {self.env_vars[0]} to choose one for it alone)")
            reasons = self.get(requested).not_supported_reasons(spec)
            if reasons:
                raise BackendUnavailableError(f"backend {requested!r} (from the {source}) cannot {self.action}:\n"
                                              "  - " + "\n  - ".join(reasons))
            return requested, None

        skipped = []
        for backend in self._backends.values():
            if backend.device_reasons(spec.device):
                continue
            reasons = backend.input_reasons(spec)
            if not reasons:
                warning = None
                if skipped:
                    warning = (f"{self.op}: using the {backend.name!r} backend; skipped "
                               + "; ".join(f"{n!r} because {', '.join(r)}" for n, r in skipped))
                return backend.name, warning
            skipped.append((backend.name, reasons))
        raise BackendUnavailableError(f"no backend can serve this input: {skipped}")


@assume_constant_result
def _select_name(op: str, requested: str, *fields) -> str:
    # The choice depends only on sizes, dtype, device and the environment, all fixed for a traced graph, so
    # torch.compile evaluates it once at trace time instead of tracing through it. The spec travels as plain
    # values (the device as a string), which the compiler can hand over as constants.
    return _DISPATCHERS[op]._cached(requested, fields)

"""The prefix of one prefix-tuned model, computed once per forward, and the per-module slots that read it.

:class:`PrefixState` owns nothing but references: the :class:`~prefix_kernels.PrefixEncoder` (a submodule of
the model) and the state of each forward. A forward pre-hook on the base model calls
:meth:`PrefixState.begin_forward`, which opens a :class:`Call` (this forward's state) and computes every layer's
prefix in one encoder call, in the dtype the attention will see (the attention weights' dtype, or the autocast
dtype); every layer then reads its slice. Computing it there, before any layer runs, keeps it out of the layers'
checkpointed regions: gradient checkpointing recomputes each layer against the very prefix tensor of its forward
(the call stays referenced until the thread's next forward). A layer that sees another dtype gets the prefix
computed for that dtype on first use. A forward hook on the base model (:meth:`PrefixState.end_forward`, run on
exceptions too) closes the call: the forward begins and ends in those two places only.

Threads: the call, and the selection set by ``handle.use_prefix``, belong to the thread that made them (a
``threading.local``), so one model serves concurrent forwards from several threads, each with its own selection;
``handle.set_prefix_index`` sets the model-wide default that a thread's ``use_prefix`` overrides. A layer that
runs in a thread with no call of its own (gradient checkpointing recomputing a layer in autograd's device
threads) uses the model's latest call, and refuses when that call overlapped another thread's forward.

:class:`PrefixSlot` is what each attention module holds: its own layer's index into that prefix (not looked up
through ``layer_idx``, which e.g. T5 shares between self- and cross-attention), and the attention
implementation that served the module before. ``fetch`` is the one place where a module obtains its prefix.
A :class:`DelegateSlot` marks a module the prefix does not cover (a cross-attention): it names the previous
implementation only.

Many prefixes in one batch: the encoder may be a :class:`~prefix_kernels.PrefixBank` of N prefixes, and a
*selection* (a checked private copy of what the handle was given) says which prefix each batch row uses (-1:
none, the base model). At each forward :meth:`PrefixState.begin_forward` resolves the selection against that
forward's batch size once into ``rows`` ``[B]`` and each row's prefix length ``row_lengths`` ``[B]``, which the
attention, the position shift and Bloom's ALiBi offsets read. The batch must have one row per entry; the one
exception is the repetition ``generate()`` itself makes (``num_beams``, ``num_return_sequences``), which the
model's instance-level ``generate`` records (:meth:`PrefixState.generating`) and the selection follows. A single
prefix takes a selection too (0 or -1 per row).
"""

from __future__ import annotations

import contextlib
import threading

import torch

from ...modules import PrefixBank, PrefixEncoder
from ...ops.memo import memo_scope
from .attention import IMPLEMENTATION
from .positions import alibi_slopes


class Selection:
    """A checked per-row selection ``index`` ``[n]`` int64 on the CPU (a private copy), with what it resolved to
    for each forward geometry."""

    def __init__(self, index: torch.Tensor):
        self.index = index
        self.resolved: dict = {}  # (batch, device) -> (rows, row_lengths)

    def __len__(self) -> int:
        return self.index.numel()


class Call:
    """The state of one forward: its rows' prefix index and lengths, its prefix per dtype, how many layers
    fetched it."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.rows: torch.Tensor | None = None  # [B] prefix index (None: every row uses the prefix)
        self.row_lengths: torch.Tensor | None = None  # [B] int64 prefix length per row
        self.prefix: dict[torch.dtype, torch.Tensor] = {}
        self.groups: list | None = None  # [(prefix, row indices)], made on first use
        self.fetches = 0
        self.overlapped = False  # another thread's forward of the model ran during this one
        self.memo = None  # the memo_scope open while this forward runs
        self.expects = True  # the forward must reach a prefixed attention
        self.depth = 1  # forwards of hooked modules open in it (a seq2seq model's stacks run inside its forward)
        self.extras: dict = {}  # what a site computes once per forward (T5's prefix-column bias)
        self.views: dict = {}  # (dtype, grad mode) -> every layer's (prefix_k, prefix_v) views


_PER_PROCESS = ("_local", "_lock", "_active", "_last_call", "_views", "generate_reasons")


class PrefixState:
    """Shared by the slots of one model. ``enabled`` is False inside ``handle.disabled()`` (model-wide)."""

    def __init__(self, encoder: PrefixEncoder | PrefixBank, *, backend: str, shift_positions: bool,
                 probe: torch.nn.Module, layer: torch.nn.Module | None = None, model_name: str = "the model"):
        self.encoder = encoder
        self.probe = probe  # an attention module: its weights' dtype is the attention's dtype
        self.layer = layer  # the first layer: transformers marks gradient checkpointing on it
        self.backend = backend
        self.shift_positions = shift_positions
        self.model_name = model_name
        self.enabled = True
        self._selection: Selection | None = None  # the model-wide default, set through handle.set_prefix_index
        self._fresh()

    def _fresh(self) -> None:
        self._local = threading.local()  # .call, .override (a 1-tuple), .expansion (inside generate())
        self._lock = threading.Lock()
        self._active: set = set()  # the calls in flight
        self._last_call: Call | None = None
        self._views: dict = {}  # dtype -> (a prefix no gradient flows to, its layers' views): kept across forwards
        self.generate_reasons: list[str] = []  # why the last generate() kept the prefix out of the cache

    def __getstate__(self):
        # per-process, per-thread state (and this forward's tensors) is neither copied nor pickled
        return {k: v for k, v in self.__dict__.items() if k not in _PER_PROCESS}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fresh()

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

    # ---------------------------------------------------------------- selections
    def make_selection(self, selection) -> Selection | None:
        """A checked private copy of ``selection``: a [n] int tensor or a list of ints (-1: no prefix), names, or
        None entries (no prefix); None for none."""
        if selection is None:
            return None
        if isinstance(selection, torch.Tensor):
            if selection.dim() != 1 or selection.dtype.is_floating_point or selection.dtype == torch.bool:
                raise ValueError(f"a prefix index must be a 1-D integer tensor [batch], got {selection.dtype} of "
                                 f"shape {tuple(selection.shape)}")
            index = selection.detach().to("cpu", torch.int64, copy=True)  # the caller's later edits stay out
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
        return Selection(index)

    def select(self, selection) -> None:
        """Set (or clear, with None) the model-wide default selection (``handle.set_prefix_index``)."""
        self._selection = self.make_selection(selection)

    def push_selection(self, selection):
        """This thread's selection until :meth:`pop_selection` with the returned token (``handle.use_prefix``)."""
        made = self.make_selection(selection)
        token = getattr(self._local, "override", None)
        self._local.override = (made,)
        return token

    def pop_selection(self, token) -> None:
        if token is None:
            self._local.__dict__.pop("override", None)
        else:
            self._local.override = token

    def current_selection(self) -> Selection | None:
        """This thread's selection: its ``use_prefix``, else the model-wide default."""
        override = getattr(self._local, "override", None)
        return self._selection if override is None else override[0]

    @property
    def selection(self) -> torch.Tensor | None:
        """This thread's selection ``[n]`` (a copy), or None."""
        selection = self.current_selection()
        return None if selection is None else selection.index.clone()

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

    @contextlib.contextmanager
    def generating(self):
        """Around ``generate()`` on this thread: the repetition of rows it makes may then be recorded
        (:meth:`record_expansion`) and the selection follows it."""
        previous = getattr(self._local, "expansion", None)
        self._local.expansion = 1
        try:
            yield
        finally:
            if previous is None:
                self._local.__dict__.pop("expansion", None)
            else:
                self._local.expansion = previous

    @contextlib.contextmanager
    def prefix_held_in_cache(self):
        """Around a ``generate()`` whose KV cache holds the prefix (:mod:`.cached_generate`), on this thread: its
        forwards run the model's previous attention, masks and positions, and compute no prefix."""
        previous = getattr(self._local, "in_cache", False)
        self._local.in_cache = True
        try:
            yield
        finally:
            self._local.in_cache = previous

    def prefix_in_cache(self) -> bool:
        """Whether this thread's forwards find the prefix in their KV cache (see :meth:`prefix_held_in_cache`)."""
        return getattr(self._local, "in_cache", False)

    def record_expansion(self, expand_size) -> None:
        """``generate()`` repeats each row ``expand_size`` times (beams, sequences per prompt)."""
        if getattr(self._local, "expansion", None) is not None and isinstance(expand_size, int):
            self._local.expansion = max(1, expand_size)

    def _resolve(self, batch: int | None, device: torch.device):
        """This forward's ``(rows, row_lengths)`` from this thread's selection and the batch size."""
        selection = self.current_selection()
        if selection is None:
            if self.num_prefixes > 1:
                raise ValueError(f"this model holds a bank of {self.num_prefixes} prefixes {list(self.names)}: say "
                                 "which one each batch row uses, with handle.use_prefix(...) or "
                                 "handle.set_prefix_index(...) (-1 or None for the base model)")
            return None, None  # a bank of one: every row uses it (fetch serves it as one prefix)
        n = len(selection)
        expansion = getattr(self._local, "expansion", None) or 1
        repeat = 1
        if batch is not None and batch != n:
            if expansion > 1 and batch == n * expansion:
                repeat = expansion
            else:
                known = (f"; generate() repeats each row {expansion} times here, which needs a batch of "
                         f"{n * expansion}" if expansion > 1 else "")
                raise ValueError(f"the prefix selection has {n} rows but the batch has {batch}: give one entry "
                                 f"per batch row{known}")
        key = (batch, device)
        resolved = selection.resolved.get(key)
        if resolved is None:
            index = selection.index if repeat == 1 else selection.index.repeat_interleave(repeat)
            lengths = torch.tensor(self.lengths(), dtype=torch.int64)
            row_lengths = torch.where(index >= 0, lengths[index.clamp(min=0)], 0)
            resolved = selection.resolved[key] = (index.to(device), row_lengths.to(device))
        return resolved

    # ---------------------------------------------------------------- calls
    def current(self) -> Call:
        """This thread's call (the forward running, or the last one it ran)."""
        call = getattr(self._local, "call", None)
        if call is not None:
            return call
        call = self._last_call
        if call is None:
            raise RuntimeError(f"a prefix-tuned attention layer of {self.model_name} ran outside a forward of the "
                               "model: call the model (its base model's forward computes the prefix), not a layer")
        if call.overlapped:
            raise RuntimeError(f"a prefix-tuned layer of {self.model_name} ran in a thread that started no forward "
                               "(gradient checkpointing recomputing a layer in autograd's device threads) while "
                               "forwards of this model overlapped in several threads, so which forward it belongs "
                               "to is unknown: with gradient checkpointing on a GPU, run one forward and backward "
                               "at a time per model (or give each thread its own copy.deepcopy of the model)")
        return call

    @property
    def rows(self) -> torch.Tensor | None:
        """This thread's forward's ``[B]`` prefix index (None: every row uses the prefix)."""
        return self.current().rows

    @property
    def row_lengths(self) -> torch.Tensor | None:
        return self.current().row_lengths

    @property
    def fetches(self) -> int:
        call = getattr(self._local, "call", None)
        return 0 if call is None else call.fetches

    def row_groups(self) -> list[tuple[int, torch.Tensor]]:
        """This forward's rows grouped by prefix: ``[(prefix or -1, row indices [n_i])]`` (for per-prefix heads)."""
        call = self.current()
        if call.groups is None:
            rows = call.rows
            values = rows.cpu()
            call.groups = [(int(v), (values == v).nonzero().view(-1).to(rows.device)) for v in values.unique()]
        return call.groups

    @property
    def num_virtual_tokens(self) -> int:
        return self.encoder.num_virtual_tokens

    def _probe_weight(self) -> torch.Tensor | None:
        """The probe's first parameter, ``next(probe.parameters())``. Where it lives is found once and read back from
        there on every forward (walking the module tree for it cost more than the rest of a decode step's hooks); a
        parameter since replaced or removed there sends the lookup back to the walk."""
        place = self.__dict__.get("_probe_place")  # (the submodule names down to its owner, its name)
        if place is not None:
            owner = self.probe
            for name in place[0]:
                owner = owner._modules.get(name)
                if owner is None:
                    break
            else:
                weight = owner._parameters.get(place[1])
                if weight is not None:
                    return weight
        for path, owner in self.probe.named_modules():
            for name, weight in owner._parameters.items():
                if weight is not None:
                    self._probe_place = (tuple(path.split(".")) if path else (), name)
                    return weight
        return None

    def probe_device(self) -> torch.device:
        weight = self._probe_weight()
        return torch.device("cpu") if weight is None else weight.device

    def attention_dtype(self, weight: torch.Tensor | None = None) -> torch.dtype | None:
        """The dtype q will have in the attention: the autocast dtype under autocast, else the weights' dtype."""
        weight = self._probe_weight() if weight is None else weight
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

    def begin_forward(self, module, args, kwargs, expects: bool = True, nested: bool = False) -> None:
        """Forward pre-hook of the base model, where a forward begins: open this thread's call; resolve the row
        selection against this forward's batch and compute the prefix. ``nested``: the hook of an encoder-decoder
        model's stack (``generate()`` runs the encoder alone), which joins the call of the model's forward when it
        runs inside one (only these read the thread's previous call: a compiled decoder-only forward guards on
        nothing of it). ``expects``: the forward must reach a prefixed attention (not so for an encoder without
        a prefix)."""
        if nested:
            open_call = getattr(self._local, "call", None)
            if open_call is not None and open_call.depth > 0:
                open_call.depth += 1
                return
        call = Call(self.enabled and not self.prefix_in_cache())
        call.expects = expects
        if not torch.compiler.is_compiling():
            with self._lock:
                if self._active:
                    call.overlapped = True
                    for other in self._active:
                        other.overlapped = True
                self._active.add(call)
        self._local.call = call
        self._last_call = call
        if call.enabled:
            weight = self._probe_weight()
            device = torch.device("cpu") if weight is None else weight.device
            call.rows, call.row_lengths = self._resolve(_batch_size(args, kwargs), device)
            self._check_checkpointing()
            dtype = self.attention_dtype(weight)
            if dtype is not None:
                self.prefix(dtype)
        # Within one forward nothing edits the padding mask or the selection between layers: what the op derives
        # from them (range checks, padding bounds) is computed at the first layer and reused by the others.
        call.memo = memo_scope()
        call.memo.__enter__()

    def end_forward(self, module, args, output) -> None:
        """Forward hook of the base model (``always_call``: on exceptions too, with ``output`` None), where a
        forward ends: close this thread's call, and check that the prefix reached the attention."""
        call = getattr(self._local, "call", None)
        if call is None or call.depth <= 0:
            return
        call.depth -= 1
        if call.depth > 0:
            return
        if call.memo is not None:
            call.memo.__exit__(None, None, None)
            call.memo = None
        if not torch.compiler.is_compiling():
            with self._lock:
                self._active.discard(call)
        if output is not None and call.enabled and call.fetches == 0 and call.expects:
            raise RuntimeError(
                f"prefix tuning reached no attention layer of {self.model_name} in this forward: its attention did "
                f"not call the attention function {IMPLEMENTATION!r} (was the model's attention implementation changed "
                "after apply_prefix_tuning?)")

    def position_offsets(self):
        """How far to shift this forward's real positions: P (an int), or ``[B]`` per row with a selection."""
        row_lengths = self.current().row_lengths
        return self.num_virtual_tokens if row_lengths is None else row_lengths

    def layer_views(self, call: Call, dtype: torch.dtype) -> list:
        """Every layer's ``(prefix_k, prefix_v)`` views of :meth:`prefix` (a bank's ``[N, Hkv, Pmax, D]`` each),
        made once per forward, or once for as long as the encoder serves the same frozen prefix (decode steps)."""
        # Views made with grad mode off carry no graph: a layer that reentrant checkpointing recomputes with grad
        # mode on gets views of its own, through which the gradient reaches the prefix. Made with grad mode off,
        # they are kept for as long as the encoder returns the same prefix tensor (its
        # cache: frozen use); made with grad mode on, they hold this step's graph and live as long as the call.
        grad = torch.is_grad_enabled()
        key = (dtype, grad)
        views = call.views.get(key)
        if views is None:
            prefix = self.prefix(dtype)
            kept = None if grad else self._views.get(dtype)
            if kept is not None and kept[0] is prefix:
                views = kept[1]
            else:
                views = [tuple(layer.unbind(0)) for layer in prefix.unbind(0)]
                if not grad:
                    self._views[dtype] = (prefix, views)
            call.views[key] = views
        return views

    def prefix(self, dtype: torch.dtype) -> torch.Tensor:
        """Every layer's prefix ``[num_layers, 2, Hkv, P, D]`` (a bank: ``[num_layers, 2, N, Hkv, Pmax, D]``) in
        ``dtype``, computed once per forward."""
        call = self.current()
        prefix = call.prefix.get(dtype)
        if prefix is None:
            prefix = call.prefix[dtype] = self.encoder(dtype=dtype)
        return prefix


class PrefixSlot:
    """One attention module's place in the prefix: layer ``index`` of ``state``, and the attention implementation
    that served the module before (for ``handle.disabled()``)."""

    def __init__(self, state: PrefixState, index: int, previous: str):
        self.state = state
        self.index = index
        self.previous = previous
        self._alibi: dict[torch.device, torch.Tensor] = {}
        self.plans: dict = {}  # q's shape -> the PrefixAttentionPlan of this module's calls (see attention.py)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["plans"] = {}  # made again at the next call: a plan refers to the dispatcher of this process
        return state

    def __setstate__(self, state):
        state.setdefault("plans", {})
        state.pop("plan", None)  # (pickled before plans were kept per kind of call)
        self.__dict__.update(state)

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
        call = state.current()
        call.fetches += 1
        prefix_k, prefix_v = state.layer_views(call, dtype)[self.index]
        rows = call.rows
        if rows is None:
            if state.is_bank:  # a bank of one without a selection: its one prefix, for every row
                return prefix_k[0], prefix_v[0], None, None
            return prefix_k, prefix_v, None, None
        if rows.shape[0] != batch:
            raise ValueError(f"the attention got a batch of {batch} rows, but the prefix selection was resolved for "
                             f"{rows.shape[0]} at the start of the forward")
        lengths = None
        if state.is_bank and not state.encoder.uniform():
            lengths = state.encoder.prefix_lengths(prefix_k.device)
        return prefix_k, prefix_v, rows, lengths

    def __repr__(self) -> str:
        return f"PrefixSlot(layer={self.index}, previous={self.previous!r})"


class DelegateSlot:
    """A module the prefix does not cover that may call our attention function (a cross-attention sharing the
    model's config): it is served by ``previous``, the implementation that served it before."""

    state = None

    def __init__(self, previous: str):
        self.previous = previous

    def __repr__(self) -> str:
        return f"DelegateSlot(previous={self.previous!r})"


def _batch_size(args, kwargs) -> int | None:
    """The batch size of a base model's forward: from input_ids (its first argument) or inputs_embeds (or an
    encoder-decoder model's decoder inputs, when ``generate()`` passes the encoder's outputs)."""
    for value in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs_embeds"),
                  kwargs.get("decoder_input_ids"), kwargs.get("decoder_inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None

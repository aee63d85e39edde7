"""``apply_prefix_tuning`` and the handle that undoes it.

What applying does to a model, each step recorded on the handle's undo stack (:class:`~.patches.Patches`: data
records naming what changed by its path in the model; ``remove()`` runs them in reverse):

1. freezes the model's parameters (optional) and swaps each task head to train (``modules_to_save``) for a
   trainable copy, so the model's own head stays as it was (for a prefix bank, a :class:`~.heads.RoutedHead`
   holding a copy per prefix);
2. adds the :class:`~prefix_kernels.PrefixEncoder` (or the :class:`~prefix_kernels.PrefixBank` of many) as the
   submodule ``prefix_encoder`` (``model.parameters()``, optimizers, ``state_dict`` and ``.to()`` see it);
3. points the model's configs at our attention implementation (registered once with transformers' attention and
   mask interfaces);
4. gives each self-attention module its own prefix slot, which names the implementation that served it before
   (and, for a family whose attention is not on the interface, an instance-level forward); any other module on
   those configs (a cross-attention) gets a slot that only names it;
5. hooks the module that consumes position ids, to shift them by P (PEFT's semantics), and the base model's
   forward (``Family.root``), where each forward begins (the prefix is computed once) and ends;
6. lets ``generate()`` build masks inside the forward for static caches, and records the rows it repeats
   (instance attributes).

No class, function or module-level name of transformers is replaced; everything lives on this model instance,
and so does the handle (``handle_of(model)``): ``copy.deepcopy(model)`` gives an independent prefix-tuned model
with its own handle, and the model pickles (``torch.save(model)``) with its prefix.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Mapping

import torch
from torch import nn

from ...modules import PrefixBank, PrefixEncoder
from . import registration
from .attention import SLOT_ATTR
from .checkpoint import install as install_checkpointing
from .checkpoint import save_trained_state
from .config import PrefixConfig
from .facts import ENCODER_NAME, HANDLE_ATTR, find_modules, model_sizes, task_of
from .families import Family, family_of
from .generation import ExpandInputs, Generate
from .heads import RoutedHead
from .patches import Patches
from .positions import ShiftPositions
from .seq2seq import Layout, ShiftSharedPositions, SiteSlot, split_sites, stack_of
from .state import DelegateSlot, PrefixSlot, PrefixState


def _masks_from_forward(config, inputs_embeds, attention_mask, *args, **kwargs):
    """Stands in for transformers' ``create_masks_for_generate``: our masks are ``[B, Lk]``, cheap to build inside
    the forward, so ``generate()`` hands the 2D mask on unchanged instead of precomputing 4D ones."""
    return attention_mask


def handle_of(model: nn.Module) -> PrefixHandle:
    """The :class:`PrefixHandle` of a prefix-tuned model (also of a ``copy.deepcopy`` or an unpickled copy of one,
    which carries its own)."""
    handle = getattr(model, HANDLE_ATTR, None) if isinstance(model, nn.Module) else None
    if handle is None:
        raise ValueError(f"{type(model).__name__} is not prefix-tuned: call apply_prefix_tuning or load_peft_adapter "
                         "first")
    return handle


class PrefixHandle:
    """The prefix tuning applied to one model. Returned by :func:`apply_prefix_tuning`; :func:`handle_of` finds
    it from the model.

    Attributes:
        model: the model.
        config: the :class:`PrefixConfig` (for a bank: the first prefix's; the fields that apply to the whole
            model, such as ``shift_positions``, ``backend`` and ``modules_to_save``, are the same for all).
        configs: name -> :class:`PrefixConfig` of each prefix.
        family: the :class:`~.families.Family` adapter that served it.
        layout: for an encoder-decoder model, the :class:`~.seq2seq.Layout` of its prefixed sites (None otherwise).
        prefix_encoder: the :class:`~prefix_kernels.PrefixEncoder` (also ``model.prefix_encoder``), or for many
            prefixes the :class:`~prefix_kernels.PrefixBank` holding one per prefix.
        modules_to_save: qualified name -> the trainable copy of each task head swapped into the model; for a bank,
            a :class:`~.heads.RoutedHead` holding one copy per prefix (see :meth:`modules_to_save_of`).
        patches: the undo stack of what applying changed (:class:`~.patches.Patches`).
    """

    def __init__(self, model: nn.Module, config: PrefixConfig, family: Family, encoder: PrefixEncoder | PrefixBank,
                 modules: list[nn.Module], configs: dict[str, PrefixConfig] | None = None,
                 layout: Layout | None = None):
        self.model = model
        self.layout = layout
        self.config = config
        self.configs = configs or {"default": config}
        self.family = family
        self.prefix_encoder = encoder
        self.modules_to_save: dict[str, nn.Module] = {}
        self.task_type: str | None = None
        self.patches = Patches()
        self.state = PrefixState(encoder, backend=config.backend, shift_positions=config.shift_positions,
                                 probe=modules[0], layer=family.layer_list(model)[0],
                                 model_name=type(model).__name__)

    def __setstate__(self, state) -> None:
        # a copy, or a model unpickled in another process: our name must be registered with transformers there
        self.__dict__.update(state)
        registration.register()

    # ---------------------------------------------------------------- public
    @property
    def num_virtual_tokens(self) -> int:
        """P; for a bank, the longest prefix's length (Pmax)."""
        return self.prefix_encoder.num_virtual_tokens

    @property
    def is_bank(self) -> bool:
        """Whether the model holds a :class:`~prefix_kernels.PrefixBank` (``num_prefixes=`` or several adapters)."""
        return self.state.is_bank

    @property
    def num_prefixes(self) -> int:
        return self.state.num_prefixes

    @property
    def prefix_names(self) -> tuple[str, ...]:
        """The prefixes' names in bank order (``("default",)`` for a single prefix, PEFT's adapter name)."""
        return self.state.names

    @property
    def prefix_lengths(self) -> tuple[int, ...]:
        """Each prefix's number of virtual tokens, in bank order."""
        return self.state.lengths()

    def encoder_of(self, prefix) -> PrefixEncoder:
        """The :class:`~prefix_kernels.PrefixEncoder` of one prefix (a name or a bank position)."""
        if not self.is_bank:
            if prefix not in (None, 0, "default"):
                raise ValueError(f"this model holds a single prefix ('default' or 0), not {prefix!r}")
            return self.prefix_encoder
        if prefix is None:
            raise ValueError(f"name the prefix: this model holds {list(self.prefix_names)}")
        return self.prefix_encoder.encoders[self.prefix_encoder.index_of(prefix)]

    def modules_to_save_of(self, prefix=None) -> dict[str, nn.Module]:
        """Qualified name -> the head module of one prefix (a name or bank position; for a single prefix, its
        ``modules_to_save``). A bank keeps a copy of every head per prefix (:class:`~.heads.RoutedHead`)."""
        if not self.is_bank:
            self.encoder_of(prefix)  # checks the name
            return dict(self.modules_to_save)
        i = self.prefix_encoder.index_of(0 if prefix is None and self.num_prefixes == 1 else prefix)
        return {name: routed.heads[i] for name, routed in self.modules_to_save.items()}

    def set_prefix_index(self, selection) -> None:
        """Choose each batch row's prefix for the following forwards (``generate()`` included) of every thread
        that is not inside :meth:`use_prefix`, until changed or cleared with None.

        ``selection``: one entry per batch row: a ``[B]`` int tensor or a list of ints (bank positions, -1 for no
        prefix), prefix names, or None entries (no prefix: that row computes exactly what the base model
        computes). It is checked and copied now (later edits of the caller's tensor do not reach the model). The
        batch must have exactly one row per entry, except inside ``generate()``, which repeats each row for
        ``num_beams`` / ``num_return_sequences``: the selection is repeated the same way there. Without a
        selection a bank of several prefixes refuses to run; a single prefix serves every row.
        """
        self._require_active()
        self.state.select(selection)

    @contextlib.contextmanager
    def use_prefix(self, selection):
        """``with handle.use_prefix(["sst2", "qnli", None]):`` the selection of :meth:`set_prefix_index` inside the
        block, for this thread only (other threads' forwards keep theirs); the previous one restored after."""
        self._require_active()
        token = self.state.push_selection(selection)
        try:
            yield self.model
        finally:
            self.state.pop_selection(token)

    @property
    def active(self) -> bool:
        """False once :meth:`remove` ran."""
        return getattr(self.model, HANDLE_ATTR, None) is self

    def prefix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Every layer's prefix ``[num_layers, 2, num_kv_heads, P, head_dim]`` (keys at ``[:, 0]``); for a bank
        ``[num_layers, 2, N, num_kv_heads, Pmax, head_dim]``. For an encoder-decoder model the layers are those of
        every prefixed site, in the order encoder, decoder, cross ("paper": ``L_enc + 2 * L_dec`` layers; "peft":
        the decoder's ``L_dec``): see :meth:`site_prefixes`."""
        return self.prefix_encoder(dtype=dtype)

    def site_prefixes(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The prefix of each site, from one encoder call: ``{"encoder": ..., "decoder": ..., "cross": ...}`` (the
        sites the model's ``prefix_sites`` covers), each ``[num_layers_of_that_stack, 2, num_kv_heads, P,
        head_dim]`` (a bank: ``[..., 2, N, num_kv_heads, Pmax, head_dim]``): layer l's keys ``[l, 0]`` and values
        ``[l, 1]`` are what that layer's attention of the site attends to before the input's. A model with one
        kind of attention has one site, ``"decoder"`` for decoder-only models, ``"encoder"`` for encoder-only
        ones."""
        prefix = self.prefix(dtype)
        if self.layout is None:
            encoder = self.family.name in ("BERT", "RoBERTa") and not getattr(self.model.config, "is_decoder", False)
            return {"encoder" if encoder else "decoder": prefix}
        return split_sites(prefix, self.layout)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that require grad: the prefix encoder's and the saved modules' (and, when the base
        model was not frozen, the model's own)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def disabled(self):
        """Run the model without the prefix: its previous attention implementation, masks and positions. This is
        the base model only as far as ``modules_to_save`` are concerned: a single prefix's trainable copies of
        the task heads stay in place (with whatever they learned; a bank's per-prefix heads give way to the
        model's own), and a base model that was not frozen keeps what it learned. For the model exactly as before
        applying, use :meth:`remove`. Model-wide: other threads' forwards inside the block run disabled too."""
        self._require_active()
        configs = [(record.config(self.model), record.previous) for record in self.patches.configs()]
        self.state.enabled = False
        for config, previous in configs:
            config._attn_implementation_internal = previous
        try:
            yield self.model
        finally:
            for config, _ in configs:
                config._attn_implementation_internal = registration.NAME
            self.state.enabled = True

    def remove(self) -> None:
        """Undo everything :func:`apply_prefix_tuning` did: the model is exactly as before (its parameters,
        ``requires_grad`` flags, modules, hooks, attributes and attention implementation). Idempotent; a copy of
        the model (``copy.deepcopy``) has its own handle, and removing one leaves the other as it is."""
        self.patches.undo_all(self.model)

    def print_trainable_parameters(self) -> None:
        """PEFT's "trainable params: X || all params: Y || trainable%: Z" for the model."""
        from .training import print_trainable_parameters

        print_trainable_parameters(self.model)

    def save_pretrained(self, directory) -> None:
        """The model's trained state (see :mod:`.checkpoint`); reload with ``prefix_kernels.from_pretrained``."""
        save_trained_state(self, directory)

    def save_peft_adapter(self, directory, prefix=None) -> None:
        """Write a PEFT prefix-tuning adapter directory (see :func:`prefix_kernels.save_peft_adapter`); for a bank,
        of the one ``prefix`` (a name or position)."""
        from ... import save_peft_adapter  # the package's public function (integrations/peft.py)

        save_peft_adapter(self, directory, prefix=prefix)

    def save_peft_adapters(self, directory) -> dict[str, str]:
        """Write every prefix as its own PEFT adapter, in ``directory/<name>``; returns name -> directory."""
        written = {}
        for i, name in enumerate(self.prefix_names):
            written[name] = os.path.join(os.fspath(directory), name)
            self.save_peft_adapter(written[name], prefix=i)
        return written

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        bank = f", prefixes={dict(zip(self.prefix_names, self.prefix_lengths, strict=True))}" if self.is_bank else ""
        return (f"PrefixHandle({type(self.model).__name__}, family={self.family.name}, "
                f"num_virtual_tokens={self.num_virtual_tokens}{bank}, {state})")

    # ---------------------------------------------------------------- install
    def _slot(self, index: int, module: nn.Module, previous: str) -> PrefixSlot:
        if self.layout is None:
            return PrefixSlot(self.state, index, previous)
        site = self.layout.sites[index]
        source = None
        if site != "cross":  # T5: the stack's first layer holds the relative bias every layer of the stack adds
            source = next((m for m, s in zip(self.layout.modules, self.layout.sites, strict=True)
                           if s == site and hasattr(m, "relative_attention_bias")), None)
        return SiteSlot(self.state, self.layout.indices[index], previous, site, source, self.config.shift_positions)

    def _require_active(self):
        if not self.active:
            raise RuntimeError("this prefix-tuning handle was removed")

    def _swap_in_trainable_copies(self, names: tuple[str, ...], required: bool) -> None:
        found = find_modules(self.model, names)
        if required:
            missing = [n for n in names if not any(q == n or q.endswith("." + n) for q in found)]
            if missing:
                raise ValueError(f"modules_to_save {missing} match no module of {type(self.model).__name__}")
        for qualified, module in found.items():
            if self.state.is_bank:  # a head per prefix, routed per row
                copies = [copy.deepcopy(module).requires_grad_(True) for _ in range(self.num_prefixes)]
                trainable = RoutedHead(module, copies, self.state)
            else:
                trainable = copy.deepcopy(module)
                trainable.requires_grad_(True)
            self.patches.swap_module(self.model, qualified, trainable)
            self.modules_to_save[qualified] = trainable

    def _install(self, modules: list[nn.Module]) -> None:
        config, model, family, patches = self.config, self.model, self.family, self.patches
        registration.register()
        patches.set_attr(model, "", HANDLE_ATTR, self)
        if config.freeze_base_model:
            patches.freeze(model)
        self.task_type, heads = task_of(model)
        if config.modules_to_save == "auto":
            self._swap_in_trainable_copies(heads, required=False)
        elif config.modules_to_save:
            self._swap_in_trainable_copies(config.modules_to_save, required=True)
        patches.add_module(model, "", ENCODER_NAME, self.prefix_encoder)
        path = {id(m): name for name, m in model.named_modules()}
        root = path[id(model.base_model.get_submodule(family.root))]

        previous = {}  # id(config) -> the implementation it named before
        for owner in [model, model.base_model, *modules]:
            owned = getattr(owner, "config", None)
            if owned is not None and id(owned) not in previous:
                previous[id(owned)] = patches.switch_config(model, path[id(owner)], registration.NAME)
        model_previous = previous[id(model.config)] or "eager"
        for index, module in enumerate(modules):
            if SLOT_ATTR in module.__dict__:
                raise ValueError(f"{type(module).__name__} already holds a prefix slot")
            own = getattr(module, "config", None)
            slot = self._slot(index, module, (previous[id(own)] if own is not None else None) or model_previous)
            patches.set_attr(model, path[id(module)], SLOT_ATTR, slot)
            if family.alibi:  # made now, so that a compiled forward finds them and does not recompile
                slot.alibi_slopes(module.num_heads, self.state.probe_device())
            if family.forward is not None:
                patches.set_attr(model, path[id(module)], "forward", functools.partial(family.forward, module))
        for name, module in model.named_modules():  # the rest on these configs: served as before
            owned = getattr(module, "config", None)
            if owned is not None and id(owned) in previous and SLOT_ATTR not in module.__dict__:
                patches.set_attr(model, name, SLOT_ATTR, DelegateSlot(previous[id(owned)] or "eager"))

        spec = family.positions
        if config.shift_positions and spec is not None:
            target = model.base_model.get_submodule(spec.path)
            first = spec.first_position(model.config)
            table = getattr(target, "num_embeddings", None)
            longest = self.num_virtual_tokens
            if table is not None and first + longest >= table:
                raise ValueError(f"num_virtual_tokens={longest} leaves no room in "
                                 f"{type(model).__name__}'s {table} learned positions (shifted positions start at "
                                 f"{first + longest}); use fewer or shift_positions=False")
            if spec.shared:  # one [L] row for the batch: the embedding is recomputed, per row when needed
                patches.add_hook(model, path[id(target)], ShiftSharedPositions(self.state, first), pre=False,
                                 with_kwargs=True)
            else:
                patches.add_hook(model, path[id(target)], ShiftPositions(spec, first, self.state), pre=True,
                                 with_kwargs=True)
        # where each forward begins and ends (the end runs on exceptions too)
        patches.add_hook(model, root, self.state.begin_forward, pre=True, with_kwargs=True)
        patches.add_hook(model, root, self.state.end_forward, pre=False, always_call=True)
        if self.layout is not None:  # generate() runs the encoder alone: its stacks open (or join) a forward too
            for stack in ("encoder", "decoder"):
                expects = any(stack_of(site) == stack for site in self.layout.spans)
                where = f"{root}.{stack}" if root else stack
                begin = functools.partial(self.state.begin_forward, expects=expects, nested=True)
                patches.add_hook(model, where, begin, pre=True, with_kwargs=True)
                patches.add_hook(model, where, self.state.end_forward, pre=False, always_call=True)
        patches.set_attr(model, "", "create_masks_for_generate", _masks_from_forward)
        if hasattr(type(model), "generate") and hasattr(type(model), "_expand_inputs_for_generation"):
            patches.set_attr(model, "", "generate", Generate(model, self.state, family))
            patches.set_attr(model, "", "_expand_inputs_for_generation", ExpandInputs(model, self.state))
        install_checkpointing(self)  # save_pretrained, print_trainable_parameters on the instance


_MODEL_WIDE = ("shift_positions", "modules_to_save", "freeze_base_model", "backend", "prefix_sites")


def _bank_configs(config, num_prefixes) -> dict[str, PrefixConfig] | None:
    """name -> config of each prefix of a bank, or None for a single prefix."""
    if isinstance(config, PrefixConfig):
        if num_prefixes is None:
            return None
        if isinstance(num_prefixes, bool) or not isinstance(num_prefixes, int) or num_prefixes < 1:
            raise ValueError(f"num_prefixes must be a positive int, got {num_prefixes!r}")
        return {str(i): config for i in range(num_prefixes)}
    if isinstance(config, Mapping):
        if num_prefixes is not None and num_prefixes != len(config):
            raise ValueError(f"num_prefixes={num_prefixes} but {len(config)} configs were given")
        if not config:
            raise ValueError("a prefix bank needs at least one prefix config")
        for name, c in config.items():
            if not isinstance(name, str) or not name or "." in name or "/" in name:
                raise ValueError(f"prefix names must be non-empty strings without '.' or '/', got {name!r}")
            if not isinstance(c, PrefixConfig):
                raise TypeError(f"config of prefix {name!r} must be a PrefixConfig, got {type(c).__name__}")
        first = next(iter(config.values()))
        for name, c in config.items():
            for field in _MODEL_WIDE:
                if getattr(c, field) != getattr(first, field):
                    raise ValueError(f"prefix {name!r} has {field}={getattr(c, field)!r} but the first has "
                                     f"{getattr(first, field)!r}: it applies to the whole model, so the prefixes of "
                                     "one bank must agree on it")
        return dict(config)
    raise TypeError(f"config must be a PrefixConfig or a mapping name -> PrefixConfig, got {type(config).__name__}")


def _encoder(config: PrefixConfig, sizes, device) -> PrefixEncoder:
    num_layers, _, kv_heads, head_dim = sizes
    return PrefixEncoder(config.num_virtual_tokens, num_layers, kv_heads, head_dim,
                         prefix_projection=config.prefix_projection, encoder_hidden_size=config.encoder_hidden_size,
                         prefix_dropout=config.prefix_dropout, backend=config.backend, device=device,
                         dtype=config.encoder_dtype or torch.float32)


def apply_prefix_tuning(model: nn.Module, config: PrefixConfig | Mapping[str, PrefixConfig], *,
                        num_prefixes: int | None = None) -> PrefixHandle:
    """Prefix-tune a Hugging Face model in place: a learned prefix of ``config.num_virtual_tokens`` keys and values
    per layer, attended to by every token through :func:`prefix_kernels.prefix_attention`.

    Semantics are PEFT's prefix tuning (P-Tuning v2): every query sees the P prefix columns, padding masks only
    the real keys, and real tokens' positions start at P (``shift_positions=False``: at 0). The prefix is
    computed once per forward and shared by the batch; it never enters the KV cache, so ``generate()`` with any
    cache and gradient checkpointing work unchanged.

    Many prefixes in one batch: ``num_prefixes=N`` builds a :class:`~prefix_kernels.PrefixBank` of N prefixes
    of ``config`` (named "0".."N-1"), and a mapping ``{name: PrefixConfig}`` one of named prefixes, which may
    differ in length, projection and dropout (the model-wide fields ``shift_positions``, ``modules_to_save``,
    ``freeze_base_model`` and ``backend`` must agree). Each batch row then uses the prefix chosen by
    ``handle.use_prefix(...)`` / ``handle.set_prefix_index(...)`` (or none), and computes exactly what the
    single-prefix model of that prefix computes for it: positions shift by that row's prefix length, and a
    prefix's gradient is the sum over its rows. Each prefix gets its own trainable copy of every head in
    ``modules_to_save``, applied to its rows (rows without a prefix go through the model's own head).

    Args:
        model: a ``PreTrainedModel`` of a supported family (see :func:`supported_model_types`), any head.
        config: a :class:`PrefixConfig`, or a mapping name -> PrefixConfig for a bank.
        num_prefixes: with one PrefixConfig, the number of prefixes of a bank (default: a single prefix).

    Returns:
        A :class:`PrefixHandle`; ``handle.remove()`` restores the model exactly.

    Raises:
        TypeError: ``model`` is not a transformers model, or ``config`` not a PrefixConfig.
        UnsupportedModelError: no adapter for the model's family (the message names the class and what is missing).
        ValueError: the model is already prefix-tuned, or the config does not fit the model.
    """
    configs = _bank_configs(config, num_prefixes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    family = family_of(model)
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise ValueError(f"{type(model).__name__} is already prefix-tuned: call remove() on its handle first")
    first = config if configs is None else next(iter(configs.values()))
    layout = None
    if family.sites:
        from .seq2seq import layout_and_sizes

        layout, sizes = layout_and_sizes(model, family, first.prefix_sites)
        modules = layout.modules
    else:
        sizes = model_sizes(model)
        modules = family.attention_modules(model, sizes[0])
    num_layers, _, kv_heads, head_dim = sizes
    for i, module in enumerate(modules):
        own = getattr(module, "head_dim", head_dim)
        if own != head_dim:
            raise ValueError(f"layer {i}'s attention has head_dim {own}, the config says {head_dim}")
    param = next(model.parameters(), None)
    device = None if param is None else param.device
    if configs is None:
        encoder = _encoder(config, sizes, device)
    else:
        encoder = PrefixBank({name: _encoder(c, sizes, device) for name, c in configs.items()})
        config = next(iter(configs.values()))
    handle = PrefixHandle(model, config, family, encoder, modules, configs, layout)
    try:
        handle._install(modules)
        _initialise(handle, configs)
    except BaseException:
        handle.remove()
        raise
    return handle


def _initialise(handle: PrefixHandle, configs: dict[str, PrefixConfig] | None) -> None:
    """Each prefix's ``prefix_init`` (``"random"``: the encoder's own initialisation, nothing to do)."""
    from .init import init_prefix_from_tokens, init_prefix_zeros

    for name, config in (configs or {None: handle.config}).items():
        if handle.layout is not None and config.prefix_init not in ("random", "zeros"):
            raise ValueError(f"prefix_init from token ids is for decoder-only models (their cache holds the tokens' "
                             f"keys and values); {type(handle.model).__name__} is an encoder-decoder model: use "
                             '"random" or "zeros"')
        if config.prefix_init == "zeros":
            init_prefix_zeros(handle, prefix=name)
        elif config.prefix_init != "random":
            init_prefix_from_tokens(handle, list(config.prefix_init), prefix=name)

"""``apply_prefix_tuning`` and the handle that undoes it.

What applying does to a model, each step recorded with its exact undo (``remove()`` runs them in reverse):

1. freezes the model's parameters (optional) and swaps each task head to train (``modules_to_save``) for a
   trainable copy, so the model's own head stays as it was (for a prefix bank, a :class:`~.heads.RoutedHead`
   holding a copy per prefix);
2. adds the :class:`~prefix_kernels.PrefixEncoder` (or the :class:`~prefix_kernels.PrefixBank` of many) as the
   submodule ``prefix_encoder`` (``model.parameters()``, optimizers, ``state_dict`` and ``.to()`` see it);
3. points the model's configs at our attention implementation (registered once with transformers' attention and
   mask interfaces), remembering the previous one;
4. gives each self-attention module its own prefix slot (and, for a family whose attention is not on the
   interface, an instance-level forward);
5. hooks the module that consumes position ids, to shift them by P (PEFT's semantics), and the base model's
   forward, to compute the prefix once per forward;
6. lets ``generate()`` build masks inside the forward for static caches (an instance attribute).

No class, function or module-level name of transformers is replaced; everything lives on this model instance.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Mapping

import torch
from torch import nn

from ...modules import PrefixBank, PrefixEncoder
from . import registration
from .attention import SLOT_ATTR
from .config import PrefixConfig
from .families import Family, family_of, task_of
from .heads import RoutedHead
from .positions import ShiftPositions
from .state import PrefixSlot, PrefixState

ENCODER_NAME = "prefix_encoder"
HANDLE_ATTR = "_prefix_kernels_handle"


def _masks_from_forward(config, inputs_embeds, attention_mask, *args, **kwargs):
    """Stands in for transformers' ``create_masks_for_generate``: our masks are ``[B, Lk]``, cheap to build inside
    the forward, so ``generate()`` hands the 2D mask on unchanged instead of precomputing 4D ones."""
    return attention_mask


def _sizes(model: nn.Module) -> tuple[int, int, int, int]:
    """(num_layers, num_heads, num_kv_heads, head_dim) from the model's config."""
    config = model.config
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, heads, kv_heads, head_dim


def _find_modules(model: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Module]:
    """Modules whose qualified name is, or ends with ``.`` + , one of ``names`` (PEFT's matching); the outermost
    match wins."""
    found: dict[str, nn.Module] = {}
    for qualified, module in model.named_modules():
        if any(qualified.startswith(f + ".") for f in found):
            continue
        if any(qualified == n or qualified.endswith("." + n) for n in names):
            found[qualified] = module
    return found


class PrefixHandle:
    """The prefix tuning applied to one model. Returned by :func:`apply_prefix_tuning`.

    Attributes:
        model: the model.
        config: the :class:`PrefixConfig` (for a bank: the first prefix's; the fields that apply to the whole
            model, such as ``shift_positions``, ``backend`` and ``modules_to_save``, are the same for all).
        configs: name -> :class:`PrefixConfig` of each prefix.
        family: the :class:`~.families.Family` adapter that served it.
        prefix_encoder: the :class:`~prefix_kernels.PrefixEncoder` (also ``model.prefix_encoder``), or for many
            prefixes the :class:`~prefix_kernels.PrefixBank` holding one per prefix.
        modules_to_save: qualified name -> the trainable copy of each task head swapped into the model; for a bank,
            a :class:`~.heads.RoutedHead` holding one copy per prefix (see :meth:`modules_to_save_of`).
    """

    def __init__(self, model: nn.Module, config: PrefixConfig, family: Family, encoder: PrefixEncoder | PrefixBank,
                 modules: list[nn.Module], configs: dict[str, PrefixConfig] | None = None):
        self.model = model
        self.config = config
        self.configs = configs or {"default": config}
        self.family = family
        self.prefix_encoder = encoder
        self.modules_to_save: dict[str, nn.Module] = {}
        self.task_type: str | None = None
        self._undo: list = []
        self._configs: list = []  # (config, previous implementation)
        self.state = PrefixState(encoder, backend=config.backend, shift_positions=config.shift_positions,
                                 probe=modules[0], layer=family.layer_list(model)[0])

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
        """Choose each batch row's prefix for the following forwards (``generate()`` included), until changed or
        cleared with None.

        ``selection``: one entry per batch row: a ``[B]`` int tensor or a list of ints (bank positions, -1 for no
        prefix), prefix names, or None entries (no prefix: that row computes exactly what the base model
        computes). Where ``generate()`` repeats rows (``num_beams``, ``num_return_sequences``), the selection is
        repeated the same way. Without a selection a bank of several prefixes refuses to run; a single prefix
        serves every row.
        """
        self._require_active()
        self.state.select(selection)

    @contextlib.contextmanager
    def use_prefix(self, selection):
        """``with handle.use_prefix(["sst2", "qnli", None]):`` the selection of :meth:`set_prefix_index` inside the
        block, the previous one restored after."""
        self._require_active()
        previous = self.state.selection
        self.state.select(selection)
        try:
            yield self.model
        finally:
            self.state.select(previous)

    @property
    def active(self) -> bool:
        """False once :meth:`remove` ran."""
        return getattr(self.model, HANDLE_ATTR, None) is self

    def prefix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Every layer's prefix ``[num_layers, 2, num_kv_heads, P, head_dim]`` (keys at ``[:, 0]``); for a bank
        ``[num_layers, 2, N, num_kv_heads, Pmax, head_dim]``."""
        return self.prefix_encoder(dtype=dtype)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that require grad: the prefix encoder's and the saved modules' (and, when the base
        model was not frozen, the model's own)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def disabled(self):
        """Run the model without the prefix: its previous attention implementation, masks and positions, as before
        applying (the trainable copies of ``modules_to_save`` stay in place; a bank's per-prefix heads give way
        to the model's own)."""
        self._require_active()
        self.state.enabled = False
        for config, previous in self._configs:
            config._attn_implementation_internal = previous
        try:
            yield self.model
        finally:
            for config, _ in self._configs:
                config._attn_implementation_internal = registration.NAME
            self.state.enabled = True

    def remove(self) -> None:
        """Undo everything :func:`apply_prefix_tuning` did: the model is exactly as before (its parameters,
        ``requires_grad`` flags, modules, hooks, attributes and attention implementation). Idempotent."""
        while self._undo:
            self._undo.pop()()

    def print_trainable_parameters(self) -> None:
        """PEFT's "trainable params: X || all params: Y || trainable%: Z" for the model."""
        from .training import print_trainable_parameters

        print_trainable_parameters(self.model)

    def save_pretrained(self, directory) -> None:
        """The model's trained state (see :mod:`.checkpoint`); reload with ``prefix_kernels.from_pretrained``."""
        from .checkpoint import save_trained_state

        save_trained_state(self, directory)

    def save_peft_adapter(self, directory, prefix=None) -> None:
        """Write a PEFT prefix-tuning adapter directory (see :func:`prefix_kernels.save_peft_adapter`); for a bank,
        of the one ``prefix`` (a name or position)."""
        from ..peft import save_peft_adapter

        save_peft_adapter(self, directory, prefix=prefix)

    def save_peft_adapters(self, directory) -> dict[str, str]:
        """Write every prefix as its own PEFT adapter, in ``directory/<name>``; returns name -> directory."""
        import os

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
    def _require_active(self):
        if not self.active:
            raise RuntimeError("this prefix-tuning handle was removed")

    def _set_attr(self, obj, name: str, value) -> None:
        """Set an instance attribute, recording how to undo it exactly (restore or delete)."""
        had = name in obj.__dict__
        old = obj.__dict__.get(name)
        object.__setattr__(obj, name, value)

        def undo():
            if had:
                object.__setattr__(obj, name, old)
            else:
                object.__delattr__(obj, name)

        self._undo.append(undo)

    def _freeze(self) -> None:
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)

        def undo():
            for p, flag in flags:
                p.requires_grad_(flag)

        self._undo.append(undo)

    def _swap_in_trainable_copies(self, names: tuple[str, ...], required: bool) -> None:
        found = _find_modules(self.model, names)
        if required:
            missing = [n for n in names if not any(q == n or q.endswith("." + n) for q in found)]
            if missing:
                raise ValueError(f"modules_to_save {missing} match no module of {type(self.model).__name__}")
        for qualified, module in found.items():
            parent_name, _, attr = qualified.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            if self.state.is_bank:  # a head per prefix, routed per row
                copies = [copy.deepcopy(module).requires_grad_(True) for _ in range(self.num_prefixes)]
                trainable = RoutedHead(module, copies, self.state)
            else:
                trainable = copy.deepcopy(module)
                trainable.requires_grad_(True)
            parent._modules[attr] = trainable
            self.modules_to_save[qualified] = trainable
            self._undo.append(lambda parent=parent, attr=attr, module=module: parent._modules.__setitem__(attr, module))

    def _add_encoder(self) -> None:
        if hasattr(self.model, ENCODER_NAME):
            raise ValueError(f"{type(self.model).__name__} already has an attribute {ENCODER_NAME!r}")
        self.model.add_module(ENCODER_NAME, self.prefix_encoder)
        self._undo.append(lambda: self.model._modules.pop(ENCODER_NAME))

    def _switch_configs(self, modules: list[nn.Module]) -> dict[int, str]:
        configs = {}
        for owner in [self.model, self.model.base_model, *modules]:
            config = getattr(owner, "config", None)
            if config is not None:
                configs[id(config)] = config
        previous = {}
        for key, config in configs.items():
            previous[key] = registration.switch(config)
            self._configs.append((config, previous[key]))
            self._undo.append(lambda config=config: registration.restore(config))
        return previous

    def _install(self, modules: list[nn.Module]) -> None:
        config, model, family = self.config, self.model, self.family
        registration.register()
        self._set_attr(model, HANDLE_ATTR, self)
        if config.freeze_base_model:
            self._freeze()
        self.task_type, heads = task_of(model)
        if config.modules_to_save == "auto":
            self._swap_in_trainable_copies(heads, required=False)
        elif config.modules_to_save:
            self._swap_in_trainable_copies(config.modules_to_save, required=True)
        self._add_encoder()
        previous = self._switch_configs(modules)
        model_previous = previous[id(model.config)] or "eager"
        for index, module in enumerate(modules):
            if SLOT_ATTR in module.__dict__:
                raise ValueError(f"{type(module).__name__} already holds a prefix slot")
            own = getattr(module, "config", None)
            slot = PrefixSlot(self.state, index, (previous[id(own)] if own is not None else None) or model_previous)
            self._set_attr(module, SLOT_ATTR, slot)
            if family.alibi:  # made now, so that a compiled forward finds them and does not recompile
                slot.alibi_slopes(module.num_heads, self.state.probe_device())
            if family.forward is not None:
                self._set_attr(module, "forward", types.MethodType(family.forward, module))
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
            hook = target.register_forward_pre_hook(
                ShiftPositions(spec, first, self.state), with_kwargs=True)
            self._undo.append(hook.remove)
        self._undo.append(model.base_model.register_forward_pre_hook(self.state.begin_forward, with_kwargs=True).remove)
        self._undo.append(model.base_model.register_forward_hook(self._check_reached).remove)
        self._set_attr(model, "create_masks_for_generate", _masks_from_forward)
        from .checkpoint import install  # save_pretrained, print_trainable_parameters on the instance

        install(self)

    def _check_reached(self, module, args, output) -> None:
        if self.state.enabled and self.state.fetches == 0:
            raise RuntimeError(
                f"prefix tuning reached no attention layer of {type(self.model).__name__} in this forward: its "
                f"attention did not call the attention function {registration.NAME!r} (was the model's "
                "attention implementation changed after apply_prefix_tuning?)")


_MODEL_WIDE = ("shift_positions", "modules_to_save", "freeze_base_model", "backend")


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
    sizes = _sizes(model)
    num_layers, _, kv_heads, head_dim = sizes
    modules = family.attention_modules(model, num_layers)
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
    handle = PrefixHandle(model, config, family, encoder, modules, configs)
    try:
        handle._install(modules)
    except BaseException:
        handle.remove()
        raise
    return handle

"""The undo stack of one prefix-tuned model: every change applying makes, recorded as data with its exact undo.

Each record names what it changed by its path relative to the model (a submodule's qualified name, "" for the
model itself) and holds only plain values and the objects it replaced, never a closure over the model. A
``copy.deepcopy`` of the model therefore copies the records along with the model, and they undo the copy's own
changes; pickling the model pickles them too. :class:`Patches` applies a change and pushes its record;
:meth:`Patches.undo_all` runs the records in reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# Where nn.Module keeps its forward hooks (a hook id is a key of the first dict of its kind and of the others).
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@dataclass
class SetAttr:
    """Instance attribute ``name`` of the module at ``path`` was set; it held ``old`` before (when ``had``)."""

    path: str
    name: str
    had: bool
    old: object = None

    def undo(self, model: nn.Module) -> None:
        owner = model.get_submodule(self.path)
        if self.had:
            object.__setattr__(owner, self.name, self.old)
        else:
            owner.__dict__.pop(self.name, None)


@dataclass
class AddModule:
    """Submodule ``name`` was added to the module at ``path``."""

    path: str
    name: str

    def undo(self, model: nn.Module) -> None:
        model.get_submodule(self.path)._modules.pop(self.name, None)


@dataclass
class SwapModule:
    """Submodule ``name`` of the module at ``path`` was swapped for another; ``original`` goes back."""

    path: str
    name: str
    original: nn.Module

    def undo(self, model: nn.Module) -> None:
        model.get_submodule(self.path)._modules[self.name] = self.original


@dataclass
class AddHook:
    """A forward (pre-)hook with id ``hook_id`` was registered on the module at ``path``."""

    path: str
    hook_id: int

    def undo(self, model: nn.Module) -> None:
        owner = model.get_submodule(self.path)
        for name in _HOOK_DICTS:
            hooks = owner.__dict__.get(name)
            if hooks is not None:
                hooks.pop(self.hook_id, None)


@dataclass
class SwitchConfig:
    """The attention implementation of the config of the module at ``path`` was switched from ``previous``."""

    path: str
    previous: str | None

    def config(self, model: nn.Module):
        return model.get_submodule(self.path).config

    def undo(self, model: nn.Module) -> None:
        self.config(model)._attn_implementation_internal = self.previous


@dataclass
class RequiresGrad:
    """``requires_grad`` was changed; ``flags`` holds each parameter's previous flag by qualified name."""

    flags: dict[str, bool] = field(default_factory=dict)

    def undo(self, model: nn.Module) -> None:
        for name, flag in self.flags.items():
            model.get_parameter(name).requires_grad_(flag)


@dataclass
class ParameterValues:
    """Parameters were overwritten in place (an adapter's trained base-model parameters): ``old`` holds each one's
    previous value and ``requires_grad`` flag by qualified name."""

    old: dict[str, tuple] = field(default_factory=dict)

    def undo(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, (value, flag) in self.old.items():
                p = model.get_parameter(name)
                p.copy_(value)
                p.requires_grad_(flag)


class Patches:
    """The changes made to one model, in order (see the module docstring). The model is passed to each call, not
    kept, so that the stack stays valid for a copy of the model."""

    def __init__(self):
        self.records: list = []

    def __len__(self) -> int:
        return len(self.records)

    def set_attr(self, model: nn.Module, path: str, name: str, value) -> None:
        """Set instance attribute ``name`` of the module at ``path`` (bypassing nn.Module's registration)."""
        owner = model.get_submodule(path)
        self.records.append(SetAttr(path, name, name in owner.__dict__, owner.__dict__.get(name)))
        object.__setattr__(owner, name, value)

    def add_module(self, model: nn.Module, path: str, name: str, module: nn.Module) -> None:
        owner = model.get_submodule(path)
        if hasattr(owner, name):
            raise ValueError(f"{type(owner).__name__} already has an attribute {name!r}")
        owner.add_module(name, module)
        self.records.append(AddModule(path, name))

    def swap_module(self, model: nn.Module, qualified: str, module: nn.Module) -> None:
        """Put ``module`` in place of the submodule ``qualified``."""
        path, _, name = qualified.rpartition(".")
        owner = model.get_submodule(path)
        self.records.append(SwapModule(path, name, owner._modules[name]))
        owner._modules[name] = module

    def add_hook(self, model: nn.Module, path: str, hook, *, pre: bool, **options) -> None:
        """``register_forward_pre_hook`` (``pre``) or ``register_forward_hook`` on the module at ``path``."""
        owner = model.get_submodule(path)
        register = owner.register_forward_pre_hook if pre else owner.register_forward_hook
        self.records.append(AddHook(path, register(hook, **options).id))

    def switch_config(self, model: nn.Module, path: str, name: str) -> str | None:
        """Point the config of the module at ``path`` at attention implementation ``name``; returns the previous
        one."""
        config = model.get_submodule(path).config
        previous = config._attn_implementation_internal
        if previous == name:
            raise ValueError(f"the config {type(config).__name__} already serves prefix tuning (is it shared with "
                             "another prefix-tuned model? remove that model's handle first)")
        self.records.append(SwitchConfig(path, previous))
        config._attn_implementation_internal = name
        return previous

    def configs(self) -> list[SwitchConfig]:
        return [r for r in self.records if isinstance(r, SwitchConfig)]

    def freeze(self, model: nn.Module) -> None:
        """``requires_grad_(False)`` on every parameter."""
        record = RequiresGrad({name: p.requires_grad for name, p in model.named_parameters()})
        self.records.append(record)
        for p in model.parameters():
            p.requires_grad_(False)

    def write_parameters(self, model: nn.Module, values: dict) -> None:
        """Copy ``values`` (qualified name -> tensor) into the model's parameters, which then require grad; undo
        puts the previous values and flags back."""
        params = dict(model.named_parameters(remove_duplicate=False))
        record = ParameterValues()
        self.records.append(record)
        with torch.no_grad():
            for name, value in values.items():
                p = params[name]
                record.old[name] = (p.detach().clone(), p.requires_grad)
                p.copy_(value)
                p.requires_grad_(True)

    def undo_all(self, model: nn.Module) -> None:
        """Undo every change, last first. Idempotent."""
        while self.records:
            self.records.pop().undo(model)

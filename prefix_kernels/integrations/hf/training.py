"""What training code types on a prefix-tuned model: PEFT's ``print_trainable_parameters()`` and transformers'
activation (gradient) checkpointing switch under either of its names.

transformers 5.24 renamed ``gradient_checkpointing_enable`` / ``gradient_checkpointing_disable`` /
``is_gradient_checkpointing`` to ``activation_checkpointing_*`` (the old names still work and warn
FutureWarning); 5.17 has only the old ones. :func:`checkpointing_enable` and friends call the new name where the
model has it, else the old.
"""

from __future__ import annotations

from torch import nn


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter element counts of ``model``, each shared parameter counted once (the prefix
    encoder and the trained heads are part of the model while it is prefix-tuned)."""
    trainable = total = 0
    for p in model.parameters():  # deduplicated by nn.Module
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def trainable_parameters_line(model: nn.Module) -> str:
    """``"trainable params: X || all params: Y || trainable%: Z"``, PEFT's wording."""
    trainable, total = parameter_counts(model)
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"


def print_trainable_parameters(model_or_handle) -> None:
    """Print how many of the model's parameters train, as PEFT's ``print_trainable_parameters`` does; takes the
    model or its :class:`~prefix_kernels.PrefixHandle`."""
    model = getattr(model_or_handle, "model", model_or_handle)
    print(trainable_parameters_line(model))


def checkpointing_enable(model: nn.Module, **checkpoint_kwargs) -> None:
    """Turn on activation checkpointing: ``activation_checkpointing_enable`` (transformers >= 5.24), else
    ``gradient_checkpointing_enable``. ``checkpoint_kwargs`` go to ``torch.utils.checkpoint.checkpoint``
    (``use_reentrant=False`` is transformers' default, and what a prefix with a projection needs)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs or None)


def checkpointing_disable(model: nn.Module) -> None:
    """The undo of :func:`checkpointing_enable`, by the same rule."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def checkpointing_call_text(**kwargs) -> str:
    """How to call the checkpointing switch of the installed transformers, for error messages: e.g.
    ``activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})``."""
    import transformers

    new = hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable")
    name = "activation_checkpointing" if new else "gradient_checkpointing"
    args = f"{name}_kwargs={kwargs!r}" if kwargs else ""
    return f"{name}_enable({args})"

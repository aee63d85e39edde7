"""Reloading what :mod:`.checkpoint` saved: ``prefix_kernels.from_pretrained(ModelClass, directory)`` loads the base
model the directory records, applies the saved prefix configs and loads every trained tensor, checked (a missing
tensor, a key for nothing in the model or a shape mismatch raises, naming the file). A PEFT adapter directory loads
through :func:`~prefix_kernels.load_peft_adapter` by the same call."""

from __future__ import annotations

import os

import torch
from torch import nn

from .apply import PrefixHandle, apply_prefix_tuning
from .checkpoint import (
    ENCODER_NAME,
    HANDLE_ATTR,
    PK_CONFIG_NAME,
    WEIGHTS_NAME,
    _config_from_record,
    _model_record,
    _under,
    read_checkpoint,
)


def _base_model(model, directory: str, source: str | None, record: dict, kwargs: dict) -> nn.Module:
    if isinstance(model, nn.Module):
        if kwargs:
            raise TypeError(f"from_pretrained options {sorted(kwargs)} apply when loading a base model; a model "
                            "instance was given")
        return model
    if not hasattr(model, "from_pretrained"):
        raise TypeError(f"from_pretrained's first argument must be a transformers model class (an AutoModel* or a "
                        f"PreTrainedModel subclass) or a model instance, got {model!r}")
    source = source or record.get("base_model_name_or_path")
    if not source:
        raise ValueError(f"{directory!r} records no base model (the model was not loaded with from_pretrained when "
                         "it was saved): pass base_model='name or path of the base checkpoint', or a model instance")
    return model.from_pretrained(source, **kwargs)


def _check_model(record: dict, model: nn.Module, path: str) -> None:
    saved = record.get("model") or {}
    now = _model_record(model)
    for key in ("model_type", "num_layers", "num_kv_heads", "head_dim"):
        if key in saved and saved[key] != now[key]:
            raise ValueError(f"{path}: saved from a model with {key}={saved[key]!r}, but {now['class']} has "
                             f"{now[key]!r} (another base model?)")


def from_pretrained(model, directory, *, base_model: str | os.PathLike | None = None, is_trainable: bool = False,
                    **from_pretrained_kwargs) -> PrefixHandle:
    """Reload a prefix-tuned model saved with ``save_pretrained`` / ``trainer.save_model`` / a Trainer checkpoint
    (or a PEFT prefix-tuning adapter directory), with its trained prefix, heads and other trained parameters.

    ``handle = pk.from_pretrained(AutoModelForSequenceClassification, "out/checkpoint-500")`` then ``handle.model``.

    Args:
        model: the model class to load the base with (``AutoModelForCausalLM``, ``BertForSequenceClassification``,
            ...), or an already loaded base model (not prefix-tuned).
        directory: the saved directory.
        base_model: name or path of the base checkpoint (default: the one the directory records, which is the
            model's ``name_or_path`` when it was saved).
        is_trainable: leave what was trained requiring grad (to train on); default: all frozen (inference).
        **from_pretrained_kwargs: passed to ``model.from_pretrained`` (``dtype=``, ``device_map=``, ...).

    Returns:
        The :class:`~prefix_kernels.PrefixHandle`; the model is ``handle.model``.

    Raises:
        FileNotFoundError: ``directory`` holds neither a prefix_kernels checkpoint nor a PEFT adapter.
        ValueError: a damaged or mismatched checkpoint (another base model, trained tensors missing, keys for nothing
            in the model, shapes that differ); the message names the file.
    """
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    path = os.path.join(directory, PK_CONFIG_NAME)
    if not os.path.isfile(path):
        from ..peft import CONFIG_NAME as PEFT_CONFIG
        from ..peft import _read_config, load_peft_adapter

        peft_config = os.path.join(directory, PEFT_CONFIG)
        if os.path.isfile(peft_config):
            record = {"base_model_name_or_path": _read_config(peft_config).get("base_model_name_or_path")}
            base = _base_model(model, directory, base_model, record, from_pretrained_kwargs)
            return load_peft_adapter(base, directory, is_trainable=is_trainable)
        raise FileNotFoundError(f"{directory!r} holds neither {PK_CONFIG_NAME} (a prefix_kernels checkpoint) nor "
                                f"{PEFT_CONFIG} (a PEFT adapter)")
    record = read_checkpoint(directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{directory!r} has {PK_CONFIG_NAME} but no {WEIGHTS_NAME}")
    tensors = load_file(weights)
    base = _base_model(model, directory, base_model, record, from_pretrained_kwargs)
    if getattr(base, HANDLE_ATTR, None) is not None:
        raise ValueError(f"{type(base).__name__} is already prefix-tuned: pass the base model")
    _check_model(record, base, path)
    configs = {name: _config_from_record(c, path, name) for name, c in record["prefixes"].items()}
    handle = apply_prefix_tuning(base, configs if record.get("bank") else next(iter(configs.values())))
    try:
        _load_tensors(handle, tensors, weights, record)
        if not is_trainable:
            for p in handle.trainable_parameters():
                p.requires_grad_(False)
    except BaseException:
        handle.remove()
        raise
    return handle


def _load_tensors(handle: PrefixHandle, tensors: dict[str, torch.Tensor], weights: str, record: dict) -> None:
    from ..peft import _write_parameters

    model = handle.model
    saved_heads = record.get("modules_to_save")
    if saved_heads is not None and sorted(saved_heads) != sorted(handle.modules_to_save):
        raise ValueError(f"{weights}: trained with heads {saved_heads}, but applying its config to "
                         f"{type(model).__name__} gives {sorted(handle.modules_to_save)}")
    state = model.state_dict(keep_vars=True)
    roots = (ENCODER_NAME, *handle.modules_to_save)
    missing = [k for k in state if _under(k, roots) and k not in tensors]
    unexpected = sorted(k for k in tensors if k not in state)
    if missing or unexpected:
        found = "; ".join(f"{what} {keys}" for what, keys in (("missing", missing), ("for nothing in the model",
                                                                                     unexpected)) if keys)
        raise ValueError(f"{weights}: does not fit {type(model).__name__} prefix-tuned with its config: {found}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(f"{weights}: {key} has shape {tuple(value.shape)}, but {type(model).__name__} needs "
                             f"{tuple(state[key].shape)}")
    others = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, value in tensors.items():
            if _under(key, roots):
                state[key].copy_(value)
            elif key in params:
                others[key] = value
            else:
                raise ValueError(f"{weights}: {key} is a buffer outside the prefix encoder and the heads; only "
                                 "trained parameters are saved there")
    _write_parameters(handle, others)  # BitFit's biases: the model's own values come back on handle.remove()


def load_peft_adapter(model, directory, *, is_trainable: bool = False, backend: str = "auto") -> PrefixHandle:
    """Prefix-tune ``model`` with an adapter directory: one PEFT (or ``save_peft_adapter``) wrote, loaded as PEFT
    loads it (see :func:`prefix_kernels.integrations.peft.load_peft_adapter`), or the prefix_kernels checkpoint
    that ``save_peft_adapter`` writes for ``prefix_sites="paper"`` (PEFT has no layout for it), reloaded exactly
    with :func:`from_pretrained`."""
    from .. import peft

    folder = os.fspath(directory)
    if not os.path.isfile(os.path.join(folder, peft.CONFIG_NAME)) and os.path.isfile(
            os.path.join(folder, PK_CONFIG_NAME)):
        return from_pretrained(model, folder, is_trainable=is_trainable)
    return peft.load_peft_adapter(model, folder, is_trainable=is_trainable, backend=backend)

"""Checkpoints of a prefix-tuned model that hold what trained, and the one call that reloads them.

The rule. While a model is prefix-tuned, ``model.save_pretrained(dir)`` (an instance attribute set by
:func:`~prefix_kernels.apply_prefix_tuning`, removed by ``handle.remove()``) writes only its *trained state*: the
state of the prefix encoder (the table, or the embedding and the reparameterisation MLP, which PEFT's checkpoints
drop), of every head in ``modules_to_save``, and every other parameter that requires grad (BitFit's biases), under
their ``model.state_dict()`` names. The directory holds:

- ``model.safetensors``: that trained state (adapter-sized: kilobytes to megabytes, not the base model);
- ``prefix_kernels_config.json``: the format tag, each prefix's :class:`~prefix_kernels.PrefixConfig`, the heads,
  the saved keys, and the base model it was trained on (``base_model_name_or_path``, class, sizes);
- ``config.json``: the model's config, plus ``transformers_weights`` set to a sentence that is not a weights file
  name. transformers' ``from_pretrained`` (``AutoModel*`` or a model class) reads that field to find the weights
  and raises ``ValueError`` quoting it, so a plain reload stops with the message naming
  :func:`prefix_kernels.from_pretrained`, instead of giving a model without its trained prefix.

``Trainer`` saves checkpoints and final models through ``model.save_pretrained`` (``Trainer._save``), so its
checkpoints follow the rule. Its ``resume_from_checkpoint`` and ``load_best_model_at_end`` load
``model.safetensors`` themselves, with ``model.load_state_dict(state_dict, strict=False)``, into the model it
trains, which is prefix-tuned (``resume_from_checkpoint`` in a new run: build the base model, apply the same
:class:`~prefix_kernels.PrefixConfig`, then ``trainer.train(resume_from_checkpoint=...)``): every trained tensor is
restored exactly, and the frozen base keeps the weights it was built with (the same base checkpoint). Trainer
reports the keys a checkpoint lacks unless they are exactly ``model._keys_to_ignore_on_save``: while prefix-tuned,
that attribute is the live set of keys the rule leaves out, so a complete checkpoint loads quietly and one missing
a trained tensor is still reported. ``config.json`` is read by Trainer only for its version check.

Reloading: ``handle = pk.from_pretrained(AutoModelForSequenceClassification, "out/checkpoint-100")`` loads the base
from ``base_model_name_or_path`` recorded there (or ``base_model=``, or a model instance as first argument),
applies the saved configs and loads every saved tensor, checked: a trained tensor missing from the file, a key for
nothing in the model or a shape that differs raises, naming the file. A PEFT adapter directory
(``adapter_config.json``) loads through :func:`~prefix_kernels.load_peft_adapter` by the same call.

Not covered: ``from_pretrained(dir, config=some_config)`` skips ``config.json`` and so the guard; it loads the trained
tensors into a fresh model and reports the base weights as missing (transformers' load report).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import PrefixConfig
from .facts import ENCODER_NAME, HANDLE_ATTR
from .facts import model_sizes as _sizes
from .training import trainable_parameters_line

if TYPE_CHECKING:
    from .apply import PrefixHandle

FORMAT = "prefix_kernels.trained_state"
FORMAT_VERSION = 1
PK_CONFIG_NAME = "prefix_kernels_config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_CONFIG_NAME = "config.json"
GUARD_FIELD = "transformers_weights"
GUARD_TEXT = ("this directory holds a prefix_kernels prefix-tuning checkpoint (only the trained tensors, not the "
              "base model): reload it with prefix_kernels.from_pretrained(ModelClass, this_directory), which loads "
              "the base model it records and the trained prefix")


# ---------------------------------------------------------------------------------------------------- what is saved
def _under(name: str, roots) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def trained_keys(handle: PrefixHandle) -> list[str]:
    """The ``model.state_dict()`` keys a checkpoint of the prefix-tuned model holds: everything under the prefix
    encoder and the heads of ``modules_to_save``, and every other parameter that requires grad."""
    model = handle.model
    roots = (ENCODER_NAME, *handle.modules_to_save)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return [k for k, t in model.state_dict(keep_vars=True).items() if _under(k, roots) or id(t) in trainable]


class _LeftOutKeys:
    """``model._keys_to_ignore_on_save`` while prefix-tuned: the state-dict keys a checkpoint leaves out, computed
    when read (the trained set may change after applying, e.g. BitFit's biases set to train)."""

    def __init__(self, handle: PrefixHandle):
        self._handle = handle

    def _keys(self) -> list[str]:
        saved = set(trained_keys(self._handle))
        return [k for k in self._handle.model.state_dict() if k not in saved]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, key) -> bool:
        return key in self._keys()

    def __repr__(self) -> str:
        return f"<{len(self)} frozen keys prefix_kernels leaves out of checkpoints>"


def _config_record(config: PrefixConfig) -> dict:
    record = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        elif isinstance(value, tuple):
            value = list(value)
        record[field.name] = value
    return record


def _config_from_record(record: dict, path: str, name: str) -> PrefixConfig:
    if not isinstance(record, dict):
        raise ValueError(f"{path}: the config of prefix {name!r} is not an object")
    known = {f.name for f in dataclasses.fields(PrefixConfig)}
    unknown = sorted(set(record) - known)
    if unknown:
        raise ValueError(f"{path}: prefix {name!r} has settings this prefix_kernels does not know: {unknown} (saved by "
                         "a newer version?)")
    values = dict(record)
    if isinstance(values.get("modules_to_save"), list):
        values["modules_to_save"] = tuple(values["modules_to_save"])
    dtype = values.get("encoder_dtype")
    if dtype is not None:
        values["encoder_dtype"] = getattr(torch, dtype, None)
        if not isinstance(values["encoder_dtype"], torch.dtype):
            raise ValueError(f"{path}: prefix {name!r} has encoder_dtype={dtype!r}, not a torch dtype")
    try:
        return PrefixConfig(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: prefix {name!r}: {e}") from None


def _model_record(model: nn.Module) -> dict:
    layers, heads, kv_heads, head_dim = _sizes(model)
    return {"class": type(model).__name__, "model_type": getattr(model.config, "model_type", None),
            "num_layers": layers, "num_attention_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim}


# ---------------------------------------------------------------------------------------------------- saving
def _write_atomically(path: str, write) -> None:
    """``write(temporary_path)``, then rename it to ``path`` (atomic on one filesystem)."""
    directory, base = os.path.split(path)
    temporary = os.path.join(directory, f".{base}.saving-{secrets.token_hex(6)}")
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _write_json(path: str, data: dict) -> None:
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    _write_atomically(path, write)


def save_trained_state(handle: PrefixHandle, save_directory, *, state_dict: dict | None = None,
                       is_main_process: bool = True) -> list[str]:
    """Write the checkpoint the module docstring describes into ``save_directory`` (created if needed; other files
    there are kept, each of ours replaced atomically); returns the saved keys.

    ``state_dict``: the model's full state dict when the caller gathered it (Trainer under FSDP or DeepSpeed);
    only the trained keys are taken from it. ``is_main_process=False``: write nothing (Trainer's other ranks).
    """
    from safetensors.torch import save_file

    if not handle.active:
        raise RuntimeError("this prefix-tuning handle was removed; there is no prefix to save")
    keys = trained_keys(handle)
    if not is_main_process:
        return keys
    source = state_dict if state_dict is not None else handle.model.state_dict()
    absent = [k for k in keys if k not in source]
    if absent:
        raise ValueError(f"the state_dict passed to save_pretrained lacks trained tensors: {absent}")
    # clone: tied or shared tensors are saved once each (safetensors refuses shared storage); the copy is small
    tensors = {k: source[k].detach().to("cpu", copy=True).contiguous() for k in keys}
    directory = os.fspath(save_directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save_directory {directory!r} is an existing file, not a directory")
    os.makedirs(directory, exist_ok=True)
    model = handle.model
    _write_atomically(os.path.join(directory, WEIGHTS_NAME),
                      lambda path: save_file(tensors, path, metadata={"format": "pt", "saved_by": FORMAT}))
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "model": _model_record(model),
        "bank": handle.is_bank,
        "prefixes": {name: _config_record(c) for name, c in handle.configs.items()},
        "modules_to_save": list(handle.modules_to_save),
        "saved_keys": keys,
        "trainable_parameters": trainable_parameters_line(model),
    }
    _write_json(os.path.join(directory, PK_CONFIG_NAME), record)
    config = model.config.to_dict()
    config[GUARD_FIELD] = GUARD_TEXT
    config.pop("_attn_implementation_internal", None)
    _write_json(os.path.join(directory, MODEL_CONFIG_NAME), config)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(directory)
    return keys


def _save_pretrained(model, save_directory, is_main_process: bool = True, state_dict: dict | None = None,
                     push_to_hub: bool = False, **kwargs) -> None:
    """``save_pretrained`` of a prefix-tuned model: its trained state only (see
    :mod:`prefix_kernels.integrations.hf.checkpoint`); reload with ``prefix_kernels.from_pretrained``. transformers'
    other options (``safe_serialization``, ``max_shard_size``, ...) have nothing to do for a state this small."""
    if push_to_hub:
        raise NotImplementedError("save_pretrained(push_to_hub=True) of a prefix-tuned model: save to a directory, "
                                  "then upload it with huggingface_hub's upload_folder")
    save_trained_state(getattr(model, HANDLE_ATTR), save_directory, state_dict=state_dict,
                       is_main_process=is_main_process)


def _print_trainable_parameters(model) -> None:
    print(trainable_parameters_line(model))


def install(handle: PrefixHandle) -> None:
    """Give the prefix-tuned model its instance-level ``save_pretrained``, ``print_trainable_parameters`` and
    ``_keys_to_ignore_on_save`` (each undone exactly by ``handle.remove()``)."""
    model, patches = handle.model, handle.patches
    patches.set_attr(model, "", "save_pretrained", ModelMethod(_save_pretrained, model))
    patches.set_attr(model, "", "print_trainable_parameters", ModelMethod(_print_trainable_parameters, model))
    patches.set_attr(model, "", "_keys_to_ignore_on_save", _LeftOutKeys(handle))


class ModelMethod:
    """``func`` bound to ``model``, as an instance attribute that deep-copies with the model (the copy's is bound to
    the copy) and pickles (a module-level function and the model), which a bound method does not."""

    def __init__(self, func, model: nn.Module):
        self.func, self.model = func, model

    def __call__(self, *args, **kwargs):
        return self.func(self.model, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------- loading
def read_checkpoint(directory) -> dict:
    """The ``prefix_kernels_config.json`` of a checkpoint directory, checked to be ours."""
    path = os.path.join(os.fspath(directory), PK_CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: not a prefix_kernels checkpoint config (no format {FORMAT!r})")
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {record.get('format_version')!r}; this prefix_kernels reads "
                         f"{FORMAT_VERSION}")
    prefixes = record.get("prefixes")
    if not isinstance(prefixes, dict) or not prefixes:
        raise ValueError(f"{path}: no prefix configs ('prefixes')")
    return record

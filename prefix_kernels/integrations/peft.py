"""Read and write PEFT prefix-tuning adapter directories, without needing PEFT installed.

The format, as PEFT (0.21) writes it for ``PrefixTuningConfig``:

- ``adapter_config.json``: ``peft_type: "PREFIX_TUNING"``, ``task_type`` (SEQ_CLS, TOKEN_CLS, QUESTION_ANS,
  CAUSAL_LM, ...), ``num_virtual_tokens`` P, ``num_layers`` L, ``num_attention_heads`` (the model's *kv*
  heads), ``token_dim`` (kv heads x head dim), ``prefix_projection``, ``encoder_hidden_size``,
  ``num_transformer_submodules`` (1 for decoder-only and encoder-only models), ``inference_mode``,
  ``modules_to_save``.
- ``adapter_model.safetensors`` (or the older ``adapter_model.bin``): ``prompt_embeddings`` ``[P, 2 * L *
  token_dim]``, the prefix after the projection MLP, if any (PEFT saves the projected prefix, not the MLP), with
  per-token feature ``((l * 2 + kv) * heads + h) * head_dim + d``; and each module to save under
  ``base_model.<its qualified name>.<parameter>``.

A loaded adapter therefore holds the prefix as a table (``prefix_projection=False``), exactly as PEFT loads it
for inference.

Several adapters trained for one model load into one prefix bank (:func:`load_peft_adapters`), to be served in
one batch; each prefix of a bank saves back out as its own adapter (``save_peft_adapter(..., prefix=name)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from .hf.apply import HANDLE_ATTR, PrefixHandle, apply_prefix_tuning
from .hf.config import PrefixConfig
from .hf.facts import find_modules as _find_modules
from .hf.facts import model_sizes as _sizes

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PROMPT_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."


def read_peft_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter's config (a dict) and tensors, checked to be a prefix-tuning adapter."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory!r} holds no {CONFIG_NAME}: not a PEFT adapter directory")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{directory!r} holds a {config.get('peft_type')!r} adapter; only PREFIX_TUNING adapters "
                         "can be loaded")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{directory!r} was trained for an encoder-decoder model (num_transformer_submodules="
                         f"{config['num_transformer_submodules']}), which prefix_kernels does not serve")
    weights = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(weights):
        from safetensors.torch import load_file

        tensors = load_file(weights)
    elif os.path.isfile(os.path.join(directory, LEGACY_WEIGHTS_NAME)):
        tensors = torch.load(os.path.join(directory, LEGACY_WEIGHTS_NAME), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory!r} holds neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")
    if PROMPT_KEY not in tensors:
        raise ValueError(f"{directory!r}: the adapter weights have no {PROMPT_KEY!r} entry")
    return config, tensors


def _check_fits(model, config: dict, prompt: torch.Tensor, directory: str) -> int:
    layers, _, kv_heads, head_dim = _sizes(model)
    name = type(model).__name__
    expected = {"num_layers": layers, "num_attention_heads": kv_heads, "token_dim": kv_heads * head_dim}
    for key, value in expected.items():
        if config.get(key) is not None and config[key] != value:
            raise ValueError(f"adapter {directory!r} has {key}={config[key]}, but {name} needs {value} "
                             "(was it trained for another model?)")
    prefix_len = config.get("num_virtual_tokens")
    shape = (prefix_len, 2 * layers * kv_heads * head_dim)
    if tuple(prompt.shape) != shape:
        raise ValueError(f"adapter {directory!r}: {PROMPT_KEY} has shape {tuple(prompt.shape)}, {name} needs {shape}")
    return prefix_len


def load_peft_adapter(model, directory: str | os.PathLike, *, is_trainable: bool = False,
                      backend: str = "auto") -> PrefixHandle:
    """Prefix-tune ``model`` with an adapter directory that PEFT (or :func:`save_peft_adapter`) wrote.

    The prefix is loaded as a table (PEFT saves it after the projection), every position shifted by P as PEFT
    does, and each of the adapter's ``modules_to_save`` (the classifier head PEFT trains for sequence
    classification) is swapped into the model with its saved weights; ``handle.remove()`` puts the model's own
    modules back. With ``is_trainable=False`` (PEFT's default) nothing requires grad.

    Raises:
        FileNotFoundError: no adapter files in ``directory``.
        ValueError: not a prefix-tuning adapter, or one trained for a model of other sizes, or weights that do
            not fit the model's modules.
    """
    return _load(model, {None: directory}, is_trainable=is_trainable, backend=backend)


def load_peft_adapters(model, adapters, *, is_trainable: bool = False, backend: str = "auto") -> PrefixHandle:
    """Prefix-tune ``model`` with several PEFT adapter directories at once, as one prefix bank, to serve (or train)
    them in one batch: ``handle = load_peft_adapters(model, {"sst2": dir1, "qnli": dir2})``, then
    ``with handle.use_prefix(["sst2", "qnli", None, ...]):`` (one entry per batch row; None: the base model).

    ``adapters``: a mapping name -> directory (names without '.' or '/'), or a sequence of directories (named by
    their base names). The adapters may have different ``num_virtual_tokens``; each keeps its own
    ``modules_to_save`` (a classifier per task, of the model's shape), applied to its rows.
    """
    if not isinstance(adapters, Mapping):
        adapters = {os.path.basename(os.path.normpath(os.fspath(d))): d for d in adapters}
    if not adapters:
        raise ValueError("load_peft_adapters needs at least one adapter directory")
    return _load(model, dict(adapters), is_trainable=is_trainable, backend=backend)


def _load(model, adapters: dict, *, is_trainable: bool, backend: str) -> PrefixHandle:
    """Load ``adapters`` (name -> directory; the name None: a single prefix, not a bank)."""
    loaded = {}
    for name, directory in adapters.items():
        directory = os.fspath(directory)
        config, tensors = read_peft_adapter(directory)
        prefix_len = _check_fits(model, config, tensors[PROMPT_KEY], directory)
        loaded[name] = (directory, config, tensors, prefix_len)
    heads: list[str] = []
    for _, config, _, _ in loaded.values():
        for head in config.get("modules_to_save") or ():
            if head not in heads and _find_modules(model, (head,)):
                heads.append(head)
    configs = {name: PrefixConfig(num_virtual_tokens=prefix_len, prefix_projection=False,
                                  modules_to_save=tuple(heads), backend=backend)
               for name, (_, _, _, prefix_len) in loaded.items()}
    bank = list(configs) != [None]
    handle = apply_prefix_tuning(model, configs if bank else configs[None])
    try:
        for name, (directory, _, tensors, _) in loaded.items():
            used = {PROMPT_KEY}
            with torch.no_grad():
                handle.encoder_of(name).embedding.weight.copy_(tensors[PROMPT_KEY])
            for qualified, module in handle.modules_to_save_of(name).items():
                start = f"{HEAD_PREFIX}{qualified}."
                state = {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}
                if not state:
                    continue
                module.load_state_dict(state, strict=True)
                used.update(start + k for k in state)
            unused = sorted(set(tensors) - used)
            if unused:
                raise ValueError(f"adapter {directory!r} holds weights for no module of {type(model).__name__}: "
                                 f"{unused}")
        if not is_trainable:
            for p in handle.trainable_parameters():
                p.requires_grad_(False)
    except BaseException:
        handle.remove()
        raise
    return handle


def _handle_of(model_or_handle) -> PrefixHandle:
    if isinstance(model_or_handle, PrefixHandle):
        handle = model_or_handle
    else:
        handle = getattr(model_or_handle, HANDLE_ATTR, None)
        if handle is None:
            raise ValueError(f"{type(model_or_handle).__name__} is not prefix-tuned: call apply_prefix_tuning or "
                             "load_peft_adapter first")
    if not handle.active:
        raise ValueError("this prefix-tuning handle was removed; there is no adapter to save")
    return handle


def save_peft_adapter(model_or_handle, directory: str | os.PathLike, *, prefix: str | int | None = None) -> None:
    """Write the prefix (after the projection, as PEFT saves it) and the modules to save of a prefix-tuned model
    as a PEFT adapter directory, which ``PeftModel.from_pretrained`` and :func:`load_peft_adapter` load.

    ``prefix``: for a model holding a bank of prefixes, which one (its name or bank position); each prefix saves
    as its own adapter, with the shared ``modules_to_save`` (``handle.save_peft_adapters(dir)`` writes them all).
    """
    from safetensors.torch import save_file

    handle = _handle_of(model_or_handle)
    if handle.is_bank and prefix is None and handle.num_prefixes > 1:
        raise ValueError(f"this model holds {handle.num_prefixes} prefixes {list(handle.prefix_names)}: name the one "
                         "to save with prefix=, or save them all with handle.save_peft_adapters(directory)")
    encoder, model = handle.encoder_of(0 if prefix is None and handle.is_bank else prefix), handle.model
    was_training = encoder.training
    encoder.eval()  # no prefix dropout in what is saved
    try:
        with torch.no_grad():
            table = encoder()  # [L, 2, Hkv, P, D]
    finally:
        encoder.train(was_training)
    prefix_len = table.shape[3]
    tensors = {PROMPT_KEY: table.permute(3, 0, 1, 2, 4).reshape(prefix_len, -1).contiguous().cpu()}
    for qualified, module in handle.modules_to_save_of(prefix).items():
        for key, value in module.state_dict().items():
            tensors[f"{HEAD_PREFIX}{qualified}.{key}"] = value.detach().contiguous().cpu()
    layers, _, kv_heads, head_dim = _sizes(model)
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": handle.task_type,
        "num_virtual_tokens": prefix_len,
        "num_layers": layers,
        "num_attention_heads": kv_heads,
        "token_dim": kv_heads * head_dim,
        "num_transformer_submodules": 1,
        "prefix_projection": encoder.prefix_projection,
        "encoder_hidden_size": encoder.encoder_hidden_size,
        "inference_mode": True,
        "modules_to_save": list(handle.modules_to_save) or None,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "revision": None,
        "auto_mapping": None,
        "init_weights": None,
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})

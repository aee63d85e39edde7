"""Read and write PEFT prefix-tuning adapter directories, without needing PEFT installed.

The format, as PEFT (0.21) writes it for ``PrefixTuningConfig``:

- ``adapter_config.json``: ``peft_type: "PREFIX_TUNING"``, ``task_type`` (SEQ_CLS, TOKEN_CLS, QUESTION_ANS,
  CAUSAL_LM, ...), ``num_virtual_tokens`` P, ``num_layers`` L, ``num_attention_heads`` (the model's *kv*
  heads), ``token_dim`` (kv heads x head dim), ``prefix_projection``, ``encoder_hidden_size``,
  ``num_transformer_submodules`` (1 for decoder-only and encoder-only models, 2 for encoder-decoder models, whose
  prefix PEFT puts on the decoder's self-attention only), ``inference_mode``, ``modules_to_save``.
- ``adapter_model.safetensors`` (or the older ``adapter_model.bin``): ``prompt_embeddings`` ``[P, 2 * L *
  token_dim]``, the prefix after the projection MLP, if any (PEFT saves the projected prefix, not the MLP), with
  per-token feature ``((l * 2 + kv) * heads + h) * head_dim + d``; and each module to save under
  ``base_model.<its qualified name>.<parameter>``.

A loaded adapter therefore holds the prefix as a table (``prefix_projection=False``), exactly as PEFT loads it
for inference.

Other trained parameters. A model may train more than the prefix and its heads (BitFit trains the base model's
biases beside the prefix). :func:`save_peft_adapter` writes every parameter that requires grad, outside the
prefix encoder and the heads, under ``base_model.<its qualified name>`` too. PEFT (0.21.2,
``set_peft_model_state_dict``) loads an adapter with ``load_state_dict(strict=False)`` over the whole
``PeftModel``, whose ``base_model`` is the transformers model itself for prompt-learning methods, so it puts them
into its base model exactly where they were trained; :func:`load_peft_adapter` restores them too (and
``handle.remove()`` puts the model's own values back). A trained parameter that no adapter can hold (a bank's
fallback head, trained with the base model unfrozen) is named in a warning when saving.

What loading checks. The config is a JSON object with a positive ``num_virtual_tokens``; the sizes fit the model;
``prompt_embeddings`` has the shape they imply; every head the config lists in ``modules_to_save`` (and the
model has) comes with all its weights, of its shapes. Keys the adapter holds for nothing in the model raise:
PEFT tolerates them silently (``strict=False``), but a weight that loads into nothing is a trained weight lost
(or an adapter trained for another model), so they are named instead. Every error names the file and what is
wrong with it.

Saving is atomic: the adapter is written into a fresh directory beside the target, then renamed into place; an
existing adapter is replaced only once the new one is complete, so a failed write (a full disk) leaves it as it
was. Where the target directory holds other files too (a training checkpoint's), those stay, and the adapter's
two files are moved in one by one (each ``os.replace`` is atomic), the weights first.

Encoder-decoder models. A PEFT seq2seq adapter (``num_transformer_submodules=2``, ``SEQ_2_SEQ_LM``) loads with
``prefix_sites="peft"``: its ``num_layers`` layers are the decoder's, and the model then computes what PEFT
computes. A model prefix-tuned with ``prefix_sites="peft"`` saves back as such an adapter. PEFT has no layout for
the three sites of ``prefix_sites="paper"``: :func:`save_peft_adapter` then writes this library's checkpoint
(:func:`prefix_kernels.from_pretrained` and :func:`load_peft_adapter` reload it exactly; it holds no
``adapter_config.json``, so PEFT refuses it rather than misreading it) and warns that PEFT cannot load it.

Several adapters trained for one model load into one prefix bank (:func:`load_peft_adapters`), to be served in
one batch; each prefix of a bank saves back out as its own adapter (``save_peft_adapter(..., prefix=name)``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import secrets
import shutil
import warnings
from collections.abc import Mapping

import torch

from .hf.apply import PrefixHandle, apply_prefix_tuning
from .hf.config import PrefixConfig
from .hf.facts import ENCODER_NAME, HANDLE_ATTR
from .hf.facts import find_modules as _find_modules
from .hf.facts import model_sizes as _sizes

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PROMPT_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)


# ---------------------------------------------------------------------------------------------------- reading
@dataclasses.dataclass
class _Adapter:
    """One adapter directory as read: its config and tensors, and the paths errors name."""

    config_path: str
    weights_path: str
    config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def prefix_len(self) -> int:
        return self.config["num_virtual_tokens"]

    def lists(self, qualified: str) -> bool:
        """Whether the config's ``modules_to_save`` names the module ``qualified`` (PEFT's suffix matching)."""
        return any(qualified == n or qualified.endswith("." + n) for n in self.config.get("modules_to_save") or ())


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _json_kind(value) -> str:
    for kind, name in ((list, "list"), (str, "string"), (bool, "boolean"), ((int, float), "number")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); a PEFT adapter config is one JSON object") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: holds a JSON {_json_kind(config)}, not an object; a PEFT adapter config is one "
                         "JSON object of settings (peft_type, num_virtual_tokens, ...)")
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{path}: holds a {config.get('peft_type')!r} adapter; only PREFIX_TUNING adapters can be "
                         "loaded")
    if config.get("num_transformer_submodules", 1) not in (1, 2, None):
        raise ValueError(f"{path}: has num_transformer_submodules={config['num_transformer_submodules']!r}; PEFT "
                         "writes 1 (decoder-only and encoder-only models) or 2 (encoder-decoder models)")
    if not _is_count(config.get("num_virtual_tokens")):
        what = (f"num_virtual_tokens={config['num_virtual_tokens']!r}" if "num_virtual_tokens" in config
                else "no num_virtual_tokens")
        raise ValueError(f"{path}: has {what}; it must be a positive int, the prefix's length")
    for key in ("num_layers", "num_attention_heads", "token_dim"):
        if config.get(key) is not None and not _is_count(config[key]):
            raise ValueError(f"{path}: has {key}={config[key]!r}; it must be a positive int (or absent)")
    heads = config.get("modules_to_save")
    if heads is not None and not (isinstance(heads, list) and all(isinstance(h, str) for h in heads)):
        raise ValueError(f"{path}: has modules_to_save={heads!r}; it must be null or a list of module names")
    return config


def _unpickling_reason(error: Exception) -> str:
    """A short reason from torch.load's error, without its advice to load unsafely."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        return rest[0] if rest else ""
    first = text.split(". ", 1)[0].strip()
    return "" if "weights_only" in first else first


def _read_weights(directory: str) -> tuple[str, dict[str, torch.Tensor]]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file, corrupt or truncated ({e})") from None
    else:
        path = os.path.join(directory, LEGACY_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory!r} holds neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError,
                AttributeError, ImportError) as e:
            reason = _unpickling_reason(e)
            # from None: torch's own message advises loading with weights_only=False, which runs arbitrary code
            raise ValueError(f"{path}: not a readable PyTorch weights file: it is corrupt or truncated, or holds "
                             "objects other than tensors (adapter weights are loaded as plain tensors only)"
                             + (f" ({reason})" if reason else "")) from None
    if not isinstance(tensors, dict):
        raise ValueError(f"{path}: holds a {type(tensors).__name__}, not a mapping of names to tensors")
    odd = sorted(str(k) for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if odd:
        raise ValueError(f"{path}: entries that are not named tensors: {odd}")
    if PROMPT_KEY not in tensors:
        raise ValueError(f"{path}: no {PROMPT_KEY!r} entry (it holds {sorted(tensors)}): not a prefix-tuning "
                         "adapter's weights")
    return path, tensors


def _read(directory: str | os.PathLike) -> _Adapter:
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory!r} holds no {CONFIG_NAME}: not a PEFT adapter directory")
    config = _read_config(config_path)
    weights_path, tensors = _read_weights(directory)
    return _Adapter(config_path, weights_path, config, tensors)


def read_peft_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter's config (a dict) and tensors, checked to be a prefix-tuning adapter.

    Raises:
        FileNotFoundError: no adapter files in ``directory``.
        ValueError: a file that is not valid (bad JSON, a corrupt or truncated weights file, a config that is not
            an object or lacks ``num_virtual_tokens``, ...), or not a prefix-tuning adapter; the message names the
            file.
    """
    adapter = _read(directory)
    return adapter.config, adapter.tensors


def _seq2seq(adapter: _Adapter) -> bool:
    return adapter.config.get("num_transformer_submodules") == 2


def _prefix_sizes(model, seq2seq: bool, where: str) -> tuple[int, int, int, int]:
    """The sizes of PEFT's prefix for ``model``: for an encoder-decoder model, of its decoder's self-attention."""
    from .hf.families import family_of

    family = family_of(model)
    name = type(model).__name__
    if bool(family.sites) != seq2seq:
        kind = "an encoder-decoder" if seq2seq else "a decoder-only or encoder-only"
        raise ValueError(f"{where}: trained for {kind} model (num_transformer_submodules="
                         f"{2 if seq2seq else 1}), but {name} is {'not ' if seq2seq else ''}one")
    if not seq2seq:
        return _sizes(model)
    from .hf.seq2seq import layout_and_sizes

    return layout_and_sizes(model, family, "peft")[1]


def _check_fits(model, adapter: _Adapter) -> None:
    layers, _, kv_heads, head_dim = _prefix_sizes(model, _seq2seq(adapter), adapter.config_path)
    name = type(model).__name__
    expected = {"num_layers": layers, "num_attention_heads": kv_heads, "token_dim": kv_heads * head_dim}
    for key, value in expected.items():
        if adapter.config.get(key) is not None and adapter.config[key] != value:
            raise ValueError(f"{adapter.config_path}: has {key}={adapter.config[key]}, but {name} needs {value} "
                             "(was it trained for another model?)")
    prompt = adapter.tensors[PROMPT_KEY]
    shape = (adapter.prefix_len, 2 * layers * kv_heads * head_dim)
    if tuple(prompt.shape) != shape:
        raise ValueError(f"{adapter.weights_path}: {PROMPT_KEY} has shape {tuple(prompt.shape)}, but {name} with "
                         f"num_virtual_tokens={adapter.prefix_len} (from {CONFIG_NAME}) needs {shape}")
    if not prompt.is_floating_point():
        raise ValueError(f"{adapter.weights_path}: {PROMPT_KEY} holds {prompt.dtype}, not floating-point values")


# ---------------------------------------------------------------------------------------------------- loading
def load_peft_adapter(model, directory: str | os.PathLike, *, is_trainable: bool = False,
                      backend: str = "auto") -> PrefixHandle:
    """Prefix-tune ``model`` with an adapter directory that PEFT (or :func:`save_peft_adapter`) wrote.

    The prefix is loaded as a table (PEFT saves it after the projection), every position shifted by P as PEFT
    does, and each of the adapter's ``modules_to_save`` (the classifier head PEFT trains for sequence
    classification) is swapped into the model with its saved weights; other trained parameters the adapter holds
    (``base_model.<name>``, such as BitFit's biases) are written into the model. ``handle.remove()`` puts the
    model's own modules and values back. With ``is_trainable=False`` (PEFT's default) nothing requires grad;
    with True, what the adapter holds trains on.

    Raises:
        FileNotFoundError: no adapter files in ``directory``.
        ValueError: a damaged file, not a prefix-tuning adapter, one trained for a model of other sizes, a head of
            ``modules_to_save`` with missing or misshapen weights, or weights for nothing in the model; the message
            names the file and what is wrong.
    """
    # The public pk.load_peft_adapter (integrations/hf/reload.py) sends a prefix_kernels checkpoint -- what
    # save_peft_adapter writes for prefix_sites="paper" -- to from_pretrained before it comes here.
    return _load(model, {None: directory}, is_trainable=is_trainable, backend=backend)


def load_peft_adapters(model, adapters, *, is_trainable: bool = False, backend: str = "auto") -> PrefixHandle:
    """Prefix-tune ``model`` with several PEFT adapter directories at once, as one prefix bank, to serve (or train)
    them in one batch: ``handle = load_peft_adapters(model, {"sst2": dir1, "qnli": dir2})``, then
    ``with handle.use_prefix(["sst2", "qnli", None, ...]):`` (one entry per batch row; None: the base model).

    ``adapters``: a mapping name -> directory (names without '.' or '/'), or a sequence of directories (named by
    their base names). The adapters may have different ``num_virtual_tokens``; each keeps its own
    ``modules_to_save`` (a classifier per task, of the model's shape), applied to its rows. Trained base-model
    parameters (BitFit's biases) are shared by every row, so the adapters must hold the same ones, as the
    adapters of one bank saved by ``handle.save_peft_adapters`` do (rows without a prefix then see them too, as
    in training); adapters holding different ones raise.
    """
    if not isinstance(adapters, Mapping):
        adapters = {os.path.basename(os.path.normpath(os.fspath(d))): d for d in adapters}
    if not adapters:
        raise ValueError("load_peft_adapters needs at least one adapter directory")
    return _load(model, dict(adapters), is_trainable=is_trainable, backend=backend)


def _outside(name: str, roots) -> bool:
    return not any(name == r or name.startswith(r + ".") for r in roots)


def _load_head(adapter: _Adapter, qualified: str, module: torch.nn.Module) -> set[str]:
    """Load one head of ``modules_to_save`` from the adapter, checked complete; the keys used."""
    start = f"{HEAD_PREFIX}{qualified}."
    present = {k[len(start):]: v for k, v in adapter.tensors.items() if k.startswith(start)}
    if not present and not adapter.lists(qualified):
        return set()  # this adapter did not train this head (another of the bank did): the model's own stays
    expected = module.state_dict()
    missing = sorted(start + k for k in expected if k not in present)
    unexpected = sorted(start + k for k in present if k not in expected)
    if missing or unexpected:
        found = "; ".join(f"{what} {keys}" for what, keys in (("missing", missing), ("unexpected", unexpected))
                          if keys)
        raise ValueError(f"{adapter.weights_path}: the weights of {qualified!r} (a module to save, as "
                         f"{os.path.basename(adapter.config_path)} lists) do not fit its {type(module).__name__}: "
                         f"{found}")
    for key, value in present.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{adapter.weights_path}: {start + key} has shape {tuple(value.shape)}, but "
                             f"{qualified!r} ({type(module).__name__}) needs {tuple(expected[key].shape)}")
    module.load_state_dict(present, strict=True)
    return {start + k for k in present}


def _other_parameters(adapter: _Adapter, used: set[str], own: dict[str, torch.nn.Parameter],
                      model_name: str) -> dict[str, torch.Tensor]:
    """The adapter's trained base-model parameters (qualified name -> value), checked against the model; every
    key left over raises."""
    found, unexpected = {}, []
    for key in sorted(set(adapter.tensors) - used):
        name = key[len(HEAD_PREFIX):] if key.startswith(HEAD_PREFIX) else None
        if name not in own:
            unexpected.append(key)
            continue
        value = adapter.tensors[key]
        if tuple(value.shape) != tuple(own[name].shape):
            raise ValueError(f"{adapter.weights_path}: {key} has shape {tuple(value.shape)}, but {model_name}'s "
                             f"parameter {name} has {tuple(own[name].shape)}")
        found[name] = value
    if unexpected:
        raise ValueError(f"{adapter.weights_path}: holds weights for nothing in {model_name}: {unexpected} (PEFT "
                         "would skip them; here they raise, since a trained weight would be lost: was the adapter "
                         "trained for another model or head?)")
    return found


def _shared_parameters(loaded: dict, found: dict) -> dict[str, torch.Tensor]:
    """The trained base-model parameters of all the adapters, which must agree when they form a bank."""
    names = list(found)
    first = found[names[0]]
    for name in names[1:]:
        other = found[name]
        same = set(other) == set(first) and all(torch.equal(other[k], first[k]) for k in first)
        if not same:
            differ = sorted(set(first) ^ set(other) | {k for k in set(first) & set(other)
                                                       if not torch.equal(first[k], other[k])})
            raise ValueError(f"{loaded[names[0]].weights_path} and {loaded[name].weights_path} hold different trained "
                             f"base-model parameters ({differ}); the prefixes of one bank share the base model, so "
                             "their adapters load together only when they hold the same (as the adapters of a bank "
                             "saved with save_peft_adapters do): load each with load_peft_adapter instead")
    return first


def _write_parameters(handle: PrefixHandle, values: dict[str, torch.Tensor]) -> None:
    """Copy trained values into the model's own parameters, the old values put back on ``handle.remove()`` (a data
    record on the handle's undo stack, so a copy or a pickle of the model undoes its own)."""
    if values:
        handle.patches.write_parameters(handle.model, values)


def _load(model, adapters: dict, *, is_trainable: bool, backend: str) -> PrefixHandle:
    """Load ``adapters`` (name -> directory; the name None: a single prefix, not a bank)."""
    loaded = {}
    for name, directory in adapters.items():
        loaded[name] = _read(directory)
        _check_fits(model, loaded[name])
    heads: list[str] = []
    for adapter in loaded.values():
        for head in adapter.config.get("modules_to_save") or ():
            if head not in heads and _find_modules(model, (head,)):
                heads.append(head)
    kinds = {_seq2seq(adapter) for adapter in loaded.values()}
    if len(kinds) > 1:
        raise ValueError("these adapters mix encoder-decoder and other models' adapters; one bank serves one model")
    sites = "peft" if kinds.pop() else None
    configs = {name: PrefixConfig(num_virtual_tokens=adapter.prefix_len, prefix_projection=False,
                                  modules_to_save=tuple(heads), backend=backend, prefix_sites=sites)
               for name, adapter in loaded.items()}
    bank = list(configs) != [None]
    handle = apply_prefix_tuning(model, configs if bank else configs[None])
    try:
        roots = (ENCODER_NAME, *handle.modules_to_save)
        own = {n: p for n, p in model.named_parameters(remove_duplicate=False) if _outside(n, roots)}
        found = {}
        for name, adapter in loaded.items():
            used = {PROMPT_KEY}
            with torch.no_grad():
                handle.encoder_of(name).embedding.weight.copy_(adapter.tensors[PROMPT_KEY])
            for qualified, module in handle.modules_to_save_of(name).items():
                used |= _load_head(adapter, qualified, module)
            found[name] = _other_parameters(adapter, used, own, type(model).__name__)
        _write_parameters(handle, _shared_parameters(loaded, found))
        if not is_trainable:
            for p in handle.trainable_parameters():
                p.requires_grad_(False)
    except BaseException:
        handle.remove()
        raise
    return handle


# ---------------------------------------------------------------------------------------------------- saving
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


def _trained_elsewhere(handle: PrefixHandle) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The trainable parameters outside the prefix encoder and the heads (saved as ``base_model.<name>``), and the
    names of trainable parameters inside the heads that no prefix's adapter holds (not saved)."""
    heads = tuple(handle.modules_to_save)
    held = {id(p) for i in range(handle.num_prefixes) for m in handle.modules_to_save_of(i).values()
            for p in m.parameters()}
    others, dropped = {}, []
    for name, p in handle.model.named_parameters():
        if not p.requires_grad or not _outside(name, (ENCODER_NAME,)):
            continue  # the prefix encoders save as their tables, each prefix of a bank in its own adapter
        if _outside(name, heads):
            others[f"{HEAD_PREFIX}{name}"] = p.detach().contiguous().cpu()
        elif id(p) not in held:
            dropped.append(name)
    return others, dropped


def save_peft_adapter(model_or_handle, directory: str | os.PathLike, *, prefix: str | int | None = None) -> None:
    """Write the prefix (after the projection, as PEFT saves it), the modules to save and every other trained
    parameter of a prefix-tuned model as a PEFT adapter directory, which ``PeftModel.from_pretrained`` and
    :func:`load_peft_adapter` load. The write is atomic: into a fresh directory beside ``directory``, renamed into
    place once complete (an existing adapter there is replaced only then; other files there are kept).

    ``prefix``: for a model holding a bank of prefixes, which one (its name or bank position); each prefix saves
    as its own adapter, with the shared ``modules_to_save`` (``handle.save_peft_adapters(dir)`` writes them all).

    Warns (UserWarning), naming each, about trained parameters that no adapter can hold (a bank's fallback head
    for rows without a prefix, when the base model trains too).

    Raises:
        ValueError: ``model_or_handle`` is not prefix-tuned, the prefix is not named for a bank, or ``directory``
            is an existing file.
        OSError: the write failed (the previous adapter in ``directory``, if any, is untouched).
    """
    handle = _handle_of(model_or_handle)
    layout = handle.layout
    if layout is not None and set(layout.spans) != {"decoder"}:
        if handle.is_bank and handle.num_prefixes > 1:
            raise ValueError(f"this {type(handle.model).__name__} holds a bank of prefixes on the sites "
                             f"{list(layout.spans)} (prefix_sites='paper'), which PEFT cannot hold: save the bank with "
                             "handle.save_pretrained(directory) and reload it with prefix_kernels.from_pretrained")
        warnings.warn(f"save_peft_adapter: {type(handle.model).__name__} has prefixes on the sites "
                      f"{list(layout.spans)} (prefix_sites='paper'); PEFT puts a seq2seq prefix on the decoder's "
                      "self-attention only and has no layout for these, so this writes prefix_kernels' checkpoint "
                      f"into {os.fspath(directory)!r} (no adapter_config.json: PEFT cannot load it), which "
                      "prefix_kernels.from_pretrained and load_peft_adapter reload exactly", UserWarning, stacklevel=2)
        from .hf.checkpoint import save_trained_state

        save_trained_state(handle, directory)
        return
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
    others, dropped = _trained_elsewhere(handle)
    tensors.update(others)
    if dropped:
        warnings.warn(f"save_peft_adapter: {len(dropped)} trained parameters are in no adapter and are not saved: "
                      f"{dropped} (a bank's own copy of a head, used by rows without a prefix, trained because the "
                      "base model is not frozen; save it with the model's state_dict)", UserWarning, stacklevel=2)
    layers, _, kv_heads, head_dim = _prefix_sizes(model, layout is not None, type(model).__name__)
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": handle.task_type,
        "num_virtual_tokens": prefix_len,
        "num_layers": layers,
        "num_attention_heads": kv_heads,
        "token_dim": kv_heads * head_dim,
        "num_transformer_submodules": 1 if layout is None else 2,
        "prefix_projection": encoder.prefix_projection,
        "encoder_hidden_size": encoder.encoder_hidden_size,
        "inference_mode": True,
        "modules_to_save": list(handle.modules_to_save) or None,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "revision": None,
        "auto_mapping": None,
        "init_weights": None,
    }
    _write_adapter(os.fspath(directory), config, tensors)


def _fresh_directory(parent: str, stem: str) -> str:
    """A new, empty directory in ``parent`` (made with the process's umask, as ``os.makedirs`` would)."""
    while True:
        path = os.path.join(parent, f"{stem}{secrets.token_hex(6)}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _write_adapter(directory: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors import torch as safetensors_torch

    target = os.path.realpath(directory)  # through a symlink: the directory it names is replaced, the link kept
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"{directory!r} is not a directory (an existing file): an adapter is a directory")
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = _fresh_directory(parent, f".{base}.saving-")
    try:
        weights = os.path.join(staging, WEIGHTS_NAME)
        safetensors_torch.save_file(tensors, weights, metadata={"format": "pt"})
        with open(weights, "rb+") as f:
            os.fsync(f.fileno())
        with open(os.path.join(staging, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(staging, target)
    finally:
        if os.path.isdir(staging):  # only when something failed: the new adapter never reached the target
            shutil.rmtree(staging)


def _move_into_place(staging: str, target: str) -> None:
    if not os.path.exists(target):
        os.rename(staging, target)  # atomic: the adapter appears complete or not at all
        return
    if set(os.listdir(target)) <= set(ADAPTER_FILES):  # only an adapter: swap the directories
        parent, base = os.path.split(target)
        old = os.path.join(parent, f".{base}.replaced-{secrets.token_hex(6)}")
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old)
        return
    # other files live there (a checkpoint's): keep them, and replace the adapter's files, each atomically
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        os.replace(os.path.join(staging, name), os.path.join(target, name))
    os.rmdir(staging)

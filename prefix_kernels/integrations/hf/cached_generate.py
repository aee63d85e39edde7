"""``generate()`` on a CPU with the prefix held in the KV cache, where that is cheaper and computes the same thing.

On a CPU the torch backend serves a decode step by joining the prefix to the cache (``cat([prefix, cache])`` of
every layer's keys and values) and calling SDPA: two more copies of ``[B, Hkv, P + L, D]`` per layer per token,
beside the one transformers already makes when ``DynamicLayer.update`` appends the new token. With the prefix in
front of the cache that one copy carries it, and a decode step is the model's own attention call over ``P + L``
keys. So for a plain decoder-only ``generate()`` on a CPU, :func:`prepare` fills a ``DynamicCache`` with the
prefix (each row's copy of the one shared prefix), prepends P ones to the attention mask and returns the new
arguments; for the length of the call the thread's forwards then run the model's previous attention
implementation (``PrefixState.prefix_in_cache``): no position shift (transformers counts the P cached slots, so
the first real token is at P, as the shift would put it), no prefix fetch, the previous implementation's masks.
This is PEFT's layout and computes what the fused path computes (the tests compare the two on every decoder
family, with padding and sampling).

It is declined (the fused path serves, and :func:`prepare` records why in ``state.generate_reasons``) for
anything whose meaning would change or that it was not tested on: a GPU (where the Triton decode kernel reads
the prefix once for the whole batch), a bank or row selection, ``shift_positions=False``, prefix dropout in
training mode, inside ``handle.disabled()``, encoder-decoder models, a cache the caller passes, cache layers other than
the plain ``DynamicLayer`` (sliding windows keep the prefix in the window), beams or several sequences per
prompt, a returned dict (its ``past_key_values`` would hold the prefix), attention outputs, no 2D attention
mask, ``inputs_embeds``, and any ``generate()`` argument not in :data:`PLAIN_ARGUMENTS`.
``PREFIX_KERNELS_GENERATE_CACHE=0`` turns it off.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch

ENV = "PREFIX_KERNELS_GENERATE_CACHE"

# generate() arguments whose meaning the prefix in the cache does not change (they read or limit the token ids)
PLAIN_ARGUMENTS = frozenset({
    "input_ids", "inputs", "attention_mask", "max_new_tokens", "max_length", "min_new_tokens", "min_length",
    "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
    "forced_bos_token_id", "forced_eos_token_id", "renormalize_logits", "pad_token_id", "eos_token_id",
    "bos_token_id", "logits_processor", "stopping_criteria", "streamer", "use_cache", "num_beams",
    "num_return_sequences", "return_dict_in_generate", "output_attentions", "output_scores", "output_logits",
    "output_hidden_states", "stop_strings", "tokenizer", "max_time"})

# generation-config fields that must hold their plain value (field -> the values allowed)
_PLAIN_CONFIG = {"num_beams": (None, 1), "num_return_sequences": (None, 1), "return_dict_in_generate": (None, False),
                 "output_attentions": (None, False), "use_cache": (None, True),
                 "cache_implementation": (None, "dynamic"), "penalty_alpha": (None,),
                 "prompt_lookup_num_tokens": (None,), "assistant_early_exit": (None,)}


@functools.lru_cache(maxsize=64)
def _cache_argument(model_class: type) -> str:
    """The name generate() takes a cache by: ``cache`` from transformers 5.24 (``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _setting(model, kwargs: dict, name: str):
    if name in kwargs:
        return kwargs[name]
    return getattr(getattr(model, "generation_config", None), name, None)


def reasons(model, state, family, args: tuple, kwargs: dict) -> list[str]:
    """Why this ``generate()`` call keeps the fused path (empty: the prefix goes in the cache)."""
    why = []
    if os.environ.get(ENV, "").strip() == "0":
        why.append(f"{ENV}=0")
    if not state.enabled:
        why.append("inside handle.disabled()")
    if family.sites:
        why.append("an encoder-decoder model")
    if state.is_bank or state.current_selection() is not None:
        why.append("a prefix bank or a row selection")
    if not state.shift_positions:
        why.append("shift_positions=False")
    if state.encoder.training and getattr(state.encoder, "prefix_dropout", 0) > 0:
        why.append("prefix dropout in training mode (a new mask per forward)")
    weight = state._probe_weight()
    if weight is None or weight.device.type != "cpu":
        why.append("not on a CPU")
    elif torch.is_autocast_enabled("cpu"):
        why.append("under autocast")
    extra = sorted(set(kwargs) - PLAIN_ARGUMENTS)
    if extra:
        why.append(f"generate() arguments {extra}")
    if len(args) > 1:
        why.append("positional arguments past the inputs")
    for name, allowed in _PLAIN_CONFIG.items():
        value = _setting(model, kwargs, name)
        if value not in allowed:
            why.append(f"{name}={value!r}")
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    mask = kwargs.get("attention_mask")
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()):
        why.append("no 2D input_ids")
    elif not (isinstance(mask, torch.Tensor) and mask.shape == ids.shape and mask.device == ids.device):
        why.append("no 2D attention_mask of the input_ids' shape")
    return why


def prepare(model, state, family, args: tuple, kwargs: dict) -> dict | None:
    """The keyword arguments of a ``generate()`` call with the prefix in a new ``DynamicCache`` and P ones in
    front of the attention mask, or None (the reasons in ``state.generate_reasons``)."""
    why = reasons(model, state, family, args, kwargs)
    if not why:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        mask = kwargs["attention_mask"]
        weight = state._probe_weight()
        with torch.no_grad():
            prefix = state.encoder(dtype=weight.dtype)  # [layers, 2, Hkv, P, D]
        cache = DynamicCache(config=model.config)
        layers = getattr(cache, "layers", None)
        if (prefix.dim() != 5 or not isinstance(layers, list) or len(layers) != prefix.shape[0]
                or any(type(layer) is not DynamicLayer for layer in layers)):
            why.append("cache layers other than DynamicLayer (a sliding window, a hybrid cache)")
        else:
            batch = ids.shape[0]
            for i in range(prefix.shape[0]):
                k, v = prefix[i, 0], prefix[i, 1]
                cache.update(k.expand(batch, *k.shape), v.expand(batch, *v.shape), i)
            kwargs = {name: value for name, value in kwargs.items() if name not in ("input_ids", "inputs")}
            kwargs["input_ids"] = ids
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, prefix.shape[-2]), mask], dim=1)
            kwargs[_cache_argument(type(model))] = cache
    state.generate_reasons = why
    return None if why else kwargs

"""Initialising a prefix: zeros, or the keys and values of real tokens.

PEFT's comparison on MetaMathQA (PEFT #3128, Llama-3.2-3B) measured 18.6% accuracy for a randomly initialised
prefix, 35.8% for a zero one and 41.6% for one initialised from real tokens' keys and values.

- :func:`init_prefix_from_tokens`: run the frozen base model (the prefix switched off) once on P token ids, take
  every layer's keys and values from its cache, and write them into the prefix table. With
  ``shift_positions=True`` (the default) the real tokens' positions start at P, so the prefix-tuned model then
  computes exactly what the base model computes with those P tokens in front of the input, in its cache (RoPE
  keys included: they were rotated at positions 0..P-1). Needs a model that returns its key/value cache (the
  decoder families); encoder-only models (BERT, RoBERTa) return none and are refused. A prefix with a projection
  (``prefix_projection=True``) is an MLP of its embedding and cannot be set to given keys and values exactly: it is
  refused (train the table, or use zeros).
- :func:`init_prefix_zeros`: keys and values of zero (the table, or, with a projection, the MLP's last layer's
  weight and bias, so the MLP outputs zeros and learns from there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # apply.py runs these functions for PrefixConfig.prefix_init: no import back at run time
    from .apply import PrefixHandle


def _encoder(handle: PrefixHandle, prefix):
    if not (hasattr(handle, "encoder_of") and hasattr(handle, "patches")):
        raise TypeError(f"pass the PrefixHandle that apply_prefix_tuning returned, got {type(handle).__name__}")
    handle._require_active()
    return handle.encoder_of(prefix)


def _token_ids(input_ids, length: int, device) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be one sequence of token ids ([P] or [1, P] integers), got {ids.dtype} of "
                         f"shape {tuple(ids.shape)}")
    if ids.numel() != length:
        raise ValueError(f"input_ids has {ids.numel()} tokens, but the prefix has num_virtual_tokens={length}: give "
                         "exactly one token per prefix position")
    return ids.to(device=device, dtype=torch.long)[None]


def _layer_kv(cache, layer: int):
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    return cache[layer][0], cache[layer][1]


def token_prefix(handle: PrefixHandle, input_ids: torch.Tensor) -> torch.Tensor:
    """The base model's keys and values of ``input_ids`` (``[P]`` token ids at positions 0..P-1), every layer, in
    the prefix layout ``[num_layers, 2, num_kv_heads, P, head_dim]`` (fp32)."""
    encoder = handle.encoder_of(0 if handle.is_bank else None)  # the layers' sizes, the same for every prefix
    model = handle.model
    ids = input_ids.to(next(model.parameters()).device)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), handle.disabled():
            out = model.base_model(input_ids=ids, use_cache=True)
    finally:
        model.train(was_training)
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise ValueError(f"{type(model).__name__} returns no key/value cache (an encoder-only model), so its tokens' "
                         "keys and values cannot be read: use init_prefix_zeros, or keep the random init")
    layers = []
    for layer in range(encoder.num_layers):
        keys, values = _layer_kv(cache, layer)
        expected = (1, encoder.num_kv_heads, ids.shape[1], encoder.head_dim)
        if tuple(keys.shape) != expected or tuple(values.shape) != expected:
            raise ValueError(f"layer {layer}'s cache holds keys {tuple(keys.shape)} and values {tuple(values.shape)}, "
                             f"not {expected} (a sliding window shorter than the prefix?)")
        layers.append(torch.stack([keys[0], values[0]]).float())
    return torch.stack(layers)


def init_prefix_from_tokens(handle: PrefixHandle, input_ids, *, prefix: str | int | None = None) -> None:
    """Set the prefix to the keys and values the frozen base model computes for ``input_ids`` (P token ids, e.g.
    ``tokenizer(text, add_special_tokens=False).input_ids`` of a task description), in every layer.

    Args:
        handle: from :func:`~prefix_kernels.apply_prefix_tuning`.
        input_ids: ``[P]`` or ``[1, P]`` token ids, P = the prefix's ``num_virtual_tokens``.
        prefix: for a bank, which prefix (a name or position).

    Raises:
        ValueError: the prefix has a projection, the model returns no cache (encoder-only), or the ids do not fit.
    """
    encoder = _encoder(handle, prefix)
    if encoder.prefix_projection:
        raise ValueError("init_prefix_from_tokens: this prefix has prefix_projection=True, an MLP of its embedding, "
                         "which cannot be set to given keys and values exactly; apply with prefix_projection=False "
                         "(a table) to start from tokens, or use init_prefix_zeros")
    ids = _token_ids(input_ids, encoder.num_virtual_tokens, "cpu")[0]
    table = token_prefix(handle, ids)  # [L, 2, Hkv, P, D]
    weight = encoder.embedding.weight
    with torch.no_grad():
        weight.copy_(table.permute(3, 0, 1, 2, 4).reshape(weight.shape[0], -1))


def init_prefix_zeros(handle: PrefixHandle, *, prefix: str | int | None = None) -> None:
    """Set the prefix's keys and values to zero (the table; with a projection, the MLP's output layer)."""
    encoder = _encoder(handle, prefix)
    with torch.no_grad():
        if encoder.prefix_projection:
            encoder.transform[2].weight.zero_()
            encoder.transform[2].bias.zero_()
        else:
            encoder.embedding.weight.zero_()

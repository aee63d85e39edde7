"""The eager model-level reference: a prefix injected PEFT's way.

The same transformers model (typically a copy loaded with ``attn_implementation="eager"``), run with the prefix in
a ``DynamicCache`` (one copy per batch row), P ones prepended to the attention mask, and explicit position ids
shifted by P, as PEFT's ``get_prompt`` / ``prepare_inputs_for_generation`` do. This is the truth the integration
is tested against, and the baseline the demo times; it is written for clarity, not speed.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def cache_keyword(model: nn.Module) -> str:
    """The name under which this transformers version's models take a cache ("cache" from 5.24 on, before that
    "past_key_values"; 5.24 still accepts the old name with a deprecation warning)."""
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefix_cache(model: nn.Module, prefix: torch.Tensor, batch_size: int, *, layer_types: bool = True):
    """A DynamicCache holding the prefix as the first P positions of every layer.

    ``layer_types``: build the cache from the model's config, as transformers and PEFT do (sliding-window layers
    then keep only the last W - 1 positions); False: plain layers that keep every position.

    ``prefix``: ``[num_layers, 2, Hkv, P, D]`` (shared by the batch, expanded to B copies as PEFT does) or
    ``[B, num_layers, 2, Hkv, P, D]`` (one per row, as PEFT's per-row encoder makes it).
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config) if layer_types else DynamicCache()
    for layer in range(prefix.shape[-5]):
        if prefix.dim() == 6:
            keys, values = prefix[:, layer, 0], prefix[:, layer, 1]
        else:
            keys = prefix[layer, 0].unsqueeze(0).expand(batch_size, -1, -1, -1)
            values = prefix[layer, 1].unsqueeze(0).expand(batch_size, -1, -1, -1)
        cache.update(keys.contiguous(), values.contiguous(), layer)
    return cache


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def eager_forward(model: nn.Module, prefix: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, **kwargs):
    """``model(input_ids, ...)`` with ``prefix`` (``[L, 2, Hkv, P, D]`` or per row) injected PEFT's way."""
    batch = input_ids.shape[0]
    prefix_len = prefix.shape[-2]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ones = torch.ones(batch, prefix_len, dtype=attention_mask.dtype, device=attention_mask.device)
    extra = {cache_keyword(model): prefix_cache(model, prefix, batch)}
    if position_ids is not None:
        extra["position_ids"] = position_ids + prefix_len  # PEFT shifts explicit positions by P
    return model(input_ids=input_ids, attention_mask=torch.cat([ones, attention_mask], dim=1), **extra, **kwargs)


@torch.no_grad()
def eager_greedy(model: nn.Module, prefix: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, *, return_logits: bool = False):
    """Greedy decoding with the prefix held in the cache, as PEFT generates: returns the tokens ``[B, L +
    max_new_tokens]``, and with ``return_logits`` also each step's logits ``[B, max_new_tokens, vocab]``.

    Position ids follow ``generate()``: the running count of real tokens (pads at 0), shifted by P. With
    ``prefix=None`` it is plain greedy decoding (for a model prefix-tuned by prefix_kernels, whose prefix is not in
    the cache): the same loop, for timing the two paths alike.
    """
    from transformers import DynamicCache

    batch = input_ids.shape[0]
    prefix_len = 0 if prefix is None else prefix.shape[-2]
    keyword = cache_keyword(model)
    cache = DynamicCache(config=model.config) if prefix is None else prefix_cache(model, prefix, batch)
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    tokens, step, steps = input_ids, input_ids, []
    for _ in range(max_new_tokens):
        ones = torch.ones(batch, prefix_len, dtype=mask.dtype, device=mask.device)
        kwargs = {keyword: cache, "attention_mask": torch.cat([ones, mask], dim=1), "use_cache": True}
        if _accepts(model, "position_ids"):
            kwargs["position_ids"] = positions + prefix_len
        logits = model(input_ids=step, **kwargs).logits[:, -1]
        steps.append(logits)
        step = logits.argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, step], dim=1)
        mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        positions = positions[:, -1:] + 1
    return (tokens, torch.stack(steps, dim=1)) if return_logits else tokens


def peft_style_prefix(encoder, batch_size: int) -> torch.Tensor:
    """The prefix as PEFT computes it: the encoder (``embedding`` and, with projection, ``transform``: PEFT's
    parameter names) run on every batch row's copy of the virtual tokens. Returns ``[B, num_layers, 2, Hkv, P,
    D]`` for :func:`prefix_cache`. For timing PEFT's way; the values equal ``encoder()`` in every row."""
    tokens = encoder.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)
    flat = encoder.transform(tokens) if encoder.prefix_projection else tokens
    shape = (batch_size, encoder.num_virtual_tokens, encoder.num_layers, 2, encoder.num_kv_heads, encoder.head_dim)
    return flat.reshape(shape).permute(0, 2, 3, 4, 1, 5)


def compare_with_reference(model: nn.Module, reference: nn.Module, handle, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor, *, grads: bool = True, **forward_kwargs):
    """Outputs at real tokens and every prefix-encoder gradient of the prefix-tuned ``model`` against the eager
    reference, under the tolerance rule of :mod:`prefix_kernels.testing`: the truth is ``reference`` (an eager
    copy of the model made before applying) in float64, the baseline the same in float32. Returns one
    :class:`~prefix_kernels.testing.Comparison` per quantity. The encoder's ``.grad`` are left as they were."""
    import copy

    from ...testing import compare

    encoder = handle.prefix_encoder
    truth_model, truth_encoder = copy.deepcopy(reference).double(), copy.deepcopy(encoder).double()
    probe = torch.Generator().manual_seed(2)

    def logits_of(output):
        if hasattr(output, "start_logits"):
            return torch.stack([output.start_logits, output.end_logits], dim=-1)
        return output.logits

    def real(x):
        return x[attention_mask.bool()] if x.shape[:2] == attention_mask.shape else x

    weights = None

    def run(fn, enc):
        nonlocal weights
        enc.zero_grad(set_to_none=True)
        out = real(logits_of(fn()))
        if grads:
            if weights is None:
                weights = torch.randn(out.shape, generator=probe)
            (out.double() * weights.to(out.device, torch.float64)).sum().backward()
        return out.detach(), [p.grad.detach().clone() for p in enc.parameters()] if grads else []

    saved = [p.grad for p in encoder.parameters()]  # the caller's gradients are left as they were
    ours, ours_g = run(lambda: model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs), encoder)
    base, base_g = run(lambda: eager_forward(reference, encoder(), input_ids, attention_mask, **forward_kwargs),
                       encoder)
    for p, grad in zip(encoder.parameters(), saved, strict=True):
        p.grad = grad
    truth, truth_g = run(lambda: eager_forward(truth_model, truth_encoder(), input_ids, attention_mask,
                                               **forward_kwargs), truth_encoder)
    n_terms = handle.num_virtual_tokens + input_ids.shape[1]
    results = [compare("logits", ours, truth, base, 2.0, n_terms)]
    names = [n for n, _ in encoder.named_parameters()]
    for name, o, t, b in zip(names, ours_g, truth_g, base_g, strict=True):
        results.append(compare(f"d {name}", o, t, b, 3.0, n_terms * input_ids.shape[0]))
    return results

"""The eager reference of encoder-decoder prefix tuning, built the way Li & Liang's BART code injects its prefixes.

Inside :func:`injected`, every attention module of an encoder-decoder model (T5 / mT5, BART, mBART; typically an
eager copy made before applying prefix_kernels) runs a forward written here in plain PyTorch: it projects the
queries, keys and values with the module's own weights, concatenates that site's prefix in front of the keys and
values, ``K~ = [Pk ; K]`` and ``V~ = [Pv ; V]``, and takes an explicit softmax. The sites:

    "encoder"  the encoder's self-attention, layer l takes prefixes["encoder"][l]
    "decoder"  the decoder's self-attention          prefixes["decoder"][l]
    "cross"    the decoder's cross-attention (keys: the encoder output's, after the prefix)  prefixes["cross"][l]

each ``[num_layers_of_that_stack, 2, Hkv, P, D]``; a site left out of the dict gets no prefix. Visibility is
built here from the 2D masks the model's stacks receive (captured by pre-hooks), not from transformers' 4D masks:
every query sees every prefix column; an input column is visible iff it is not padding (``attention_mask`` for the
encoder and cross-attention, ``decoder_attention_mask`` for the decoder) and, in the decoder's self-attention,
not in the future. Hidden masked scores take ``finfo(dtype).min``, as transformers' eager masks do.

Positions (the rules the library documents; each is applied here independently of its mechanism):

- BART / mBART learned absolute positions: the encoder's and the cross-attention's prefix carry no position and
  the encoder's tokens keep positions 0..; the decoder's tokens take positions P.. as PEFT's cache-held prefix
  gives them (the decoder's ``embed_positions`` is shifted by the decoder prefix's P; ``shift_decoder_positions``).
- T5 / mT5 relative bias: ``t5_prefix_bias="before"`` puts prefix column p (0 <= p < P) at memory position
  p - P, so a query at position i adds the bucket bias of relative position (p - P) - i (the prefix reads as P
  tokens just before the input: for the decoder this is what PEFT's cache gives; the encoder uses bidirectional
  buckets, the decoder unidirectional, as T5 does); ``"none"`` adds no bias on prefix columns. Input columns keep
  T5's bias of j - i. Cross-attention has no position bias in T5, so its prefix columns add 0 either way.

The model must run without a cache (``use_cache=False``: the reference recomputes every step of ``generate``);
a cache reaching an attention module raises. Written for clarity, not speed, against transformers 5.24's module
layout (T5Attention / BartAttention forwards and the stacks' keyword calls).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

SITES = ("encoder", "decoder", "cross")
T5_PREFIX_BIAS = ("before", "none")


@dataclass
class _Captured:
    """The 2D masks the stacks were called with in the current forward (None: no padding)."""

    encoder: torch.Tensor | None = None
    decoder: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    patched: list = field(default_factory=list)


def stacks(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(encoder stack, decoder stack) of a ``*ForConditionalGeneration`` or bare encoder-decoder model."""
    inner = model
    for name in ("model", "transformer"):
        if not hasattr(inner, "encoder") and hasattr(inner, name):
            inner = getattr(inner, name)
    if not (hasattr(inner, "encoder") and hasattr(inner, "decoder")):
        raise TypeError(f"{type(model).__name__} has no encoder and decoder stacks")
    return inner.encoder, inner.decoder


def _layers(stack: nn.Module) -> nn.ModuleList:
    return stack.block if hasattr(stack, "block") else stack.layers


def attention_sites(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The attention modules of each site, in layer order: {"encoder": [...], "decoder": [...], "cross": [...]}."""
    encoder, decoder = stacks(model)
    sites = {"encoder": [], "decoder": [], "cross": []}
    for layer in _layers(encoder):
        sites["encoder"].append(layer.layer[0].SelfAttention if hasattr(layer, "layer") else layer.self_attn)
    for layer in _layers(decoder):
        if hasattr(layer, "layer"):  # T5: [self, cross, ff]
            sites["decoder"].append(layer.layer[0].SelfAttention)
            sites["cross"].append(layer.layer[1].EncDecAttention)
        else:
            sites["decoder"].append(layer.self_attn)
            sites["cross"].append(layer.encoder_attn)
    return sites


def _is_t5(module: nn.Module) -> bool:
    return hasattr(module, "relative_attention_num_buckets")


def _visible(site: str, captured: _Captured, batch: int, len_q: int, len_k: int, device) -> torch.Tensor:
    """Which input columns each query sees: bool ``[B, 1, Lq, Lk]``."""
    pad = captured.encoder if site == "encoder" else captured.decoder if site == "decoder" else captured.cross
    keep = torch.ones(batch, len_k, dtype=torch.bool, device=device) if pad is None else pad.to(device).bool()
    if keep.shape != (batch, len_k):
        raise ValueError(f"the {site} mask has shape {tuple(keep.shape)}, the keys need ({batch}, {len_k})")
    visible = keep[:, None, None, :].expand(batch, 1, len_q, len_k)
    if site == "decoder":
        i = torch.arange(len_q, device=device)[:, None]
        j = torch.arange(len_k, device=device)[None, :]
        visible = visible & (j <= i + (len_k - len_q))
    return visible


def _attend(module, q, k, v, site, layer, prefixes, captured, scale, bias_fn):
    """softmax(scale * q [Pk ; k]^T + bias + mask) [Pv ; v] for one module: q ``[B, H, Lq, D]``, k, v ``[B, H, Lk,
    D]``; ``bias_fn(P, Lq, Lk)`` gives the additive position bias ``[1, H, Lq, P + Lk]`` or None."""
    batch, _, len_q, _ = q.shape
    len_k = k.shape[2]
    prefix = prefixes.get(site)
    num_prefix = 0
    if prefix is not None:
        pk, pv = prefix[layer, 0].to(q.dtype), prefix[layer, 1].to(q.dtype)  # [Hkv, P, D]
        num_prefix = pk.shape[1]
        groups = k.shape[1] // pk.shape[0]
        pk = pk.repeat_interleave(groups, dim=0) if groups > 1 else pk
        pv = pv.repeat_interleave(groups, dim=0) if groups > 1 else pv
        k = torch.cat([pk.unsqueeze(0).expand(batch, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.unsqueeze(0).expand(batch, -1, -1, -1), v], dim=2)
    visible = _visible(site, captured, batch, len_q, len_k, q.device)
    visible = torch.cat([torch.ones(batch, 1, len_q, num_prefix, dtype=torch.bool, device=q.device), visible], -1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    bias = bias_fn(num_prefix, len_q, len_k)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    dropout = getattr(module, "dropout", 0.0)
    if module.training and isinstance(dropout, float) and dropout > 0:
        probs = nn.functional.dropout(probs, p=dropout)
    return torch.matmul(probs, v), probs


def _bart_forward(module, site, layer, prefixes, captured):
    def forward(hidden_states, key_value_states=None, cache=None, attention_mask=None, **kwargs):
        if cache is not None:
            raise ValueError("the seq2seq reference runs without a cache: call the model with use_cache=False")
        batch, len_q, _ = hidden_states.shape
        source = hidden_states if key_value_states is None else key_value_states
        d = module.head_dim
        q = module.q_proj(hidden_states).view(batch, len_q, -1, d).transpose(1, 2)
        k = module.k_proj(source).view(batch, source.shape[1], -1, d).transpose(1, 2)
        v = module.v_proj(source).view(batch, source.shape[1], -1, d).transpose(1, 2)
        out, probs = _attend(module, q, k, v, site, layer, prefixes, captured, module.scaling, lambda *a: None)
        return module.out_proj(out.transpose(1, 2).reshape(batch, len_q, -1)), probs

    return forward


def t5_prefix_bias_table(module: nn.Module, rule: str, num_prefix: int, len_q: int, len_k: int, *,
                         bidirectional: bool) -> torch.Tensor:
    """T5's relative position bias ``[1, H, Lq, P + Lk]`` with prefix column p at memory position p - P
    (``rule="before"``) or no bias on prefix columns (``"none"``); ``module`` holds ``relative_attention_bias``."""
    device = module.relative_attention_bias.weight.device
    query = torch.arange(len_q, device=device)[:, None]
    memory = torch.arange(-num_prefix, len_k, device=device)[None, :]
    buckets = module._relative_position_bucket(memory - query, bidirectional=bidirectional,
                                               num_buckets=module.relative_attention_num_buckets,
                                               max_distance=module.relative_attention_max_distance)
    bias = module.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)
    if rule == "none" and num_prefix:
        bias = torch.cat([torch.zeros_like(bias[..., :num_prefix]), bias[..., num_prefix:]], dim=-1)
    return bias


def _t5_forward(module, site, layer, prefixes, captured, bias_owner, rule):
    def bias_fn(num_prefix, len_q, len_k):
        if site == "cross":
            return None  # T5's cross-attention has no position bias
        return t5_prefix_bias_table(bias_owner, rule, num_prefix, len_q, len_k, bidirectional=site == "encoder")

    def forward(hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs):
        if cache is not None:
            raise ValueError("the seq2seq reference runs without a cache: call the model with use_cache=False")
        batch, len_q, _ = hidden_states.shape
        source = hidden_states if key_value_states is None else key_value_states
        d = module.key_value_proj_dim
        q = module.q(hidden_states).view(batch, len_q, -1, d).transpose(1, 2)
        k = module.k(source).view(batch, source.shape[1], -1, d).transpose(1, 2)
        v = module.v(source).view(batch, source.shape[1], -1, d).transpose(1, 2)
        out, probs = _attend(module, q, k, v, site, layer, prefixes, captured, 1.0, bias_fn)
        # the stack hands what layer 0 returns to the next layers; this forward ignores it and computes its own
        return module.o(out.transpose(1, 2).reshape(batch, len_q, -1)), None, probs

    return forward


def _capture_hook(stack, captured: _Captured, is_decoder: bool):
    signature = inspect.signature(stack.forward)

    def hook(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        if is_decoder:
            captured.decoder = bound.get("attention_mask")
            captured.cross = bound.get("encoder_attention_mask")
        else:
            captured.encoder = bound.get("attention_mask")

    return stack.register_forward_pre_hook(hook, with_kwargs=True)


def _shifted_positions(embed, shift: int):
    original = embed.forward

    def forward(input_ids, cache_length: int = 0, position_ids=None):
        if position_ids is None:
            return original(input_ids, cache_length + shift)
        return original(input_ids, cache_length, position_ids=position_ids + shift)

    return forward


_EXPECTED = {True: ("hidden_states", "mask", "key_value_states", "position_bias"),
             False: ("hidden_states", "key_value_states", "attention_mask")}


def _check_layout(module: nn.Module) -> None:
    """The forwards here replace transformers 5.24's T5Attention / BartAttention forwards (their arguments, and
    T5's three outputs); a module whose forward takes other arguments is refused rather than served wrongly."""
    params = set(inspect.signature(type(module).forward).parameters)
    expected = _EXPECTED[_is_t5(module)]
    missing = [name for name in expected if name not in params]
    if missing or not params & {"cache", "past_key_values"} or "layer_head_mask" in params:
        raise NotImplementedError(f"the seq2seq reference knows transformers 5.24's attention forwards; "
                                  f"{type(module).__name__}.forward takes {sorted(params)}")


def _check(model: nn.Module, prefixes: dict, rule: str) -> dict[str, list[nn.Module]]:
    if rule not in T5_PREFIX_BIAS:
        raise ValueError(f"t5_prefix_bias must be one of {T5_PREFIX_BIAS}, got {rule!r}")
    unknown = set(prefixes) - set(SITES)
    if unknown:
        raise ValueError(f"prefixes has unknown sites {sorted(unknown)}; the sites are {SITES}")
    sites = attention_sites(model)
    for modules in sites.values():
        for module in modules:
            _check_layout(module)
    for site, prefix in prefixes.items():
        if prefix.dim() != 5 or prefix.shape[0] != len(sites[site]) or prefix.shape[1] != 2:
            raise ValueError(f"prefixes[{site!r}] must be [{len(sites[site])}, 2, Hkv, P, D], "
                             f"got {tuple(prefix.shape)}")
    return sites


@contextlib.contextmanager
def injected(model: nn.Module, prefixes: dict[str, torch.Tensor], *, t5_prefix_bias: str = "before",
             shift_decoder_positions: bool = True):
    """Within the block, ``model`` (an encoder-decoder model, ideally an eager copy) attends with ``prefixes`` as
    the module docstring describes; on exit every patched forward and hook is gone. ``prefixes`` may require grad:
    gradients reach them through the concatenation."""
    sites = _check(model, prefixes, t5_prefix_bias)
    captured = _Captured()
    encoder, decoder = stacks(model)
    undo = [_capture_hook(encoder, captured, False), _capture_hook(decoder, captured, True)]
    patched = []
    try:
        for site, modules in sites.items():
            for layer, module in enumerate(modules):
                if _is_t5(module):
                    owner = modules[0] if site != "cross" else module
                    forward = _t5_forward(module, site, layer, prefixes, captured, owner, t5_prefix_bias)
                else:
                    forward = _bart_forward(module, site, layer, prefixes, captured)
                patched.append((module, module.__dict__.get("forward")))
                module.forward = forward
        embed = getattr(decoder, "embed_positions", None)
        if shift_decoder_positions and embed is not None and "decoder" in prefixes:
            patched.append((embed, embed.__dict__.get("forward")))
            embed.forward = _shifted_positions(embed, prefixes["decoder"].shape[-2])
        yield model
    finally:
        for handle in undo:
            handle.remove()
        for module, previous in reversed(patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def reference_forward(model: nn.Module, prefixes: dict[str, torch.Tensor], *, t5_prefix_bias: str = "before",
                      shift_decoder_positions: bool = True, **inputs):
    """``model(**inputs, use_cache=False)`` with ``prefixes`` injected (see :func:`injected`)."""
    with injected(model, prefixes, t5_prefix_bias=t5_prefix_bias, shift_decoder_positions=shift_decoder_positions):
        return model(**inputs, use_cache=False)


@torch.no_grad()
def reference_generate(model: nn.Module, prefixes: dict[str, torch.Tensor], *, t5_prefix_bias: str = "before",
                       **kwargs) -> torch.Tensor:
    """``model.generate(**kwargs, use_cache=False)`` with ``prefixes`` injected: every step recomputes the decoder
    over all tokens so far, the prefix in front of each attention's keys."""
    with injected(model, prefixes, t5_prefix_bias=t5_prefix_bias):
        return model.generate(**kwargs, use_cache=False)



def peft_decoder_prefix(table: torch.Tensor, num_layers: int, num_heads: int, num_decoder_layers: int) -> torch.Tensor:
    """The decoder self-attention prefix ``[num_decoder_layers, 2, H, P, D]`` that PEFT 0.21.2's seq2seq prefix
    tuning feeds, from its table ``table`` ``[P, num_layers * 2 * H * D]`` (``prompt_encoder(...)`` of one row, or
    the saved ``prompt_embeddings``; ``num_layers`` is PEFT's: the *encoder's* layer count).

    What PEFT does (``PeftModel.get_prompt`` with ``num_transformer_submodules=2``): it views the table as ``[P,
    2L, H, D]`` (entry ``2s + kv`` is slot s), concatenates it with itself to ``[P, 4L, H, D]``, and splits the 4L
    entries into L chunks of 4 consecutive entries (self k, self v, cross k, cross v); it then discards the cross
    half (an empty cross-attention cache: the encoder output fills it). So decoder layer l reads slot
    ``2l mod L``: with L = 2 both decoder layers take slot 0 and slot 1 is never used; cross-attention and the
    encoder get no prefix. Decoder layers at or past L get no prefix either (the cache has L layers): not
    representable here, so it raises."""
    if num_decoder_layers > num_layers:
        raise ValueError(f"PEFT gives decoder layers {num_layers}..{num_decoder_layers - 1} no prefix (its cache has "
                         f"num_layers={num_layers} layers): no [num_decoder_layers, ...] prefix describes that")
    P = table.shape[0]
    entries = table.reshape(P, 2 * num_layers, num_heads, -1).permute(1, 2, 0, 3)  # [2L, H, P, D]
    slots = [(2 * layer) % num_layers for layer in range(num_decoder_layers)]
    return torch.stack([entries[2 * s: 2 * s + 2] for s in slots])


def split_sites(flat: torch.Tensor, layers: dict[str, int]) -> dict[str, torch.Tensor]:
    """A prefix ``[sum of layers, 2, Hkv, P, D]`` cut into sites, in the order of ``layers`` ({site: layer count})."""
    return dict(zip(layers, flat.split(list(layers.values())), strict=True))


def compare_with_seq2seq_reference(model: nn.Module, reference: nn.Module, handle, inputs: dict, *,
                                   grads: bool = True, t5_prefix_bias: str = "before",
                                   shift_decoder_positions: bool = True):
    """The prefix-tuned ``model`` against the eager reference, under the tolerance rule of
    :mod:`prefix_kernels.testing`: logits at real target tokens, the loss (when ``inputs`` has labels) and the
    gradient of every prefix-encoder parameter, from a fixed random functional of the logits plus the loss.

    The truth is ``reference`` (an eager copy made before applying) and a copy of the handle's encoder, both in
    float64; the baseline the same in float32. The encoder's output is cut into sites by the layer counts of
    ``handle.site_prefixes()`` in its key order (checked equal to what the handle hands out), so the truth's
    prefixes come from the fp64 encoder through the same cut. Returns one Comparison per quantity; the encoder's
    ``.grad`` are left as they were."""
    import copy

    from ...testing import compare

    encoder = handle.prefix_encoder
    handed = {site: t.detach() for site, t in handle.site_prefixes().items()}
    layers = {site: t.shape[0] for site, t in handed.items()}
    with torch.no_grad():
        cut = split_sites(encoder(), layers)
    for site, t in handed.items():
        if not torch.equal(cut[site].to(t.dtype), t):
            raise AssertionError(f"the encoder's output cut by site is not handle.site_prefixes()[{site!r}]")
    truth_model, truth_encoder = copy.deepcopy(reference).double(), copy.deepcopy(encoder).double()
    if "decoder_attention_mask" in inputs:
        real = inputs["decoder_attention_mask"].bool()
    elif "labels" in inputs:
        real = inputs["labels"] != -100
    else:
        real = None
    probe = torch.Generator().manual_seed(2)
    weights = None
    options = {"t5_prefix_bias": t5_prefix_bias, "shift_decoder_positions": shift_decoder_positions}

    def run(fn, enc):
        nonlocal weights
        enc.zero_grad(set_to_none=True)
        output = fn()
        logits = output.logits if real is None else output.logits[real]
        loss = getattr(output, "loss", None)
        if grads:
            if weights is None:
                weights = torch.randn(logits.shape, generator=probe)
            scalar = (logits.double() * weights.to(logits.device, torch.float64)).sum()
            (scalar + (0 if loss is None else loss.double())).backward()
        grads_ = [p.grad.detach().clone() for p in enc.parameters()] if grads else []
        return logits.detach(), None if loss is None else loss.detach(), grads_

    saved = [p.grad for p in encoder.parameters()]
    ours, ours_loss, ours_g = run(lambda: model(**inputs), encoder)
    base, base_loss, base_g = run(lambda: reference_forward(reference, split_sites(encoder(), layers), **options,
                                                            **inputs), encoder)
    for p, grad in zip(encoder.parameters(), saved, strict=True):
        p.grad = grad
    with warnings.catch_warnings():  # the fp64 truth's encoder runs on the torch backend, and says so
        warnings.filterwarnings("ignore", message="prefix projection: using the 'torch' backend")
        truth, truth_loss, truth_g = run(lambda: reference_forward(truth_model, split_sites(truth_encoder(), layers),
                                                                   **options, **inputs), truth_encoder)
    P = handle.num_virtual_tokens
    n_terms = P + max(inputs["input_ids"].shape[1], real.shape[1] if real is not None else 0)
    results = [compare("logits", ours, truth, base, 2.0, n_terms)]
    if ours_loss is not None:
        results.append(compare("loss", ours_loss, truth_loss, base_loss, 2.0, n_terms))
    names = [n for n, _ in encoder.named_parameters()] if grads else []
    for name, o, t, b in zip(names, ours_g, truth_g, base_g, strict=True):
        results.append(compare(f"d {name}", o, t, b, 3.0, n_terms * inputs["input_ids"].shape[0]))
    return results

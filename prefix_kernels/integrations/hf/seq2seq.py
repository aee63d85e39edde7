"""Encoder-decoder models (T5, BART, mBART, Marian, Pegasus): which attentions get a prefix, and their positions.

A seq2seq :class:`~.families.Family` declares its *sites*: for each of "encoder" (the encoder's self-attention),
"decoder" (the decoder's self-attention) and "cross" (the decoder's attention over the encoder's output), the
layer list and the attention module within a layer. ``PrefixConfig(prefix_sites=...)`` picks the sites:

- ``"paper"`` (the default for these models): all three, each with its own learned prefix per layer, as Li &
  Liang's BART code and adapter-hub ``adapters`` do;
- ``"peft"``: the decoder's self-attention only, PEFT's semantics (its cache-held prefix), so a PEFT seq2seq
  adapter loads and computes what PEFT computes. That includes PEFT 0.21's layer mapping: PEFT builds its
  encoder-decoder cache from a table of L layers duplicated and regrouped four rows per layer, so decoder layer i
  attends to table layer ``2 i mod L`` (for even L, layers i and i + L/2 share one prefix, and the odd table layers
  are never read and get no gradient). Our prefix has PEFT's L layers and each decoder layer reads the one PEFT's
  would: PEFT's adapters load as they are, train the same and save back the same.

The sites are just more layers of one prefix: the :class:`~prefix_kernels.PrefixEncoder` holds ``L_enc + L_dec +
L_dec`` layers in "paper" mode (in that order: encoder, decoder, cross) and ``L_dec`` in "peft" mode, computed in
one call per forward; ``handle.site_prefixes()`` splits it by site.

Positions. Every query sees every prefix column; padding masks only the real keys.

- Decoder self-attention (both modes): as PEFT's prefix of P cached tokens. Learned absolute positions (BART,
  mBART) and sinusoidal ones (Marian, Pegasus) of the real tokens start at P; T5's relative bias sees the prefix
  as the P tokens just before the first real one (column p is at distance ``P - p + i`` before query i's position).
- Encoder self-attention ("paper"): the prefix again precedes the input, as the paper's code treats it (keys
  before the input's keys). For T5 this gives the prefix columns the encoder's bidirectional bias of the P tokens
  before the input; BART-like encoders keep the real tokens' absolute positions at 0, as the paper's code and
  ``adapters`` do (their encoders never shift positions; shifting would move the pretrained encoder off the
  positions it was trained at for a prefix that carries no position embedding of its own).
- Cross-attention ("paper"): no positions (T5 has no relative bias there, BART none at all): the prefix columns
  get no bias.

``shift_positions=False``: decoder positions start at 0 and T5's prefix columns get no bias at any site.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .state import PrefixSlot

SITE_NAMES = ("encoder", "decoder", "cross")
MODES = ("paper", "peft")


@dataclass(frozen=True)
class Site:
    """One kind of attention of an encoder-decoder model: ``name`` (one of :data:`SITE_NAMES`), the layer list
    ``layers`` under ``model.base_model`` and the attention ``attention`` within one layer."""

    name: str
    layers: str
    attention: str


@dataclass
class Layout:
    """Where each site's layers sit in the prefix: ``spans[site] = (first layer, number of layers)``, in order."""

    spans: dict[str, tuple[int, int]]
    modules: list[nn.Module]
    sites: list[str]  # the site of each module, in prefix order
    indices: list[int]  # the prefix layer each module reads (its position, but for "peft" mode's mapping)

    @property
    def num_layers(self) -> int:
        return len(self.modules)


def resolve_mode(prefix_sites, model_name: str, encoder_decoder: bool) -> str | None:
    """The mode ``prefix_sites`` names for the model ("paper" when None on an encoder-decoder model)."""
    if prefix_sites is None:
        return "paper" if encoder_decoder else None
    if prefix_sites not in MODES:
        raise ValueError(f'prefix_sites must be "paper", "peft" or None, got {prefix_sites!r}')
    return prefix_sites if encoder_decoder else None  # one kind of attention: both modes mean the same


def layout(model: nn.Module, family, mode: str) -> Layout:
    """The modules of each site the mode covers, in prefix order (encoder, decoder, cross)."""
    from .facts import UnsupportedModelError

    wanted = SITE_NAMES if mode == "paper" else ("decoder",)
    base, name = model.base_model, type(model).__name__
    spans, modules, sites = {}, [], []
    if mode == "peft":
        count = int(model.config.num_hidden_layers)  # PEFT's num_layers: the config's, the encoder's count
    for site in family.sites:
        if site.name not in wanted:
            continue
        try:
            layers = base.get_submodule(site.layers)
            found = [layer.get_submodule(site.attention) for layer in layers]
        except AttributeError:
            raise UnsupportedModelError(
                f"{name}: expected the {family.name} {site.name} attention at {type(base).__name__}.{site.layers}.<i>."
                f"{site.attention}, which this transformers version does not have") from None
        spans[site.name] = (len(modules), len(found))
        modules += found
        sites += [site.name] * len(found)
    if mode == "paper":
        return Layout(spans, modules, sites, list(range(len(modules))))
    if len(modules) != count:
        raise UnsupportedModelError(
            f'{name}: prefix_sites="peft" follows PEFT, whose prefix has config.num_hidden_layers={count} layers, '
            f'but the decoder has {len(modules)}; PEFT cannot serve this model either (use prefix_sites="paper")')
    return Layout(spans, modules, sites, [(2 * i) % count for i in range(count)])


def layout_and_sizes(model: nn.Module, family, prefix_sites) -> tuple[Layout, tuple[int, int, int, int]]:
    """The layout of the sites ``prefix_sites`` covers and the prefix's ``(num_layers, heads, kv_heads,
    head_dim)``; every prefixed attention must have the same heads and head size (one prefix tensor)."""
    from .facts import UnsupportedModelError

    mode = resolve_mode(prefix_sites, type(model).__name__, True)
    found = layout(model, family, mode)
    shapes = {heads_and_dim(m) for m in found.modules}
    if len(shapes) != 1:
        raise UnsupportedModelError(f"{type(model).__name__}: the prefixed attentions ({', '.join(found.spans)}) "
                                    f"differ in (heads, head_dim): {sorted(shapes)}; one prefix tensor needs one "
                                    'shape (prefix_sites="peft" covers the decoder only)')
    heads, dim = shapes.pop()
    return found, (found.num_layers, heads, heads, dim)


def heads_and_dim(module: nn.Module) -> tuple[int, int]:
    """``(num_heads, head_dim)`` of a BART-like or T5 attention module."""
    heads = getattr(module, "num_heads", None) or getattr(module, "n_heads", None)
    dim = getattr(module, "head_dim", None) or getattr(module, "key_value_proj_dim", None)
    if heads is None or dim is None:
        from .facts import UnsupportedModelError

        raise UnsupportedModelError(f"{type(module).__name__} declares neither num_heads/head_dim nor "
                                    "n_heads/key_value_proj_dim")
    return int(heads), int(dim)


def stack_of(site: str) -> str:
    return "encoder" if site == "encoder" else "decoder"


class SiteSlot(PrefixSlot):
    """A :class:`~.state.PrefixSlot` of one site, which also makes the additive bias of T5's prefix columns:
    ``bias_source`` is the stack's attention holding ``relative_attention_bias`` (None: no relative positions)."""

    def __init__(self, state, index: int, previous: str, site: str, bias_source: nn.Module | None,
                 shift: bool):
        super().__init__(state, index, previous)
        self.site = site
        self.bias_source = bias_source
        self.shift = shift

    def attention_bias(self, position_bias: torch.Tensor, query: torch.Tensor, key_length: int,
                       prefix_len: int) -> torch.Tensor:
        """``[1 or B, Hq, Lq, P + Lk]`` fp32: the prefix columns' bias, then the model's ``position_bias`` of the
        real keys (``[1 or B, Hq, Lq, >= Lk]``). Refuses a bias a trainable parameter produced: the op takes no
        gradient for it. T5 hands every layer of a stack the same ``position_bias`` tensor: the result is made once
        per forward and site for it."""
        call, given = self.state.current(), position_bias
        key = ("t5-bias", self.site, id(given), key_length, prefix_len, query.shape[2])
        cached = call.extras.get(key)
        if cached is not None and cached[0] is given:  # held here, so its id is not reused in this call
            return cached[1]
        if position_bias.requires_grad:
            if position_bias.grad_fn is not None:
                raise ValueError(
                    f"the relative position bias reaching a {self.site} attention requires grad (T5's "
                    "relative_attention_bias is trainable), but the prefix attention takes no gradient for the bias: "
                    "freeze it (freeze_base_model=True, or requires_grad_(False) on every relative_attention_bias)")
            position_bias = position_bias.detach()  # T5's zeros made to require grad under checkpointing: a leaf
        real = position_bias[..., :key_length].float()
        batch, lq = real.shape[0], query.shape[2]
        prefix = self._prefix_bias(lq, key_length, prefix_len, real.shape[1], real.device)
        if prefix.shape[0] != batch:
            lead = max(prefix.shape[0], batch)
            prefix, real = prefix.expand(lead, -1, -1, -1), real.expand(lead, -1, -1, -1)
        bias = torch.cat([prefix, real], dim=-1)
        call.extras[key] = (given, bias)
        return bias

    def _prefix_bias(self, lq: int, lk: int, prefix_len: int, heads: int, device) -> torch.Tensor:
        source = self.bias_source
        if source is None or not self.shift:
            return torch.zeros(1, heads, lq, prefix_len, device=device)
        call = self.state.current()
        offsets = self.state.position_offsets()
        per_row = isinstance(offsets, torch.Tensor)
        key = ("t5-prefix-bias", id(source), lq, lk, prefix_len, per_row)
        cached = call.extras.get(key)
        if cached is not None:
            return cached
        weight = source.relative_attention_bias.weight
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{type(source).__name__}.relative_attention_bias requires grad, but the prefix attention "
                             "takes no gradient for the position bias; freeze it (freeze_base_model=True)")
        queries = torch.arange(lq, device=device) + (lk - lq)  # bottom-right: the last query is the last key's
        columns = torch.arange(prefix_len, device=device)
        if per_row:  # each row's prefix sits just before its first real token
            start = offsets.to(device).view(-1, 1, 1)
        else:
            start = torch.tensor(int(offsets), device=device).view(1, 1, 1)
        relative = (columns.view(1, 1, -1) - start) - queries.view(1, -1, 1)  # [B or 1, Lq, P]
        buckets = type(source)._relative_position_bucket(
            relative, bidirectional=not source.is_decoder, num_buckets=source.relative_attention_num_buckets,
            max_distance=source.relative_attention_max_distance)
        with torch.no_grad():
            bias = torch.nn.functional.embedding(buckets, weight).float().permute(0, 3, 1, 2).contiguous()
        call.extras[key] = bias
        return bias


class ShiftSharedPositions:
    """Forward hook (with kwargs) on a BART-like position embedding whose ``position_ids`` keyword is one ``[L]``
    row shared by the batch: the output is recomputed with the ids shifted by P, or with a per-row prefix
    selection, by each row's prefix length (then ``[B, L, D]``, which the decoder's sum broadcasts). Ids below
    ``first`` stay."""

    def __init__(self, state, first: int = 0):
        self.state = state
        self.first = first

    def __call__(self, module, args, kwargs, output):
        positions = kwargs.get("position_ids")
        if not self.state.enabled or not isinstance(positions, torch.Tensor):
            return None
        offset = self.state.position_offsets()
        forward = type(module).forward
        if not isinstance(offset, torch.Tensor):
            if offset == 0:
                return None
            shifted = torch.where(positions >= self.first, positions + offset, positions)
            return forward(module, *args, **{**kwargs, "position_ids": shifted})
        rows = offset.shape[0]
        out = None
        for value in offset.unique().tolist():
            shifted = torch.where(positions >= self.first, positions + value, positions)
            part = forward(module, *args, **{**kwargs, "position_ids": shifted})
            part = part.reshape(-1, *part.shape[-2:])[:1]
            if out is None:
                out = part.new_empty(rows, *part.shape[1:])
            out[offset == value] = part.expand(int((offset == value).sum()), -1, -1)
        return out


def split_sites(prefix: torch.Tensor, found: Layout) -> dict[str, torch.Tensor]:
    """The prefix ``[L, 2, ...]`` split into what each site's layers read (views, but for "peft" mode's mapped
    layers, gathered)."""
    out = {}
    for site, (start, count) in found.spans.items():
        wanted = found.indices[start:start + count]
        if wanted == list(range(wanted[0], wanted[0] + count)):
            out[site] = prefix[wanted[0]:wanted[0] + count]
        else:
            out[site] = prefix[torch.tensor(wanted, device=prefix.device)]
    return out

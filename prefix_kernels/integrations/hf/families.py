"""Per-family adapters: each declares only what differs between model families.

One generic mechanism (``apply.py``) prefix-tunes every family. A :class:`Family` says where the attention
modules are (a layer list and the attention within a layer, relative to ``model.base_model``), where position
ids enter (to shift them by P), and, for a family whose attention is not on transformers' AttentionInterface, the
instance-level forward that replaces it. Everything else (causality, sliding windows, softcap, dropout, scale)
reaches the attention function through the arguments transformers already passes it (the mask pattern,
``sliding_window=``, ``softcap=``, ``dropout=``, ``scaling=``), so no family declares it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .bloom import bloom_attention_forward
from .facts import UnsupportedModelError
from .positions import PositionSpec
from .seq2seq import Site


@dataclass(frozen=True)
class Family:
    """How one model family is prefix-tuned.

    Attributes:
        name: for messages and the README.
        model_types: ``config.model_type`` values served.
        layers: dotted path of the layer ``ModuleList`` under ``model.base_model``.
        attention: dotted path of the self-attention module within one layer.
        positions: where position ids enter, to shift them by P; None when positions come from elsewhere.
        forward: a replacement ``forward(self, ...)`` bound to each attention module instance, for a family whose
            attention does not call transformers' AttentionInterface; None for the rest.
        alibi: the family's attention adds ALiBi biases (its slots keep the slopes, one tensor per device).
        root: dotted path under ``model.base_model`` of the module whose forward runs the embeddings and every
            layer, where each forward begins and ends ("": the base model; OPT's causal LM calls its decoder
            directly, past the base model).
        features: what the family's attention uses, for the README (informative).
        sites: for an encoder-decoder family, its "encoder", "decoder" and "cross" attentions
            (:class:`~.seq2seq.Site`); ``layers`` and ``attention`` then name the decoder's self-attention.
            Positions and the sites' semantics: :mod:`~.seq2seq`.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    positions: PositionSpec | None
    forward: Callable | None = None
    alibi: bool = False
    features: str = ""
    root: str = ""
    sites: tuple[Site, ...] = ()

    def __reduce__(self):
        # pickled and deep-copied by name (its callables need not pickle): the same adapter comes back
        return family_named, (self.name,)

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        """The model's layers."""
        base = model.base_model
        try:
            return base.get_submodule(self.layers)
        except AttributeError:
            raise UnsupportedModelError(
                f"{type(model).__name__}: expected the {self.name} layers at {type(base).__name__}.{self.layers}, "
                "which this transformers version does not have") from None

    def attention_modules(self, model: nn.Module, num_layers: int) -> list[nn.Module]:
        """The self-attention module of each layer, in layer order."""
        base = model.base_model
        layers = self.layer_list(model)
        if len(layers) != num_layers:
            raise UnsupportedModelError(f"{type(model).__name__}: {type(base).__name__}.{self.layers} holds "
                                        f"{len(layers)} layers but config.num_hidden_layers is {num_layers}")
        modules = []
        for i, layer in enumerate(layers):
            try:
                modules.append(layer.get_submodule(self.attention))
            except AttributeError:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: expected the attention of layer {i} at {self.layers}.{i}."
                    f"{self.attention}, which this transformers version does not have") from None
        return modules


_ROPE = PositionSpec("rotary_emb", 1, "position_ids")
_DECODER = {"layers": "layers", "attention": "self_attn", "positions": _ROPE}

_BART_POSITIONS = PositionSpec("decoder.embed_positions", 2, "position_ids", shared=True)
_BART_SITES = (Site("encoder", "encoder.layers", "self_attn"), Site("decoder", "decoder.layers", "self_attn"),
               Site("cross", "decoder.layers", "encoder_attn"))
_BART = {"layers": "decoder.layers", "attention": "self_attn", "positions": _BART_POSITIONS, "sites": _BART_SITES}
_T5_SITES = (Site("encoder", "encoder.block", "layer.0.SelfAttention"),
             Site("decoder", "decoder.block", "layer.0.SelfAttention"),
             Site("cross", "decoder.block", "layer.1.EncDecAttention"))

FAMILIES: tuple[Family, ...] = (
    Family("BERT", ("bert",), "encoder.layer", "attention.self",
           PositionSpec("embeddings.position_embeddings", 0, "input"),
           features="bidirectional (causal when is_decoder), learned absolute positions, attention dropout"),
    Family("RoBERTa", ("roberta",), "encoder.layer", "attention.self",
           PositionSpec("embeddings.position_embeddings", 0, "input", first=lambda c: c.pad_token_id + 1),
           features="as BERT; positions start after padding_idx, pads keep padding_idx"),
    Family("GPT-2", ("gpt2",), "h", "attn", PositionSpec("wpe", 0, "input"),
           features="causal, learned absolute positions, per-layer scaling"),
    Family("Llama", ("llama",), **_DECODER, features="causal, RoPE, GQA"),
    Family("Qwen2", ("qwen2",), **_DECODER, features="causal, RoPE, GQA, optional sliding window per layer"),
    Family("Qwen3", ("qwen3",), **_DECODER, features="causal, RoPE, GQA, head_dim != hidden / heads"),
    Family("Mistral", ("mistral",), **_DECODER, features="causal, RoPE, GQA, sliding window"),
    Family("Gemma 2", ("gemma2",), **_DECODER,
           features="causal, RoPE, GQA, logit softcap, alternating sliding-window layers"),
    Family("OPT", ("opt",), "decoder.layers", "self_attn", PositionSpec("decoder.embed_positions", 2, "position_ids"),
           features="causal, learned positions from the mask cumsum (pads at -1)", root="decoder"),
    Family("Bloom", ("bloom",), "h", "self_attention", None, forward=bloom_attention_forward, alibi=True,
           features="causal, ALiBi (instance-level forward: Bloom's attention is not on the AttentionInterface)"),
    Family("T5", ("t5", "mt5"), "decoder.block", "layer.0.SelfAttention", None, sites=_T5_SITES,
           features="encoder-decoder, relative position bias (an additive bias, prefix columns included), "
                    "scale 1"),
    Family("BART", ("bart",), **_BART, features="encoder-decoder, learned absolute positions (offset 2)"),
    Family("mBART", ("mbart",), **_BART, features="encoder-decoder, learned absolute positions, pre-norm"),
    Family("Marian", ("marian",), **_BART, features="encoder-decoder, sinusoidal positions"),
    Family("Pegasus", ("pegasus",), **_BART, features="encoder-decoder, sinusoidal positions, pre-norm"),
)

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}

def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def family_of(model: nn.Module) -> Family:
    """The adapter for ``model``, or :class:`UnsupportedModelError` naming the class and what is missing."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    if model_type is None or not hasattr(model, "base_model"):
        raise TypeError(f"apply_prefix_tuning needs a transformers PreTrainedModel, got {name}")
    family = _BY_TYPE.get(model_type)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if encoder_decoder and (family is None or not family.sites):
        served = sorted(t for f in FAMILIES if f.sites for t in f.model_types)
        raise UnsupportedModelError(
            f"cannot prefix-tune {name} (model_type {model_type!r}): an encoder-decoder model needs a seq2seq family "
            "adapter declaring where its encoder self-attention, decoder self-attention and cross-attention modules "
            f"are and how its positions work; none is declared for {model_type!r}. Encoder-decoder types served: "
            f"{', '.join(served)}")
    if family is not None and family.sites and not encoder_decoder:
        raise UnsupportedModelError(
            f"cannot prefix-tune {name} (model_type {model_type!r}, is_encoder_decoder=False): the {family.name} "
            "adapter serves the encoder-decoder classes (*ForConditionalGeneration and the bare model), not a "
            "stack alone")
    if family is None:
        raise UnsupportedModelError(
            f"cannot prefix-tune {name} (model_type {model_type!r}): no family adapter declares where its attention "
            f"modules are and how its positions shift. Supported model types: {', '.join(supported_model_types())}")
    return family


def family_named(name: str) -> Family:
    """The adapter called ``name`` (``Family.name``)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(f"no family adapter named {name!r}; there are {[f.name for f in FAMILIES]}")

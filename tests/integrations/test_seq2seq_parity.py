"""Encoder-decoder prefix tuning in "paper" mode (a prefix on the encoder's self-attention, the decoder's
self-attention and the decoder's cross-attention) against the eager reference of
prefix_kernels.integrations.hf.seq2seq_reference (each attention's keys and values concatenated with its site's
prefix, explicit softmax), on tiny random T5, BART and mBART with padded batches, under the tolerance rule of
prefix_kernels.testing (truth: the reference in fp64; baseline: the reference in fp32).

The first tests check the reference itself: with no prefix it is the model, and its decoder site is the prefix
PEFT's way (a cache holding it), so both independent constructions agree where they overlap.
"""

import pytest
import torch

from prefix_kernels.integrations.hf.seq2seq_reference import attention_sites, injected, reference_forward

from .seq2seq_models import SEQ2SEQ, batch, build, decoder_inputs, eager_copy

transformers = pytest.importorskip("transformers")


def _sizes(model):
    module = attention_sites(model)["decoder"][0]
    if hasattr(module, "n_heads"):
        return module.n_heads, module.key_value_proj_dim
    return module.num_heads, module.head_dim


def _random_prefixes(model, P, sites=("encoder", "decoder", "cross"), dtype=torch.float64, seed=0):
    heads, dim = _sizes(model)
    g = torch.Generator().manual_seed(seed)
    layers = {s: len(m) for s, m in attention_sites(model).items()}
    return {s: torch.randn(layers[s], 2, heads, P, dim, generator=g).to(dtype) for s in sites}


def _inputs(model, padding):
    ids, mask, labels = batch(padding=padding)
    dec, dmask = decoder_inputs(model, labels)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dmask}


@pytest.mark.parametrize("family", SEQ2SEQ)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_reference_without_prefixes_is_the_model(family, padding):
    ref = eager_copy(build(family)).double()
    inputs = _inputs(ref, padding)
    keep = inputs["decoder_attention_mask"].bool()
    with torch.no_grad():
        plain = ref(**inputs, use_cache=False).logits
        mine = reference_forward(ref, {}, **inputs).logits
        again = ref(**inputs, use_cache=False).logits  # the context restored every forward
    torch.testing.assert_close(mine[keep], plain[keep], rtol=1e-12, atol=1e-12)
    assert torch.equal(again, plain)
    assert all("forward" not in m.__dict__ for ms in attention_sites(ref).values() for m in ms)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_reference_decoder_site_is_the_cache_held_prefix(family):
    """The decoder site alone equals the prefix held in the self-attention cache with P ones before the decoder
    mask (PEFT's construction): BART's decoder positions then start at P, T5's relative bias sees the prefix as P
    tokens before the input. T5's other rule ("none") differs, so the comparison can fail."""
    from transformers import DynamicCache, EncoderDecoderCache

    ref = eager_copy(build(family)).double()
    inputs = _inputs(ref, "right")
    P, B = 5, inputs["input_ids"].shape[0]
    prefix = _random_prefixes(ref, P, sites=("decoder",))["decoder"]
    own = DynamicCache()
    for layer in range(prefix.shape[0]):
        own.update(prefix[layer, 0].expand(B, -1, -1, -1).contiguous(),
                   prefix[layer, 1].expand(B, -1, -1, -1).contiguous(), layer)
    dmask = inputs["decoder_attention_mask"]
    keep = dmask.bool()
    with torch.no_grad():
        cached = ref(**{**inputs, "decoder_attention_mask": torch.cat([torch.ones(B, P, dtype=dmask.dtype), dmask], 1)},
                     cache=EncoderDecoderCache(own, DynamicCache()), use_cache=True).logits
        mine = reference_forward(ref, {"decoder": prefix}, **inputs).logits
        unshifted = reference_forward(ref, {"decoder": prefix}, t5_prefix_bias="none", **inputs).logits
        with injected(ref, {"decoder": prefix}, shift_decoder_positions=False):
            unshifted_bart = ref(**inputs, use_cache=False).logits
    torch.testing.assert_close(mine[keep], cached[keep], rtol=1e-12, atol=1e-12)
    other = unshifted if family == "t5" else unshifted_bart
    assert (other[keep] - cached[keep]).abs().max() > 1e-3  # the position rule matters


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_reference_every_site_matters_and_gets_a_gradient(family):
    ref = eager_copy(build(family))
    inputs = _inputs(ref, "right")
    prefixes = _random_prefixes(ref, 4, dtype=torch.float32)
    for p in prefixes.values():
        p.requires_grad_(True)
    out = reference_forward(ref, prefixes, **inputs).logits
    out.square().sum().backward()
    with torch.no_grad():
        for site in prefixes:
            assert prefixes[site].grad.abs().min() >= 0 and prefixes[site].grad.abs().max() > 0, site
            others = {s: p for s, p in prefixes.items() if s != site}
            assert (reference_forward(ref, others, **inputs).logits - out).abs().max() > 1e-4, site

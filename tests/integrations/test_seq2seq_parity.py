"""Encoder-decoder prefix tuning in "paper" mode (a prefix on the encoder's self-attention, the decoder's
self-attention and the decoder's cross-attention) against the eager reference of
prefix_kernels.integrations.hf.seq2seq_reference (each attention's keys and values concatenated with its site's
prefix, explicit softmax), on tiny random T5, BART and mBART with padded batches, under the tolerance rule of
prefix_kernels.testing (truth: the reference in fp64; baseline: the reference in fp32).

The first tests check the reference itself: with no prefix it is the model, and its decoder site is the prefix
PEFT's way (a cache holding it), so both independent constructions agree where they overlap.
"""

import copy

import pytest
import torch

from prefix_kernels.integrations.hf.seq2seq_reference import (
    attention_sites,
    compare_with_seq2seq_reference,
    injected,
    reference_forward,
    reference_generate,
    split_sites,
)
from prefix_kernels.testing import compare

from .seq2seq_models import SEQ2SEQ, apply, batch, build, decoder_inputs, eager_copy

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

    from prefix_kernels.integrations.hf.reference import cache_keyword  # "cache" from 5.24, "past_key_values" before

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
                     **{cache_keyword(ref): EncoderDecoderCache(own, DynamicCache())}, use_cache=True).logits
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


# ------------------------------------------------------------------------------- "paper" mode against the reference
def _check(results):
    failed = [str(r) for r in results if not r.ok]
    assert not failed, "tolerance rule violated:\n  " + "\n  ".join(failed)
    return results


def _paper(family, P=5, **config):
    model = build(family)
    ref = eager_copy(model)
    handle = apply(model, prefix_sites="paper", num_virtual_tokens=P, **config)
    return model, ref, handle


@pytest.mark.parametrize("family", SEQ2SEQ)
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("projection", [False, True])
def test_paper_mode_matches_the_reference_with_labels(family, padding, projection):
    """Logits at real target tokens, the loss from labels (-100 padded) and every prefix-encoder gradient (the
    table, or the reparameterization MLP), P = 5, the source padded on either side."""
    extra = {"prefix_projection": True, "encoder_hidden_size": 24} if projection else {}
    model, ref, handle = _paper(family, **extra)
    assert set(handle.site_prefixes()) == {"encoder", "decoder", "cross"}
    ids, mask, labels = batch(padding=padding)
    _check(compare_with_seq2seq_reference(model, ref, handle, {"input_ids": ids, "attention_mask": mask,
                                                               "labels": labels}))


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_paper_mode_with_a_padded_decoder(family):
    """decoder_input_ids with a decoder_attention_mask that pads their tail: the decoder's own padding, P = 17
    (not a multiple of 16)."""
    model, ref, handle = _paper(family, P=17)
    inputs = _inputs(model, "left")
    _check(compare_with_seq2seq_reference(model, ref, handle, inputs))


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_paper_mode_without_position_shift(family):
    """shift_positions=False: decoder positions from 0, and T5's prefix columns get no bias at any site."""
    model, ref, handle = _paper(family, shift_positions=False)
    ids, mask, labels = batch(padding="right")
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    _check(compare_with_seq2seq_reference(model, ref, handle, inputs, t5_prefix_bias="none",
                                          shift_decoder_positions=False))
    shifted = compare_with_seq2seq_reference(model, ref, handle, inputs, grads=False)
    assert not shifted[0].ok  # the two rules differ, so the comparison can tell them apart


@pytest.mark.parametrize("family", SEQ2SEQ)
@pytest.mark.parametrize("site", ["encoder", "decoder", "cross"])
def test_a_wrong_site_prefix_breaks_the_comparison(family, site):
    """Each site's prefix matters to the comparison: the reference with that site's prefix perturbed (one layer,
    one key entry scaled) is outside the tolerance of ours."""
    model, ref, handle = _paper(family)
    inputs = _inputs(model, "right")
    keep = inputs["decoder_attention_mask"].bool()
    with torch.no_grad():
        prefixes = {s: t.clone() for s, t in handle.site_prefixes().items()}
        ours = model(**inputs).logits[keep]
        good = reference_forward(ref, prefixes, **inputs).logits[keep]
        truth = reference_forward(copy.deepcopy(ref).double(), {s: t.double() for s, t in prefixes.items()},
                                  **inputs).logits[keep]
        prefixes[site][-1, 0, :, 0] *= 3.0
        bad = reference_forward(ref, prefixes, **inputs).logits[keep]
    assert compare("logits", ours, truth, good, 2.0, 32).ok
    assert not compare("logits", bad, truth, good, 2.0, 32).ok


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_paper_mode_bare_model(family):
    """The bare *Model (no LM head): the decoder's last hidden state against the reference's."""
    model = build(family, bare=True)
    ref = eager_copy(model)
    handle = apply(model, prefix_sites="paper", num_virtual_tokens=4)
    inputs = _inputs(build(family), "right")
    keep = inputs["decoder_attention_mask"].bool()
    with torch.no_grad():
        ours = model(**inputs).last_hidden_state[keep]
        doubled = {s: t.double() for s, t in handle.site_prefixes().items()}
        truth = reference_forward(copy.deepcopy(ref).double(), doubled, **inputs).last_hidden_state[keep]
        base = reference_forward(ref, handle.site_prefixes(), **inputs).last_hidden_state[keep]
    assert compare("hidden", ours, truth, base, 2.0, 32).ok


@pytest.mark.parametrize("family", SEQ2SEQ)
@pytest.mark.parametrize("beams", [1, 3])
def test_paper_mode_generates_the_reference_tokens(family, beams):
    """generate() (greedy, and beam search with EncoderDecoderCache) gives the tokens of the reference, which
    recomputes every step without a cache."""
    model, ref, handle = _paper(family, P=6)
    ids, mask, _ = batch(padding="right")
    options = {"max_new_tokens": 6, "do_sample": False, "num_beams": beams}
    with torch.no_grad():
        ours = model.generate(input_ids=ids, attention_mask=mask, **options)
        plain = copy.deepcopy(ref).generate(input_ids=ids, attention_mask=mask, **options)
    theirs = reference_generate(ref, {s: t.detach() for s, t in handle.site_prefixes().items()}, input_ids=ids,
                                attention_mask=mask, **options)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, plain)  # the prefix changes the tokens


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_remove_restores_the_model(family):
    model = build(family)
    before = copy.deepcopy(model)
    handle = apply(model, prefix_sites="paper")
    inputs = _inputs(model, "right")
    handle.remove()
    assert set(model.state_dict()) == set(before.state_dict())
    assert all(torch.equal(v, before.state_dict()[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before(**inputs).logits)


def test_triton_interpreter_bart():
    """The Triton kernels (attention and the prefix MLP, in the CPU interpreter) inside a paper-mode BART of one
    layer per stack (d_model 64: heads of 16, the kernels' smallest head dim)."""
    import warnings

    model = build("bart", d_model=64, encoder_layers=1, decoder_layers=1)
    ref = eager_copy(model)
    handle = apply(model, prefix_sites="paper", backend="auto", num_virtual_tokens=3, prefix_projection=True,
                   encoder_hidden_size=16)
    ids, mask, labels = batch(batch_size=2, src_len=5, tgt_len=3, padding="left")
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = compare_with_seq2seq_reference(model, ref, handle, inputs)
    fallbacks = [str(w.message) for w in caught if "prefix_attention: using the 'torch' backend" in str(w.message)]
    assert not fallbacks, fallbacks  # our forward ran the Triton attention
    _check(results)


def test_site_split_is_the_encoder_output():
    """site_prefixes() is the one encoder output cut encoder, decoder, cross (what the comparisons assume)."""
    model, _, handle = _paper("bart")
    sites = handle.site_prefixes()
    assert list(sites) == ["encoder", "decoder", "cross"]
    with torch.no_grad():
        cut = split_sites(handle.prefix_encoder(), {s: t.shape[0] for s, t in sites.items()})
    assert all(torch.equal(cut[s], sites[s]) for s in sites)

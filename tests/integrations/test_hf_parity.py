"""Every family against the eager reference: the same model with the prefix injected PEFT's way (a DynamicCache
holding it, ones prepended to the mask, positions shifted by P, eager attention). Outputs at real tokens and every
prefix-encoder gradient, under the tolerance rule of prefix_kernels.testing (truth: the reference in fp64;
baseline: the reference in fp32). The torch backend serves these tests; test_triton_interpreter runs the Triton
kernels (in the CPU interpreter) inside two of the models.
"""

import pytest
import torch

from .models import DECODERS, apply, batch, build, eager_copy, outputs, parity, real


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_decoder_matches_eager_reference(family, padding):
    model = build(family)
    ref = eager_copy(model)
    handle = apply(model, prefix_projection=family in ("llama", "gpt2", "bloom"), encoder_hidden_size=24)
    ids, mask = batch(padding=padding)
    parity(model, ref, handle, ids, mask)


@pytest.mark.parametrize("head", ["seq_cls", "token_cls", "qa"])
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoder_tasks_match_eager_reference(family, head):
    """P-Tuning v2's tasks. PEFT's own path raises for these with transformers 5.24 / peft 0.21.2."""
    model = build(family, head)
    ref = eager_copy(model)
    handle = apply(model, prefix_projection=True, encoder_hidden_size=24, num_virtual_tokens=5)
    ids, mask = batch(padding="right")
    parity(model, ref, handle, ids, mask)


def test_explicit_position_ids_are_shifted_as_peft_does():
    model = build("llama")
    ref = eager_copy(model)
    handle = apply(model)
    ids, mask = batch(padding=None)
    positions = torch.arange(9).flip(0).unsqueeze(0).expand(3, -1)  # any explicit ids: PEFT adds P to them
    parity(model, ref, handle, ids, mask, position_ids=positions)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_positions_from_zero(family):
    """shift_positions=False: the real tokens keep positions 0.. (explicit position ids in the reference)."""
    head = "seq_cls" if family == "bert" else "lm"
    model = build(family, head)
    ref = eager_copy(model)
    handle = apply(model, shift_positions=False)
    ids, mask = batch(padding="right")
    zero_based = torch.arange(9).unsqueeze(0).expand(3, -1) - handle.num_virtual_tokens  # the reference adds P
    ours = outputs(model(input_ids=ids, attention_mask=mask))
    from prefix_kernels.integrations.hf.reference import eager_forward

    with torch.no_grad():
        theirs = outputs(eager_forward(ref, handle.prefix(), ids, mask, position_ids=zero_based))
        shifted = outputs(eager_forward(ref, handle.prefix(), ids, mask))
    torch.testing.assert_close(real(ours, mask), real(theirs, mask), rtol=1e-5, atol=1e-5)
    assert (real(ours, mask) - real(shifted, mask)).abs().max() > 1e-3  # the option changes something


def test_bloom_alibi_positions_with_shift_off():
    """Bloom without the shift: prefix columns at ALiBi positions 0..P-1 and the real keys at 0.. as well."""
    model = build("bloom")
    handle = apply(model, shift_positions=False)
    ids, mask = batch(padding="left")
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        handle.state.shift_positions = True
        shifted = model(input_ids=ids, attention_mask=mask).logits
    assert (real(ours, mask) - real(shifted, mask)).abs().max() > 1e-4


def _window_reference(ref, prefix, ids, mask, window):
    """The eager model with an explicit 4D mask: the prefix visible to every query, the input keys causal within
    the window and not padded. This is the op's window semantics (PEFT's cache-held prefix instead slides out of
    the window once a query is W - P tokens past it)."""
    from prefix_kernels.integrations.hf.reference import cache_keyword, prefix_cache

    B, L = ids.shape
    P = prefix.shape[-2]
    i = torch.arange(L).view(L, 1)
    j = torch.arange(L).view(1, L)

    def additive(w):
        inputs = (j <= i) & (j > i - w) & mask.bool().view(B, 1, 1, L)
        visible = torch.cat([torch.ones(B, 1, L, P, dtype=torch.bool), inputs.expand(B, 1, L, L)], dim=-1)
        return torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)

    masks = additive(window)
    if "full_attention" in getattr(ref.config, "layer_types", ()):  # Gemma 2: only its sliding layers slide
        masks = {"sliding_attention": masks, "full_attention": additive(L + 1)}
    positions = torch.arange(L).unsqueeze(0).expand(B, -1) + P
    return ref(input_ids=ids, attention_mask=masks, position_ids=positions,
               **{cache_keyword(ref): prefix_cache(ref, prefix, B, layer_types=False)}).logits


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_keeps_the_prefix_visible(family):
    model = build(family, sliding_window=3)
    ref = eager_copy(model)
    handle = apply(model, num_virtual_tokens=4)
    ids, mask = batch(padding="right")
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = _window_reference(ref, handle.prefix(), ids, mask, window=3)
        unwindowed = _window_reference(ref, handle.prefix(), ids, mask, window=100)
    torch.testing.assert_close(real(ours, mask), real(theirs, mask), rtol=1e-5, atol=1e-5)
    assert (real(ours, mask) - real(unwindowed, mask)).abs().max() > 1e-3  # the window matters here


@pytest.mark.parametrize("family,head", [("bert", "seq_cls"), ("llama", "lm")])
def test_triton_interpreter(family, head):
    """The Triton kernels (attention and the prefix MLP) inside a model: the CPU interpreter under pytest."""
    from prefix_kernels.integrations.hf.reference import eager_forward

    model = build(family, head)
    ref = eager_copy(model)
    handle = apply(model, backend="auto", prefix_projection=True, encoder_hidden_size=16)
    assert handle.state.backend == "auto"
    ids, mask = batch(batch_size=2, length=5, padding="left")
    ours = outputs(model(input_ids=ids, attention_mask=mask))
    ours.float().square().sum().backward()
    grads = [p.grad.clone() for p in handle.prefix_encoder.parameters()]
    handle.prefix_encoder.zero_grad()
    theirs = outputs(eager_forward(ref, handle.prefix(), ids, mask))
    theirs.float().square().sum().backward()
    torch.testing.assert_close(real(ours, mask), real(theirs, mask), rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, (p.grad for p in handle.prefix_encoder.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,head,padding", [("opt", "lm", "left"), ("opt", "lm", "right"),
                                                 ("roberta", "token_cls", "right"), ("gpt2", "lm", "left")])
def test_pad_tokens_match_too(family, head, padding):
    """Even the outputs at pad tokens are PEFT's: their positions keep the family's pad marker (OPT: -1 before
    its offset of 2, RoBERTa: padding_idx) instead of being shifted."""
    from prefix_kernels.integrations.hf.reference import eager_forward

    model = build(family, head)
    ref = eager_copy(model)
    handle = apply(model)
    ids, mask = batch(padding=padding)
    with torch.no_grad():
        ours = outputs(model(input_ids=ids, attention_mask=mask))
        theirs = outputs(eager_forward(ref, handle.prefix(), ids, mask))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

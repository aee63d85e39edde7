"""Encoder-decoder prefix tuning, the mechanism: the sites and their layout in the one prefix, a gradient on every
site, the base model back exactly (disabled, removed), generate() against a step-by-step decode of our own forward
with the caches holding no prefix, prefix banks row by row, adapter round trips in both modes, gradient
checkpointing, bf16 autocast under the tolerance rule, the errors. Parity with PEFT and with the paper's eager
reference: test_seq2seq_parity.py and test_seq2seq_peft.py."""

import json
import os
import warnings

import pytest
import torch

import prefix_kernels as pk
from prefix_kernels.integrations.hf.seq2seq_reference import reference_forward

from .models import (
    SEQ2SEQ,
    assert_rule,
    build_seq2seq,
    checkpointing_enable,
    seq2seq_batch,
)
from .test_hf_mechanism import _assert_same, _snapshot


def _apply(model, **config):
    config.setdefault("num_virtual_tokens", 3)
    config.setdefault("backend", "torch")
    return pk.apply_prefix_tuning(model, pk.PrefixConfig(**config))


def _randomize(handle, seed=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.prefix_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _site_grads(handle) -> dict[str, torch.Tensor]:
    """Each site's share of the table's gradient (no projection): ``[layers of the site]`` summed |grad|."""
    encoder = handle.prefix_encoder
    grad = encoder.embedding.weight.grad.view(encoder.num_virtual_tokens, encoder.num_layers, -1)
    per_layer = grad.abs().sum(dim=(0, 2))
    return {site: per_layer[start:start + count] for site, (start, count) in handle.layout.spans.items()}


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_sites_layout_and_site_prefixes(family):
    model = build_seq2seq(family)
    handle = _apply(model)
    assert list(handle.layout.spans) == ["encoder", "decoder", "cross"]
    assert handle.prefix().shape == (6, 2, 4, 3, 16)
    sites = handle.site_prefixes()
    assert list(sites) == ["encoder", "decoder", "cross"]
    flat = handle.prefix()
    for i, site in enumerate(sites):
        assert sites[site].shape == (2, 2, 4, 3, 16)
        assert torch.equal(sites[site], flat[2 * i:2 * i + 2])
    handle.remove()
    handle = _apply(model, prefix_sites="peft")
    assert list(handle.layout.spans) == ["decoder"] and handle.prefix().shape == (2, 2, 4, 3, 16)
    # PEFT 0.21's mapping: decoder layer i reads table layer 2 i mod L (L = 2: both read layer 0)
    assert torch.equal(handle.site_prefixes()["decoder"], handle.prefix()[[0, 0]])


@pytest.mark.parametrize("family", SEQ2SEQ)
@pytest.mark.parametrize("sites", ["paper", "peft"])
def test_every_site_gets_a_gradient(family, sites):
    model = build_seq2seq(family)
    handle = _apply(model, prefix_sites=sites)
    calls = []
    handle.prefix_encoder.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    out = model(**seq2seq_batch())
    assert len(calls) == 1  # one prefix-encoder call per forward, for every site
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = _site_grads(handle)
    if sites == "paper":
        for site, g in grads.items():
            assert bool((g > 0).all()), f"{site}: {g}"
    else:  # PEFT's mapping reads table layer 0 only (L = 2): layer 1 is never read, as in PEFT
        assert grads["decoder"][0] > 0 and grads["decoder"][1] == 0


@pytest.mark.parametrize("family", (*SEQ2SEQ, "mt5", "marian", "pegasus"))
def test_disabled_and_removed_give_the_base_model_exactly(family):
    model = build_seq2seq(family)
    inputs = seq2seq_batch()
    before = _snapshot(model)
    base = _logits(model, inputs)
    handle = _apply(model, prefix_projection=True)
    model.train()
    model(**inputs).loss.backward()
    torch.optim.SGD(handle.trainable_parameters(), lr=1.0).step()
    model.eval()
    prefixed = _logits(model, inputs)
    assert (prefixed - base).abs().max() > 1e-3  # the prefix changes the output
    with handle.disabled():
        assert torch.equal(_logits(model, inputs), base)
    handle.remove()
    _assert_same(before, _snapshot(model))
    assert torch.equal(_logits(model, inputs), base)


def _stepwise_greedy(model, inputs, steps):
    start = model.generation_config.decoder_start_token_id
    tokens = torch.full((inputs["input_ids"].shape[0], 1), start)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           decoder_input_ids=tokens, use_cache=False).logits[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("family", (*SEQ2SEQ, "marian", "pegasus"))
@pytest.mark.parametrize("sites", ["paper", "peft"])
def test_generate_is_our_stepwise_decode(family, sites):
    """Greedy generate() (cached decoder) gives the tokens of a step-by-step greedy decode of our own uncached
    forward; the self-attention cache holds the generated tokens only and the cross-attention cache the encoder's
    keys only (the prefix is in no cache). Beam search returns scores equal to the sums of our forward's token
    log-probabilities."""
    model = build_seq2seq(family)
    handle = _apply(model, prefix_sites=sites)
    _randomize(handle)
    inputs = seq2seq_batch()
    source = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    expected = _stepwise_greedy(model, inputs, 5)
    with handle.disabled():
        assert not torch.equal(_stepwise_greedy(model, inputs, 5), expected)  # the prefix moved the tokens
    out = model.generate(**source, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    cache = out.past_key_values
    assert cache.self_attention_cache.get_seq_length() == 5
    assert cache.cross_attention_cache.layers[0].keys.shape[2] == inputs["input_ids"].shape[1]

    beams = model.generate(**source, max_new_tokens=4, num_beams=3, do_sample=False, length_penalty=0.0,
                           return_dict_in_generate=True, output_scores=True)
    sequences = beams.sequences
    with torch.no_grad():
        logits = model(**source, decoder_input_ids=sequences[:, :-1], use_cache=False).logits
    rescored = logits.log_softmax(-1).gather(-1, sequences[:, 1:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(beams.sequences_scores, rescored, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_bank_rows_are_their_single_prefix_models(family):
    """A bank of prefixes of two lengths (per-row positions and T5 biases) with one row per prefix and one
    without: each row computes what the model computes for it alone with that row's selection, and the row
    without a prefix what the base model computes."""
    model = build_seq2seq(family)
    inputs = seq2seq_batch()
    base = _logits(model, inputs)
    handle = pk.apply_prefix_tuning(model, {"a": pk.PrefixConfig(2, backend="torch"),
                                            "b": pk.PrefixConfig(4, backend="torch")})
    _randomize(handle)
    with handle.use_prefix(["a", "b", None]):
        together = _logits(model, inputs)
    for row, name in enumerate(["a", "b", None]):
        alone = {k: v[row:row + 1] for k, v in inputs.items()}
        with handle.use_prefix([name]):
            single = _logits(model, alone)
        torch.testing.assert_close(together[row:row + 1], single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[2], base[2], rtol=1e-5, atol=1e-5)
    assert (together[0] - base[0]).abs().max() > 1e-3
    source = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with handle.use_prefix(["a", "b", None]):
        beams = model.generate(**source, max_new_tokens=3, num_beams=2, do_sample=False)
    assert beams.shape == (3, 4)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_adapter_round_trip_paper_mode(family, tmp_path):
    """prefix_sites="paper": save_peft_adapter warns that PEFT cannot load what it writes (no adapter_config.json,
    so PEFT refuses it), and both pk.from_pretrained and load_peft_adapter reload it exactly."""
    model = build_seq2seq(family)
    inputs = seq2seq_batch()
    handle = _apply(model, prefix_projection=True)
    _randomize(handle, scale=0.5)
    expected = _logits(model, inputs)
    with pytest.warns(UserWarning, match="PEFT cannot load it"):
        handle.save_peft_adapter(tmp_path / "adapter")
    assert not os.path.exists(tmp_path / "adapter" / "adapter_config.json")
    handle.remove()
    for load in (lambda m: pk.from_pretrained(m, tmp_path / "adapter"),
                 lambda m: pk.load_peft_adapter(m, tmp_path / "adapter")):
        fresh = build_seq2seq(family)
        again = load(fresh)
        assert list(again.layout.spans) == ["encoder", "decoder", "cross"]
        assert torch.equal(_logits(fresh, inputs), expected)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_adapter_round_trip_peft_mode(family, tmp_path):
    """prefix_sites="peft": a PEFT seq2seq adapter (num_transformer_submodules 2, SEQ_2_SEQ_LM) that loads back
    to the same logits, and that PEFT itself loads to the same prefix table."""
    model = build_seq2seq(family)
    inputs = seq2seq_batch()
    handle = _apply(model, prefix_sites="peft")
    _randomize(handle)
    expected = _logits(model, inputs)
    handle.save_peft_adapter(tmp_path / "adapter")
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        config = json.load(f)
    assert (config["num_transformer_submodules"], config["task_type"], config["num_layers"]) == (2, "SEQ_2_SEQ_LM", 2)
    table = handle.prefix_encoder.embedding.weight.detach().clone()
    handle.remove()
    again = pk.load_peft_adapter(model, tmp_path / "adapter", backend="torch")
    assert again.config.prefix_sites == "peft"
    assert torch.equal(_logits(model, inputs), expected)
    again.remove()
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(build_seq2seq(family), tmp_path / "adapter")
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, table)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_gradient_checkpointing_gives_the_same_gradients(family):
    model = build_seq2seq(family)
    handle = _apply(model, prefix_projection=True, encoder_hidden_size=24)
    model.train()
    inputs = seq2seq_batch()
    model(**inputs).loss.backward()
    expected = [p.grad.clone() for p in handle.prefix_encoder.parameters()]
    model.zero_grad()
    checkpointing_enable(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "use_cache=True is incompatible with gradient checkpointing"
        model(**inputs).loss.backward()
    for got, want in zip((p.grad for p in handle.prefix_encoder.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_bf16_autocast_is_as_close_as_the_eager_reference(family):
    """Under CPU bf16 autocast, the logits are as close to the fp64 truth (the eager reference with the same
    prefixes, in fp64) as the eager reference itself run under the same autocast (the tolerance rule)."""
    model = build_seq2seq(family)
    reference = build_seq2seq(family)
    reference.set_attn_implementation("eager")
    handle = _apply(model)
    _randomize(handle, scale=0.5)
    inputs = seq2seq_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model(**inputs).logits
        prefixes = handle.site_prefixes()
        baseline = reference_forward(reference, prefixes, **inputs).logits
    truth_model = reference.double()
    with torch.no_grad():
        truth = reference_forward(truth_model, {k: v.double() for k, v in handle.site_prefixes().items()},
                                  **inputs).logits
    assert (baseline.double() - truth).abs().max() > 1e-3  # autocast ran the reference in bf16
    assert_rule("logits", ours, truth, baseline)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_bare_models(family):
    model = build_seq2seq(family, head="bare")
    inputs = seq2seq_batch()
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
              "decoder_input_ids": inputs["input_ids"][:, :4]}
    with torch.no_grad():
        base = model(**inputs).last_hidden_state
    handle = _apply(model)
    _randomize(handle)
    with torch.no_grad():
        assert (model(**inputs).last_hidden_state - base).abs().max() > 1e-3
        with handle.disabled():
            assert torch.equal(model(**inputs).last_hidden_state, base)


def test_trainable_t5_position_bias_is_refused():
    """The op takes no gradient for T5's position bias: an unfrozen relative_attention_bias raises, naming it,
    rather than losing its gradient."""
    model = build_seq2seq("t5")
    _apply(model, freeze_base_model=False)
    model.train()
    with pytest.raises(ValueError, match="relative_attention_bias"):
        model(**seq2seq_batch())


def test_unsupported_encoder_decoder_families_still_raise():
    t = pytest.importorskip("transformers")
    config = t.M2M100Config(vocab_size=97, d_model=32, encoder_layers=1, decoder_layers=1,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                            decoder_ffn_dim=32, max_position_embeddings=32)
    model = t.M2M100ForConditionalGeneration(config)
    with pytest.raises(pk.UnsupportedModelError, match="m2m_100.*encoder self-attention"):
        _apply(model)
    encoder_only = t.T5EncoderModel(build_seq2seq("t5").config)
    with pytest.raises(pk.UnsupportedModelError, match="is_encoder_decoder=False"):
        _apply(encoder_only)
    with pytest.raises(ValueError, match="prefix_sites"):
        pk.PrefixConfig(3, prefix_sites="encoder")


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_triton_interpreter_matches_the_torch_backend(family):
    """One small case through the Triton kernels (interpreted on CPU): logits and prefix gradients match the torch
    backend's (T5: the position bias through the kernels' additive bias)."""
    results = []
    for backend in ("torch", "triton"):
        model = build_seq2seq(family)
        handle = _apply(model, num_virtual_tokens=2, backend=backend)
        _randomize(handle)
        model.train()
        inputs = seq2seq_batch(batch_size=2, length=5, target=3)
        out = model(**inputs)
        out.loss.backward()
        results.append((out.logits.detach(), handle.prefix_encoder.embedding.weight.grad.clone()))
    (logits_t, grad_t), (logits_k, grad_k) = results
    torch.testing.assert_close(logits_k, logits_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_k, grad_t, rtol=1e-4, atol=1e-4)


def test_prefix_sites_on_models_with_one_kind_of_attention():
    """Decoder-only and encoder-only models accept both modes, which mean the same there (their one site)."""
    from .models import batch, build

    ids, mask = batch()
    results = []
    for sites in (None, "paper", "peft"):
        model = build("llama")
        handle = _apply(model, prefix_sites=sites)
        assert handle.layout is None and list(handle.site_prefixes()) == ["decoder"]
        results.append(_logits(model, {"input_ids": ids, "attention_mask": mask}))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert list(_apply(build("bert", "seq_cls"), prefix_sites="peft").site_prefixes()) == ["encoder"]


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_generate_with_a_static_cache_and_without_a_cache(family):
    """A static cache (fixed-size self- and cross-attention buffers) and no cache give the tokens of our
    step-by-step decode too."""
    model = build_seq2seq(family)
    handle = _apply(model)
    _randomize(handle)
    inputs = seq2seq_batch()
    source = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    expected = _stepwise_greedy(model, inputs, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        static = model.generate(**source, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(static, expected)
    assert torch.equal(model.generate(**source, max_new_tokens=5, do_sample=False, use_cache=False), expected)

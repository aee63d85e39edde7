"""generate() on a CPU with the prefix put in the KV cache (integrations/hf/cached_generate.py): the same tokens
and logits as the fused path on every decoder family, and the fused path wherever the cache path would change
what is computed."""

import threading

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from prefix_kernels.integrations.hf import cached_generate

from .models import DECODERS, apply, batch, build

NEW_TOKENS = 5
# sliding-window layers (these test configs' defaults): their cache keeps the prefix inside the window
SLIDING = {"qwen2": {}, "mistral": {}, "gemma2": {}}
UNSLID = {"qwen2": {"max_window_layers": 2}, "mistral": {"sliding_window": None}}  # every layer full


class Record(LogitsProcessor):
    """Keeps each step's scores (the logits, before any other processor)."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


def _generate(model, ids, mask, **options):
    record = Record()
    options = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 1, **options}
    tokens = model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([record]),
                            **options)
    return tokens, torch.stack(record.scores, dim=1)


def _both(model, handle, ids, mask, monkeypatch, **options):
    """(cache path tokens, logits), (fused path tokens, logits), asserting that each path served its call."""
    cached = _generate(model, ids, mask, **options)
    assert handle.state.generate_reasons == [], handle.state.generate_reasons
    with monkeypatch.context() as m:
        m.setenv(cached_generate.ENV, "0")
        fused = _generate(model, ids, mask, **options)
    assert handle.state.generate_reasons == [f"{cached_generate.ENV}=0"]
    return cached, fused


def _strong(handle):
    with torch.no_grad():  # a prefix that changes the tokens of these tiny models
        handle.prefix_encoder.embedding.weight.normal_(0.0, 1.0)


@pytest.mark.parametrize("family", [f for f in DECODERS if f not in SLIDING] + list(UNSLID))
@pytest.mark.parametrize("padding", ["left", None])
def test_same_tokens_and_logits_as_the_fused_path(family, padding, monkeypatch):
    model = build(family, **UNSLID.get(family, {}))
    handle = apply(model, num_virtual_tokens=4)
    _strong(handle)
    ids, mask = batch(padding=padding)
    (tokens, logits), (fused_tokens, fused_logits) = _both(model, handle, ids, mask, monkeypatch)
    assert torch.equal(tokens, fused_tokens)
    torch.testing.assert_close(logits, fused_logits, rtol=1e-5, atol=1e-5)
    with handle.disabled():  # the prefix changed the logits: the cache path did not drop it
        _, plain = _generate(model, ids, mask)
    assert handle.state.generate_reasons == ["inside handle.disabled()"]
    assert (plain[:, 0] - logits[:, 0]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_sampling_draws_the_same_tokens(family, monkeypatch):
    model = build(family)
    handle = apply(model, num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)
    ids, mask = batch(padding="left")
    torch.manual_seed(5)
    cached = _generate(model, ids, mask, do_sample=True, top_k=20, temperature=0.8)
    assert handle.state.generate_reasons == []
    with monkeypatch.context() as m:
        m.setenv(cached_generate.ENV, "0")
        torch.manual_seed(5)
        fused = _generate(model, ids, mask, do_sample=True, top_k=20, temperature=0.8)
    assert torch.equal(cached[0], fused[0])
    torch.testing.assert_close(cached[1], fused[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_sliding_window_layers_keep_the_fused_path(family):
    model = build(family)
    apply(model)
    ids, mask = batch(padding="left")
    _generate(model, ids, mask)
    assert any("DynamicLayer" in r for r in handle_of(model).state.generate_reasons)


def handle_of(model):
    import prefix_kernels as pk

    return pk.handle_of(model)


@pytest.mark.parametrize("options, reason", [
    ({"num_beams": 2}, "num_beams=2"),
    ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences=2"),
    ({"return_dict_in_generate": True}, "return_dict_in_generate=True"),
    ({"output_attentions": True, "return_dict_in_generate": True}, "output_attentions=True"),
    ({"use_cache": False}, "use_cache=False"),
    ({"cache_implementation": "static"}, "cache_implementation='static'"),
    ({"prefix_allowed_tokens_fn": lambda batch_id, ids: list(range(97))}, "prefix_allowed_tokens_fn"),
])
def test_declined_calls_name_why_and_match_the_fused_path(options, reason, monkeypatch):
    model = build("llama")
    handle = apply(model)
    _strong(handle)
    ids, mask = batch(padding="left")
    torch.manual_seed(3)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, pad_token_id=1, **options)
    assert any(reason in r for r in handle.state.generate_reasons), handle.state.generate_reasons
    with monkeypatch.context() as m:
        m.setenv(cached_generate.ENV, "0")
        torch.manual_seed(3)
        again = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, pad_token_id=1, **options)
    first = out.sequences if hasattr(out, "sequences") else out
    second = again.sequences if hasattr(again, "sequences") else again
    assert torch.equal(first, second)


def test_declined_without_a_mask_a_cache_or_in_training_mode():
    from transformers import DynamicCache

    model = build("llama")
    handle = apply(model)
    ids, mask = batch(padding=None)
    model.generate(input_ids=ids, max_new_tokens=2, pad_token_id=1)
    assert "no 2D attention_mask of the input_ids' shape" in handle.state.generate_reasons
    model.generate(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask, max_new_tokens=2,
                   pad_token_id=1)
    assert any("inputs_embeds" in r for r in handle.state.generate_reasons)
    name = cached_generate._cache_argument(type(model))
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=1,
                   **{name: DynamicCache(config=model.config)})
    assert any(name in r for r in handle.state.generate_reasons)
    handle.prefix_encoder.train()  # without prefix dropout, training mode changes nothing
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=1)
    assert handle.state.generate_reasons == []
    handle.remove()
    handle = apply(model, prefix_dropout=0.2)
    handle.prefix_encoder.train()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=1)
    assert "prefix dropout in training mode (a new mask per forward)" in handle.state.generate_reasons
    handle.prefix_encoder.eval()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=1)
    assert handle.state.generate_reasons == []


def test_a_bank_and_a_selection_keep_the_fused_path():
    import prefix_kernels as pk

    model = build("llama")
    handle = pk.apply_prefix_tuning(model, {"a": pk.PrefixConfig(num_virtual_tokens=3, backend="torch"),
                                            "b": pk.PrefixConfig(num_virtual_tokens=2, backend="torch")})
    ids, mask = batch(padding="left")
    with handle.use_prefix(["a", "b", None]):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=1)
    assert "a prefix bank or a row selection" in handle.state.generate_reasons


def test_forwards_after_it_carry_the_prefix_again():
    """The flag is per call: a forward after a cache-path generate() (or after one that raised) has its prefix,
    and a forward on another thread during one is not affected."""
    model = build("llama")
    handle = apply(model)
    _strong(handle)
    ids, mask = batch(padding="left")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        _generate(model, ids, mask)
        assert handle.state.generate_reasons == []
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=0)

    class Stop(LogitsProcessor):
        def __call__(self, input_ids, scores):
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=1,
                       logits_processor=LogitsProcessorList([Stop()]))
    assert not handle.state.prefix_in_cache()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=0)

    seen = {}

    class Probe(LogitsProcessor):  # runs inside the cache-path generate(): another thread's forward meanwhile
        def __call__(self, input_ids, scores):
            if not seen:
                def other():
                    with torch.no_grad():
                        seen["logits"] = model(input_ids=ids, attention_mask=mask).logits
                thread = threading.Thread(target=other)
                thread.start()
                thread.join()
            return scores

    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=1,
                   logits_processor=LogitsProcessorList([Probe()]))
    assert handle.state.generate_reasons == []
    torch.testing.assert_close(seen["logits"], before, rtol=0, atol=0)

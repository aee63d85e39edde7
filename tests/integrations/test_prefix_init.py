"""Prefix initialisation: from real tokens' keys and values (the prefix equals the base model's cache of those
tokens, and the prefix-tuned model computes what the base model computes with the tokens actually in front of
the input), and zeros."""

from __future__ import annotations

import copy

import pytest
import torch

from .models import VOCAB, apply, assert_rule, build, eager_copy

transformers = pytest.importorskip("transformers")

import prefix_kernels as pk  # noqa: E402
from prefix_kernels.integrations.hf.init import _layer_kv  # noqa: E402

P = 5


def _tokens(seed: int, *shape):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_prefix_from_tokens_is_their_cache_and_acts_as_them(family):
    model = build(family)
    plain = copy.deepcopy(model)
    ref = eager_copy(model)
    truth = copy.deepcopy(ref).double()
    tokens, x = _tokens(1, P), _tokens(2, 2, 7)
    handle = apply(model, num_virtual_tokens=P, shift_positions=True)
    pk.init_prefix_from_tokens(handle, tokens)

    with torch.no_grad():
        cache = plain.base_model(input_ids=tokens[None], use_cache=True).past_key_values
    prefix = handle.prefix()
    for layer in range(prefix.shape[0]):
        keys, values = _layer_kv(cache, layer)
        torch.testing.assert_close(prefix[layer, 0], keys[0], rtol=0, atol=0)
        torch.testing.assert_close(prefix[layer, 1], values[0], rtol=0, atol=0)

    full = torch.cat([tokens.expand(2, P), x], dim=1)
    with torch.no_grad():
        ours = model(input_ids=x).logits
        expected = truth(input_ids=full).logits[:, P:]
        baseline = ref(input_ids=full).logits[:, P:]
        without = plain(input_ids=x).logits
    assert_rule(f"{family} logits", ours, expected, baseline)
    assert (ours - expected).abs().max() < 0.1 * (without - expected).abs().max()  # the tokens matter


def test_prefix_from_tokens_of_one_bank_prefix():
    model = build("llama")
    handle = pk.apply_prefix_tuning(model, {"a": pk.PrefixConfig(3, backend="torch"),
                                            "b": pk.PrefixConfig(P, backend="torch")})
    other = handle.encoder_of("a").embedding.weight.detach().clone()
    tokens = _tokens(3, P)
    pk.init_prefix_from_tokens(handle, tokens, prefix="b")
    single = pk.apply_prefix_tuning(build("llama"), pk.PrefixConfig(P, backend="torch"))
    pk.init_prefix_from_tokens(single, tokens)
    torch.testing.assert_close(handle.encoder_of("b").embedding.weight, single.prefix_encoder.embedding.weight,
                               rtol=0, atol=0)
    torch.testing.assert_close(handle.encoder_of("a").embedding.weight, other, rtol=0, atol=0)


def test_prefix_from_tokens_refusals():
    handle = apply(build("llama"), num_virtual_tokens=P, prefix_projection=True)
    with pytest.raises(ValueError, match="prefix_projection=True"):
        pk.init_prefix_from_tokens(handle, _tokens(1, P))
    handle = apply(build("llama"), num_virtual_tokens=P)
    with pytest.raises(ValueError, match="num_virtual_tokens=5"):
        pk.init_prefix_from_tokens(handle, _tokens(1, P + 1))
    with pytest.raises(ValueError, match="one sequence"):
        pk.init_prefix_from_tokens(handle, _tokens(1, 2, P))
    handle = apply(build("bert", "seq_cls"), num_virtual_tokens=P)
    with pytest.raises(ValueError, match="no key/value cache"):
        pk.init_prefix_from_tokens(handle, _tokens(1, P))


@pytest.mark.parametrize("projection", [False, True])
def test_zero_init(projection):
    model = build("llama")
    handle = apply(model, num_virtual_tokens=P, prefix_projection=projection)
    pk.init_prefix_zeros(handle)
    assert torch.equal(handle.prefix(), torch.zeros_like(handle.prefix()))
    assert handle.prefix().abs().sum() == 0
    # it still learns: one step moves the prefix off zero
    opt = torch.optim.SGD(handle.trainable_parameters(), lr=0.1)
    model.train()
    loss = model(input_ids=_tokens(4, 2, 6), labels=_tokens(4, 2, 6)).loss
    loss.backward()
    opt.step()
    assert handle.prefix().abs().sum() > 0


def test_prefix_init_field_of_the_config():
    """PrefixConfig(prefix_init=...) does at apply time what the init functions do after it, per prefix of a bank;
    "random" leaves the encoder's own initialisation."""
    tokens = _tokens(5, P).tolist()
    by_field = pk.apply_prefix_tuning(build("llama"), pk.PrefixConfig(P, backend="torch", prefix_init=tokens))
    by_call = pk.apply_prefix_tuning(build("llama"), pk.PrefixConfig(P, backend="torch"))
    pk.init_prefix_from_tokens(by_call, tokens)
    assert torch.equal(by_field.prefix(), by_call.prefix())
    bank = pk.apply_prefix_tuning(build("llama"), {
        "z": pk.PrefixConfig(3, backend="torch", prefix_init="zeros"),
        "t": pk.PrefixConfig(P, backend="torch", prefix_init=torch.tensor(tokens)),
        "r": pk.PrefixConfig(2, backend="torch")})
    assert bank.encoder_of("z").embedding.weight.abs().sum() == 0
    assert torch.equal(bank.encoder_of("t").embedding.weight, by_call.prefix_encoder.embedding.weight)
    assert bank.encoder_of("r").embedding.weight.abs().sum() > 0
    projected = pk.apply_prefix_tuning(build("llama"), pk.PrefixConfig(P, prefix_projection=True, backend="torch",
                                                                        prefix_init="zeros"))
    assert projected.prefix().abs().sum() == 0


def test_prefix_init_field_refusals():
    with pytest.raises(ValueError, match="prefix_init"):
        pk.PrefixConfig(P, prefix_init="ones")
    with pytest.raises(ValueError, match="num_virtual_tokens=5"):
        pk.PrefixConfig(P, prefix_init=[1, 2, 3])
    with pytest.raises(TypeError, match="prefix_init"):
        pk.PrefixConfig(P, prefix_init=[1.5] * P)
    model = build("llama")
    with pytest.raises(ValueError, match="prefix_projection=True"):  # a clear refusal, and nothing left applied
        pk.apply_prefix_tuning(model, pk.PrefixConfig(P, prefix_projection=True, prefix_init=[3] * P))
    with pytest.raises(ValueError, match="not prefix-tuned"):
        pk.handle_of(model)

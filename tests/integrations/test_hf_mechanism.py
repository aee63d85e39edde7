"""The mechanism: what apply_prefix_tuning changes on the model, and that remove() undoes exactly that; the
encoder as a submodule; one slot per attention module; the prefix once per forward; the padding mask reaching the
kernels as [B, Lk]; delegation to the previous attention; errors."""

import copy

import pytest
import torch

import prefix_kernels as pk
from prefix_kernels.integrations.hf import attention as hf_attention
from prefix_kernels.integrations.hf.masks import PrefixMask
from prefix_kernels.integrations.hf.reference import cache_keyword, eager_forward, prefix_cache

from .models import apply, batch, build, eager_copy, outputs, real


def _snapshot(model):
    """Everything remove() must restore: parameters and buffers (values, flags), every module's instance
    attributes, hooks and children, and the attention implementation of every config."""
    modules = {}
    for name, m in model.named_modules():
        modules[name] = (type(m), m, sorted(m.__dict__), len(m._forward_pre_hooks), len(m._forward_hooks),
                         dict(m._modules))
    configs = {id(m.config): m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return modules, configs, state, flags


def _assert_same(before, after):
    mods_b, cfg_b, state_b, flags_b = before
    mods_a, cfg_a, state_a, flags_a = after
    assert mods_b.keys() == mods_a.keys()
    for name in mods_b:
        tb, mb, db, prb, fb, cb = mods_b[name]
        ta, ma, da, pra, fa, ca = mods_a[name]
        assert (tb, db, prb, fb) == (ta, da, pra, fa), name
        assert mb is ma and all(cb[k] is ca[k] for k in cb) and cb.keys() == ca.keys(), name
    assert cfg_b == cfg_a
    assert state_b.keys() == state_a.keys() and all(torch.equal(state_b[k], state_a[k]) for k in state_b)
    assert flags_b == flags_a


@pytest.mark.parametrize("family,head", [("bert", "seq_cls"), ("llama", "lm"), ("bloom", "lm"), ("roberta", "qa")])
def test_remove_restores_exactly(family, head):
    model = build(family, head)
    ids, mask = batch()
    before = _snapshot(model)
    with torch.no_grad():
        expected = outputs(model(input_ids=ids, attention_mask=mask))
    handle = apply(model, prefix_projection=True)
    model.train()
    outputs(model(input_ids=ids, attention_mask=mask)).sum().backward()
    torch.optim.SGD(handle.trainable_parameters(), lr=1.0).step()  # train the prefix and the head copy
    model.eval()
    assert handle.active
    handle.remove()
    assert not handle.active
    handle.remove()  # idempotent
    _assert_same(before, _snapshot(model))
    with torch.no_grad():
        assert torch.equal(outputs(model(input_ids=ids, attention_mask=mask)), expected)


def test_encoder_is_a_submodule_and_only_it_and_the_head_train():
    model = build("bert", "seq_cls")
    handle = apply(model, prefix_projection=True, encoder_hidden_size=24)
    assert model.prefix_encoder is handle.prefix_encoder
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["classifier.bias", "classifier.weight", "prefix_encoder.embedding.weight",
                         "prefix_encoder.transform.0.bias", "prefix_encoder.transform.0.weight",
                         "prefix_encoder.transform.2.bias", "prefix_encoder.transform.2.weight"]
    assert "prefix_encoder.transform.2.weight" in model.state_dict()
    assert list(handle.modules_to_save) == ["classifier"]
    model.to(torch.float64)
    assert handle.prefix_encoder.embedding.weight.dtype == torch.float64
    ids, mask = batch()
    assert model(input_ids=ids, attention_mask=mask).logits.dtype == torch.float64


def test_each_attention_module_holds_its_own_slot():
    model = build("llama")
    handle = apply(model)
    slots = [layer.self_attn._prefix_kernels_slot for layer in model.model.layers]
    assert [s.index for s in slots] == [0, 1]
    assert all(s.state is handle.state and s.previous == "sdpa" for s in slots)
    assert model.config._attn_implementation == "prefix_kernels"


def test_prefix_computed_once_per_forward_and_the_mask_stays_2d(monkeypatch):
    model = build("llama")
    handle = apply(model, prefix_projection=True)
    calls, masks = [], []
    handle.prefix_encoder.register_forward_hook(lambda *a: calls.append(1))
    real_op = hf_attention.prefix_attention

    def spy(q, k, v, pk_, pv_, **kw):
        masks.append(kw["key_padding_mask"])
        assert pk_.shape == (2, 3, 16) and pk_.dim() == 3  # [Hkv, P, D], shared by the batch
        return real_op(q, k, v, pk_, pv_, **kw)

    monkeypatch.setattr(hf_attention, "prefix_attention", spy)
    ids, mask = batch(batch_size=3, length=9)
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert len(calls) == 1
    assert len(masks) == 2 and all(m.shape == (3, 9) and m.dtype == torch.bool for m in masks)
    assert torch.equal(masks[0], mask.bool())


def test_disabled_is_the_model_before():
    model = build("gpt2")
    ids, mask = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        handle = apply(model)
        with handle.disabled():
            off = model(input_ids=ids, attention_mask=mask).logits
        on = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(off, before)
    assert (on - before).abs().max() > 1e-3


def test_cross_attention_delegates_to_the_previous_implementation():
    """GPT-2 with cross-attention: the self-attention takes the prefix; the cross-attention's slot only names the
    model's previous implementation (sdpa), which serves it with the mask it expects."""
    from transformers import DynamicCache, EncoderDecoderCache

    model = build("gpt2", add_cross_attention=True)
    ref = eager_copy(model)
    handle = apply(model)
    ids, mask = batch(padding="right")
    memory = torch.randn(3, 5, 64)
    memory_mask = torch.ones(3, 5, dtype=torch.long)
    memory_mask[1, 3:] = 0
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, encoder_hidden_states=memory,
                     encoder_attention_mask=memory_mask).logits
        cache = EncoderDecoderCache(prefix_cache(ref, handle.prefix(), 3), DynamicCache())
        ones = torch.ones(3, 3, dtype=torch.long)
        theirs = ref(input_ids=ids, attention_mask=torch.cat([ones, mask], 1), **{cache_keyword(ref): cache},
                     encoder_hidden_states=memory, encoder_attention_mask=memory_mask).logits
    torch.testing.assert_close(real(ours, mask), real(theirs, mask), rtol=1e-5, atol=1e-5)


def test_packed_sequences_take_the_dense_path():
    """position_ids that restart (packed sequences, no attention mask): transformers builds a block-diagonal
    mask, which the kernels cannot take; the explicit path serves it, with the prefix visible to every block."""
    model = build("llama")
    ref = eager_copy(model)
    handle = apply(model)
    ids, _ = batch(batch_size=1, padding=None)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    with torch.no_grad():  # without a cache, as in training: transformers looks for packing only then
        ours = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        doc = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
        same = (doc.view(9, 1) == doc.view(1, 9)) & (torch.arange(9).view(1, 9) <= torch.arange(9).view(9, 1))
        visible = torch.cat([torch.ones(9, 3, dtype=torch.bool), same], dim=1).view(1, 1, 9, 12)
        additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
        theirs = ref(input_ids=ids, attention_mask=additive, position_ids=positions + 3,
                     **{cache_keyword(ref): prefix_cache(ref, handle.prefix(), 1)}).logits
        plain = eager_forward(ref, handle.prefix(), ids, torch.ones(1, 9, dtype=torch.long), position_ids=positions)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - plain.logits).abs().max() > 1e-3  # the blocks matter


def test_mask_function_geometry():
    """The mask function on its own: the padding mask sliced to the keys in use; a static cache's prefill keeps
    only the filled slots; its decode step (fill level a tensor) masks the rest instead."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    from prefix_kernels.integrations.hf.masks import prefix_mask_interface

    pad = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    m = prefix_mask_interface(2, 5, 5, 0, 0, causal_mask_function, pad)
    assert m.causal and m.kv_end == 5 and torch.equal(m.key_padding_mask, pad) and m.dense is None
    m = prefix_mask_interface(2, 5, 8, 0, 0, causal_mask_function, pad)  # static prefill: 8 slots, 5 filled
    assert m.kv_end == 5 and torch.equal(m.key_padding_mask, pad)
    m = prefix_mask_interface(2, 1, 8, torch.tensor(5), 0, causal_mask_function, torch.ones(2, 6, dtype=torch.bool))
    assert m.kv_end == 8 and m.key_padding_mask.tolist() == [[True] * 6 + [False] * 2] * 2
    window = sliding_window_causal_mask_function(3)
    m = prefix_mask_interface(1, 1, 8, torch.tensor(5), 0, window, None, local_size=3)
    assert m.key_padding_mask.tolist() == [[False] * 3 + [True] * 3 + [False] * 2] and m.sliding_window is None
    m = prefix_mask_interface(1, 4, 4, 0, 0, window, None, local_size=3)
    assert m.sliding_window == 3 and m.key_padding_mask is None
    two_pads = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    m = prefix_mask_interface(2, 2, 4, 2, 1, causal_mask_function, two_pads)
    assert m.kv_end == 3 and m.key_padding_mask.tolist() == [[False, True, True], [True] * 3]  # keys at 1..3
    m = prefix_mask_interface(2, 2, 4, 2, 1, causal_mask_function, torch.ones(2, 5, dtype=torch.bool))
    assert m.kv_end == 3 and m.key_padding_mask is None  # a CPU mask that keeps every key is dropped
    assert isinstance(m, PrefixMask)


def test_guard_when_the_attention_never_runs():
    model = build("llama")
    apply(model)
    model.config._attn_implementation_internal = "eager"  # changed behind the handle's back
    ids, mask = batch()
    with pytest.raises(RuntimeError, match="reached no attention layer"):
        model(input_ids=ids, attention_mask=mask)


def test_errors():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, M2M100Config, M2M100ForConditionalGeneration

    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32))
    with pytest.raises(pk.UnsupportedModelError, match=r"GPTNeoXForCausalLM \(model_type 'gpt_neox'\).*Supported"):
        apply(neox)
    m2m = M2M100ForConditionalGeneration(M2M100Config(vocab_size=32, d_model=32, encoder_layers=1, decoder_layers=1,
                                                      encoder_attention_heads=2, decoder_attention_heads=2,
                                                      encoder_ffn_dim=32, decoder_ffn_dim=32))
    with pytest.raises(pk.UnsupportedModelError, match="M2M100ForConditionalGeneration.*encoder-decoder"):
        apply(m2m)  # T5 and BART are served (test_seq2seq_mechanism.py); an encoder-decoder family without an adapter
    with pytest.raises(TypeError, match="PreTrainedModel"):
        apply(torch.nn.Linear(2, 2))
    model = build("roberta", "seq_cls")
    with pytest.raises(TypeError, match="PrefixConfig"):
        pk.apply_prefix_tuning(model, {"num_virtual_tokens": 3})
    with pytest.raises(ValueError, match="learned positions"):
        apply(model, num_virtual_tokens=38)  # RoBERTa here has 40 positions, the first two for padding
    with pytest.raises(ValueError, match=r"modules_to_save \['pooler_head'\]"):
        apply(model, modules_to_save=["pooler_head"])
    before = _snapshot(model)
    handle = apply(model)
    with pytest.raises(ValueError, match="already prefix-tuned"):
        apply(model)
    handle.remove()
    _assert_same(before, _snapshot(model))  # the failed attempts left nothing behind
    with pytest.raises(RuntimeError, match="removed"), handle.disabled():
        pass


@pytest.mark.parametrize("kwargs,error,match", [
    ({"num_virtual_tokens": 0}, ValueError, "num_virtual_tokens must be >= 1"),
    ({"num_virtual_tokens": 2.0}, TypeError, "num_virtual_tokens must be an int"),
    ({"num_virtual_tokens": 2, "prefix_dropout": 1.0}, ValueError, "prefix_dropout"),
    ({"num_virtual_tokens": 2, "encoder_hidden_size": 0}, ValueError, "encoder_hidden_size"),
    ({"num_virtual_tokens": 2, "modules_to_save": 3}, TypeError, "modules_to_save"),
    ({"num_virtual_tokens": 2, "shift_positions": "yes"}, TypeError, "shift_positions must be a bool"),
    ({"num_virtual_tokens": 2, "encoder_dtype": torch.int32}, TypeError, "encoder_dtype"),
])
def test_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        pk.PrefixConfig(**kwargs)


def test_user_4d_mask_takes_the_dense_path():
    model = build("llama")
    ref = eager_copy(model)
    handle = apply(model)
    ids, _ = batch(batch_size=2, padding=None)
    keep = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(0)) > 0.3
    keep |= torch.eye(9, dtype=torch.bool)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=additive).logits
        full = torch.cat([torch.zeros(2, 1, 9, 3), additive], dim=-1)
        theirs = ref(input_ids=ids, attention_mask=full, position_ids=torch.arange(9).expand(2, -1) + 3,
                     **{cache_keyword(ref): prefix_cache(ref, handle.prefix(), 2)}).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_handle_repr_and_prefix_layout():
    model = build("qwen3")
    handle = apply(model, num_virtual_tokens=5)
    assert "Qwen3" in repr(handle) and "active" in repr(handle)
    assert handle.prefix().shape == (2, 2, 1, 5, 32)  # [layers, k/v, kv heads, P, head_dim]
    copy.deepcopy(handle.prefix_encoder)  # the encoder stays a plain module


def test_import_stays_light():
    """`import prefix_kernels` does not import transformers; the integration loads on first use."""
    import subprocess
    import sys

    code = "import sys, prefix_kernels as pk\nprint('transformers' in sys.modules, 'apply_prefix_tuning' in dir(pk))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_slots_delegate_to_the_previous_implementation(family):
    """With the state off but our attention still named, every layer is served by the previous implementation
    (whichever the model had: sdpa, or eager for Gemma 2 on transformers 5.24) with that implementation's own
    mask, built from the same arguments."""
    model = build(family)
    ids, mask = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        handle = apply(model)
        handle.state.enabled = False
        delegated = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "prefix_kernels"
    torch.testing.assert_close(real(delegated, mask), real(before, mask), rtol=1e-6, atol=1e-6)

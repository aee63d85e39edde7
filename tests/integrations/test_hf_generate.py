"""Greedy generate() on a left-padded batch: the same tokens as the eager reference (the prefix held in the
cache, PEFT's way) and as PEFT itself, with a DynamicCache and a StaticCache; the cache holds only real tokens."""

import copy

import pytest
import torch

from prefix_kernels.integrations.hf.reference import eager_greedy

from .models import DECODERS, apply, batch, build, eager_copy

NEW_TOKENS = 6


def _generate(model, ids, mask, cache_implementation):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          cache_implementation=cache_implementation, pad_token_id=1)


def _check_generate(model, ref, handle, ids, mask, cache_implementation):
    """Tokens equal to the eager reference's greedy tokens, and every step's logits close to its logits."""
    with torch.no_grad():
        tokens, logits = eager_greedy(ref, handle.prefix(), ids, torch.ones_like(ids) if mask is None else mask,
                                      NEW_TOKENS, return_logits=True)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         cache_implementation=cache_implementation, pad_token_id=1, return_dict_in_generate=True,
                         output_logits=True)
    assert torch.equal(out.sequences, tokens), cache_implementation
    torch.testing.assert_close(torch.stack(out.logits, dim=1), logits, rtol=1e-5, atol=1e-5)
    return tokens


@pytest.mark.parametrize("family", DECODERS)
def test_greedy_matches_eager_reference(family):
    model = build(family)
    ref = eager_copy(model)
    handle = apply(model)  # a table prefix: strong enough to change the tokens of these tiny models
    ids, mask = batch(padding="left")
    for cache in ("dynamic", "static"):
        expected = _check_generate(model, ref, handle, ids, mask, cache)
    with handle.disabled():  # and the prefix changed what was generated
        assert not torch.equal(_generate(model, ids, mask, "dynamic"), expected)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_static_cache_without_padding(family):
    """No padding: generate() drops the all-ones mask, and the static cache's unfilled slots are masked by their
    position alone (the fill level is a tensor during decoding)."""
    model = build(family)
    ref = eager_copy(model)
    handle = apply(model)
    ids, _ = batch(padding=None)
    _check_generate(model, ref, handle, ids, None, "static")


def test_cache_holds_only_real_tokens():
    model = build("llama")
    apply(model)
    ids, mask = batch(padding="left")
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=1, return_dict_in_generate=True)
    cache = out.past_key_values
    length = ids.shape[1] + NEW_TOKENS - 1  # the last token is generated, never fed back
    assert cache.get_seq_length() == length
    assert all(layer.keys.shape[-2] == length for layer in cache.layers)


def _peft_twin(base, handle):
    """PEFT's prefix tuning of ``base`` (a copy of the model before applying) with the handle's encoder weights."""
    peft = pytest.importorskip("peft")
    base.set_attn_implementation("eager")  # transformers 5.17's SDPA path silently drops Gemma 2's softcap
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=handle.num_virtual_tokens,
                                     prefix_projection=True, encoder_hidden_size=24)
    twin = peft.get_peft_model(base, config).eval()
    twin.prompt_encoder["default"].load_state_dict(handle.prefix_encoder.state_dict())
    return twin, peft.__version__


def _peft_greedy_agrees(twin, tokens, mask) -> bool:
    """Whether ``tokens`` (prompt + generated) are what greedy decoding under PEFT's forward would pick: the
    argmax of PEFT's teacher-forced logits at every generated position (with generate()'s position ids, which
    count real tokens only)."""
    full = torch.cat([mask, torch.ones(mask.shape[0], NEW_TOKENS, dtype=mask.dtype)], dim=1)
    positions = (full.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = twin(input_ids=tokens, attention_mask=full, position_ids=positions).logits
    length = mask.shape[1]
    return torch.equal(logits[:, length - 1:-1].argmax(-1), tokens[:, length:])


# PEFT's generate() raises for some families with some transformers versions: the errors seen.
KNOWN_PEFT_FAILURES = {"bloom": "The expanded size of the tensor"}


@pytest.mark.parametrize("family", DECODERS)
def test_greedy_matches_peft(family):
    """Our tokens are PEFT's greedy tokens: the argmax of PEFT's own (teacher-forced) forward at every step, and
    the tokens of PEFT's generate() wherever that is consistent with PEFT's forward. (With transformers 5.24 and
    peft 0.21.2 it is not: for a left-padded batch PEFT's generate() picks tokens its own forward does not; with
    transformers 5.17 it matches ours exactly.)"""
    model = build(family)
    base = copy.deepcopy(model)
    handle = apply(model, prefix_projection=True, encoder_hidden_size=24)
    twin, version = _peft_twin(base, handle)
    ids, mask = batch(padding="left")
    ours = _generate(model, ids, mask, "dynamic")
    assert _peft_greedy_agrees(twin, ours, mask)
    try:
        theirs = twin.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=1)
    except RuntimeError as e:
        if family in KNOWN_PEFT_FAILURES and KNOWN_PEFT_FAILURES[family] in str(e):
            pytest.skip(f"PEFT {version}'s generate() raises for {family} here: {e}")
        raise
    if not _peft_greedy_agrees(twin, theirs, mask):
        pytest.skip(f"PEFT {version}'s generate() picks tokens its own forward does not, with this transformers")
    assert torch.equal(ours, theirs)


# ------------------------------------------------------------------------------- planned decode steps (plan.py)
def _slots(model):
    from prefix_kernels.integrations.hf.attention import SLOT_ATTR
    from prefix_kernels.integrations.hf.state import PrefixSlot

    return [s for m in model.modules() if isinstance(s := getattr(m, SLOT_ATTR, None), PrefixSlot)]


def _with_logits(model, ids, mask, cache="dynamic"):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         cache_implementation=cache, pad_token_id=1, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("family,cache", [("llama", "dynamic"), ("bloom", "dynamic"), ("gemma2", "dynamic"),
                                          ("qwen2", "static")])
def test_decode_steps_replay_each_attentions_plan(family, cache, monkeypatch):
    """Each prefixed attention plans its first decode call and replays the plan for the later tokens (one prefill
    and one planning step, then NEW_TOKENS - 2 replays); a second generate() replays the prefill's plan too, and
    every decode step's; the tokens and logits are exactly the unplanned path's."""
    import prefix_kernels.integrations.hf.attention as attention

    model = build(family)
    apply(model)
    ids, mask = batch(padding="left")
    with torch.no_grad():
        tokens, logits = _with_logits(model, ids, mask, cache)
    slots = _slots(model)
    assert slots and all(_runs(s) == {1: NEW_TOKENS - 2, ids.shape[1]: 0} for s in slots)
    with torch.no_grad():
        again = _with_logits(model, ids, mask, cache)
    assert all(_runs(s) == {1: 2 * NEW_TOKENS - 3, ids.shape[1]: 1} for s in slots)
    assert torch.equal(again[0], tokens) and torch.equal(again[1], logits)
    monkeypatch.setattr(attention, "plan_prefix_attention", lambda *args, **options: None)
    for s in slots:
        s.plans.clear()
    with torch.no_grad():
        unplanned = _with_logits(model, ids, mask, cache)
    assert all(not s.plans for s in slots)
    assert torch.equal(unplanned[0], tokens) and torch.equal(unplanned[1], logits)


def _runs(slot) -> dict:
    """The query length of each plan a slot holds -> the calls it served."""
    return {shape[2]: plan.runs for shape, plan in slot.plans.items()}


def test_training_after_generate_takes_the_full_path():
    """A plan never serves a call that wants gradients: after generate(), a training step's prefix gradients are
    those of a copy that never generated, and the training calls leave no plan behind."""
    model = build("llama")
    apply(model)
    twin = copy.deepcopy(model)
    ids, mask = batch(padding="left")
    with torch.no_grad():
        _generate(model, ids, mask, "dynamic")
    assert all(1 in _runs(s) and ids.shape[1] in _runs(s) for s in _slots(model))
    grads = []
    for net in (model, twin):
        out = net(input_ids=ids, attention_mask=mask).logits
        (out * mask.unsqueeze(-1)).square().sum().backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0, msg=name)
    # the training calls, of the prefill's shape, replaced its plan with none; the decode steps' plan is kept
    assert all(set(_runs(s)) == {1} for s in _slots(model))


def test_a_copy_of_a_model_that_generated_holds_no_plan():
    """deepcopy after generate(): the copy's attentions plan afresh (a plan refers to this process's dispatcher)
    and generate the same tokens."""
    model = build("llama")
    apply(model)
    ids, mask = batch(padding="left")
    with torch.no_grad():
        tokens = _generate(model, ids, mask, "dynamic")
        twin = copy.deepcopy(model)
        assert all(not s.plans for s in _slots(twin)) and _slots(twin)
        assert torch.equal(_generate(twin, ids, mask, "dynamic"), tokens)
    assert all(_runs(s) == {1: NEW_TOKENS - 2, ids.shape[1]: 0} for s in _slots(twin))


@pytest.mark.parametrize("projection", [False, True])
def test_frozen_prefix_views_are_kept_across_forwards_until_the_prefix_changes(projection):
    """Without grad mode the layers' prefix views are made once while the encoder serves the same frozen prefix (a
    decode loop's steps), and made again after a parameter changes in place (an optimizer step): the logits are
    then those of a copy that never ran; with grad mode they are made per forward and carry the graph."""
    model = build("llama")
    handle = apply(model, prefix_projection=projection)
    twin = copy.deepcopy(model)
    state = model.model.layers[0].self_attn._prefix_kernels_slot.state
    ids, mask = batch(padding="left")

    def views():
        return state._views[next(iter(state._views))][1]

    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        first = views()
        model(input_ids=ids, attention_mask=mask)
        assert views() is first
        for encoder in (handle.prefix_encoder, twin_encoder := next(m for m in twin.modules() if type(m) is type(
                handle.prefix_encoder))):
            encoder.embedding.weight.mul_(-2.0).add_(0.25)
        got = model(input_ids=ids, attention_mask=mask).logits
        assert views() is not first
        torch.testing.assert_close(got, twin(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    assert twin_encoder is not handle.prefix_encoder
    out = model(input_ids=ids, attention_mask=mask).logits
    (out * mask.unsqueeze(-1)).square().sum().backward()
    assert handle.prefix_encoder.embedding.weight.grad is not None
    assert handle.prefix_encoder.embedding.weight.grad.abs().sum() > 0

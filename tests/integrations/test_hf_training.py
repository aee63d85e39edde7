"""Training: gradient checkpointing (which PEFT refuses), autocast bf16 / fp16 under the tolerance rule, attention
dropout through the op, torch.compile with our attention inside the graph, and short training loops."""

import copy

import pytest
import torch

from prefix_kernels.integrations.hf import attention as hf_attention
from prefix_kernels.integrations.hf.reference import eager_forward

from .models import (
    apply,
    assert_rule,
    batch,
    build,
    checkpointing_disable,
    checkpointing_enable,
    compile_recording,
    eager_copy,
    is_checkpointing,
    loss_of,
    outputs,
    real,
)


def _grads(handle):
    return [p.grad.detach().clone() for p in handle.trainable_parameters()]


@pytest.mark.parametrize("family,head", [("llama", "lm"), ("bert", "seq_cls"), ("bloom", "lm")])
def test_gradient_checkpointing(family, head):
    """Same gradients with and without checkpointing; the prefix is computed once per forward either way (outside
    the checkpointed layers, so their recomputation sees the same prefix tensor)."""
    model = build(family, head)
    handle = apply(model, prefix_projection=True, encoder_hidden_size=24)
    calls = []
    handle.prefix_encoder.register_forward_hook(lambda *a: calls.append(1))
    ids, mask = batch()
    model.train()
    loss_of(outputs(model(input_ids=ids, attention_mask=mask)), mask).backward()
    expected = _grads(handle)
    model.zero_grad()
    checkpointing_enable(model)
    assert is_checkpointing(model)
    loss_of(outputs(model(input_ids=ids, attention_mask=mask)), mask).backward()
    assert len(calls) == 2
    for got, want in zip(_grads(handle), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_reentrant_checkpointing():
    """Reentrant checkpointing would run backward through the shared prefix's graph once per layer: refused with
    the remedy when that graph holds saved tensors (a projection), fine for a table prefix."""
    model = build("llama")
    handle = apply(model, prefix_projection=True)
    model.train()
    checkpointing_enable(model, use_reentrant=True)
    ids, mask = batch()
    with pytest.raises(ValueError, match="use_reentrant': False"):
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    table = apply(model)
    loss_of(model(input_ids=ids, attention_mask=mask).logits, mask).backward()
    got = table.prefix_encoder.embedding.weight.grad.clone()
    table.prefix_encoder.zero_grad()
    checkpointing_disable(model)
    loss_of(model(input_ids=ids, attention_mask=mask).logits, mask).backward()
    torch.testing.assert_close(got, table.prefix_encoder.embedding.weight.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family,head", [("llama", "lm"), ("bert", "seq_cls")])
def test_autocast(family, head, dtype):
    """Under CPU autocast, outputs and prefix gradients are as close to the fp64 truth as the eager reference run
    under the same autocast (2x for outputs, 3x for gradients, as in prefix_kernels.testing)."""
    model = build(family, head)
    ref = eager_copy(model)
    handle = apply(model, prefix_projection=True, encoder_hidden_size=24)
    truth_model, truth_encoder = copy.deepcopy(ref).double(), copy.deepcopy(handle.prefix_encoder).double()
    ids, mask = batch()

    def run(fn, encoder, autocast=True):
        encoder.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = outputs(fn())
        loss_of(out, mask).backward()
        return out.detach(), [p.grad.clone() for p in encoder.parameters()]

    ours, ours_g = run(lambda: model(input_ids=ids, attention_mask=mask), handle.prefix_encoder)
    base, base_g = run(lambda: eager_forward(ref, handle.prefix_encoder(), ids, mask), handle.prefix_encoder)
    truth, truth_g = run(lambda: eager_forward(truth_model, truth_encoder(), ids, mask), truth_encoder, False)
    assert ours.dtype == base.dtype
    assert_rule("logits", real(ours, mask), real(truth, mask), real(base, mask))
    for i, (o, t, b) in enumerate(zip(ours_g, truth_g, base_g, strict=True)):
        assert_rule(f"grad {i}", o, t, b, factor=3.0)


def test_attention_dropout_goes_through_the_op(monkeypatch):
    """BERT's attention_probs_dropout_prob reaches prefix_attention's dropout_p in training, and 0 in eval."""
    model = build("bert", "seq_cls", attention_probs_dropout_prob=0.25)
    apply(model)
    seen = []
    real_op = hf_attention.prefix_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return real_op(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "prefix_attention", spy)
    ids, mask = batch()
    model.train()
    torch.manual_seed(5)
    first = model(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(5)
    again = model(input_ids=ids, attention_mask=mask).logits
    other = model(input_ids=ids, attention_mask=mask).logits
    assert seen == [0.25] * 6
    assert torch.equal(first, again) and not torch.equal(first, other)  # seeded by torch's generator
    model.eval()
    model(input_ids=ids, attention_mask=mask)
    assert seen[6:] == [0.0, 0.0]


@pytest.mark.parametrize("family,head", [("llama", "lm"), ("bert", "seq_cls"), ("bloom", "lm")])
def test_torch_compile(family, head):
    """torch.compile(model, fullgraph=True): one graph, our op inside it, through AOTAutograd (forward and
    backward), with the outputs and gradients of the uncompiled model."""
    model = build(family, head)
    handle = apply(model, prefix_projection=True, encoder_hidden_size=24)
    compiled, graphs = compile_recording(model)
    ids, mask = batch()
    model.train()
    out = outputs(compiled(input_ids=ids, attention_mask=mask, use_cache=False))
    loss_of(out, mask).backward()
    got = _grads(handle)
    model.zero_grad()
    want = outputs(model(input_ids=ids, attention_mask=mask, use_cache=False))
    loss_of(want, mask).backward()
    assert len(graphs) == 1 and "prefix_kernels.attention_fwd" in str(graphs[0].graph)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, _grads(handle), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    compiled(input_ids=ids, attention_mask=mask, use_cache=False)
    assert len(graphs) == 1  # no recompilation


def _mean(xs):
    return sum(xs) / len(xs)


def test_training_lowers_the_loss():
    """P-Tuning v2 on a synthetic task (the label is a fixed random function of the first token), prefix and
    classifier head trained with attention dropout on; and a decoder whose prefix alone learns to emit one token."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build("bert", "seq_cls", attention_probs_dropout_prob=0.1)
    handle = apply(model, num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32)
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=0.1)
    keys = torch.randint(0, 3, (97,), generator=g)
    model.train()
    losses = []
    for _ in range(40):
        ids = torch.randint(3, 97, (16, 8), generator=g)
        loss = model(input_ids=ids, labels=keys[ids[:, 0]]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert _mean(losses[-5:]) < 0.85 * _mean(losses[:5]), losses

    model = build("gpt2")
    handle = apply(model, num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32)
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(20):
        ids = torch.randint(3, 97, (8, 8), generator=g)
        loss = model(input_ids=ids, labels=torch.full_like(ids, 7)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert _mean(losses[-5:]) < 0.5 * _mean(losses[:5]), losses

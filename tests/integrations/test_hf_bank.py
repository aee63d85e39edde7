"""Many prefixes in one batch (issue 7): a bank of prefixes in a model, each batch row choosing its own (or none).

The truth for every row is the single-prefix model of that row's prefix (the same weights, prefix-tuned alone,
itself checked against the eager reference in test_hf_parity), or the base model for a row without a prefix. The
bank's prefixes differ in length (3, 5 and 2 virtual tokens) and in kind (a projection MLP and tables), so
per-row positions, ALiBi offsets and masked tails are all exercised. The torch backend serves these tests.
"""

import dataclasses

import pytest
import torch

import prefix_kernels as pk

from .models import batch, build, compile_recording, outputs

CONFIGS = {
    "a": pk.PrefixConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24, backend="torch"),
    "b": pk.PrefixConfig(num_virtual_tokens=5, backend="torch"),
    "c": pk.PrefixConfig(num_virtual_tokens=2, backend="torch"),
}
INDEX = [1, -1, 0, 2, 1]  # rows of batch(5): padded by 0, 2, 4, 6, 8 tokens
CASES = [("llama", "lm", "left", True), ("bert", "seq_cls", "right", True), ("bloom", "lm", "left", True),
         ("bloom", "lm", "left", False)]


def _bank(family, head, configs=CONFIGS, shift_positions=True):
    if not shift_positions:
        configs = {name: dataclasses.replace(c, shift_positions=False) for name, c in configs.items()}
    model = build(family, head)
    handle = pk.apply_prefix_tuning(model, configs)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # prefixes large enough to matter, and a different head per task
        for p in handle.prefix_encoder.parameters():
            p.mul_(3.0)
        for routed in handle.modules_to_save.values():
            for p in routed.heads.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model, handle


def _single(family, head, handle, name):
    """The single-prefix model of the bank's prefix ``name``: the same base weights and encoder weights."""
    model = build(family, head)
    single = pk.apply_prefix_tuning(model, handle.configs[name])
    single.prefix_encoder.load_state_dict(handle.encoder_of(name).state_dict())
    for qualified, module in single.modules_to_save.items():
        module.load_state_dict(handle.modules_to_save_of(name)[qualified].state_dict())
    return model, single


def _rows_of(x, mask, rows):
    """Per-token outputs at the real tokens of ``rows`` (zeros at pads), or per-row outputs of ``rows``."""
    x = x[rows]
    if x.dim() >= 2 and x.shape[:2] == mask[rows].shape:
        x = x * mask[rows].view(*mask[rows].shape, *([1] * (x.dim() - 2)))
    return x


def _weights(x):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family,head,padding,shift", CASES)
def test_rows_equal_their_single_prefix_models_and_gradients_sum_over_rows(family, head, padding, shift):
    """Outputs of a mixed batch, row by row, are those of the single-prefix model of each row's prefix (rows
    with -1: the base model), and each prefix's gradient is that of its rows alone, summed. (GQA and left padding
    in Llama, absolute positions in BERT, ALiBi in Bloom, with and without the position shift.)"""
    model, handle = _bank(family, head, shift_positions=shift)
    ids, mask = batch(batch_size=5, padding=padding)
    rows = torch.tensor(INDEX)
    with handle.use_prefix(INDEX):
        ours = outputs(model(input_ids=ids, attention_mask=mask))
    w = _weights(ours)
    (_rows_of(ours, mask, slice(None)) * w).sum().backward()

    base = build(family, head)
    with torch.no_grad():
        plain = outputs(base(input_ids=ids, attention_mask=mask))
    none = rows == -1
    torch.testing.assert_close(_rows_of(ours, mask, none), _rows_of(plain, mask, none), rtol=1e-5, atol=1e-5)
    for i, name in enumerate(handle.prefix_names):
        single_model, single = _single(family, head, handle, name)
        theirs = outputs(single_model(input_ids=ids, attention_mask=mask))
        mine = rows == i
        torch.testing.assert_close(_rows_of(ours, mask, mine), _rows_of(theirs, mask, mine), rtol=1e-5, atol=1e-5)
        (_rows_of(theirs, mask, mine) * w[mine]).sum().backward()
        bank_params = dict(handle.encoder_of(name).named_parameters())
        for pname, p in single.prefix_encoder.named_parameters():
            torch.testing.assert_close(bank_params[pname].grad, p.grad, rtol=1e-4, atol=1e-5, msg=f"{name}.{pname}")
        for qualified, module in single.modules_to_save.items():  # each task's own head (BERT's classifier)
            bank_head = dict(handle.modules_to_save_of(name)[qualified].named_parameters())
            for pname, p in module.named_parameters():
                torch.testing.assert_close(bank_head[pname].grad, p.grad, rtol=1e-4, atol=1e-5, msg=pname)


def test_rows_without_a_prefix_equal_the_base_model():
    model, handle = _bank("llama", "lm")
    ids, mask = batch(batch_size=3, padding="left")
    with torch.no_grad():
        with handle.use_prefix([None, -1, None]):
            ours = model(input_ids=ids, attention_mask=mask).logits
        with handle.disabled():
            theirs = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], rtol=1e-5, atol=1e-5)


def test_names_tensors_and_lists_select_alike_and_the_selection_is_restored():
    model, handle = _bank("bert", "seq_cls")
    assert handle.prefix_names == ("a", "b", "c") and handle.prefix_lengths == (3, 5, 2)
    assert handle.num_virtual_tokens == 5 and handle.prefix().shape == (2, 2, 3, 4, 5, 16)
    ids, mask = batch(batch_size=4, padding="right")
    with torch.no_grad():
        with handle.use_prefix(["b", None, "a", "c"]):
            by_name = model(input_ids=ids, attention_mask=mask).logits
        handle.set_prefix_index(torch.tensor([1, -1, 0, 2]))
        by_index = model(input_ids=ids, attention_mask=mask).logits
        with handle.use_prefix([2, 2, 2, 2]):
            pass
        again = model(input_ids=ids, attention_mask=mask).logits  # the selection outside the block is back
    assert torch.equal(by_name, by_index) and torch.equal(by_index, again)
    handle.set_prefix_index(None)
    with pytest.raises(ValueError, match="bank of 3 prefixes"):
        model(input_ids=ids, attention_mask=mask)


def test_generate_with_a_row_index_equals_per_task_generate():
    """Greedy decoding of a mixed, left-padded batch gives each row the tokens of its own prefix's model; with
    beams (the rows repeated num_beams times inside generate) as well."""
    model, handle = _bank("llama", "lm")
    ids, mask = batch(batch_size=5, padding="left")
    rows = torch.tensor(INDEX)
    settings = [{"do_sample": False}, {"do_sample": False, "num_beams": 2, "num_return_sequences": 2}]
    with torch.no_grad(), handle.use_prefix(INDEX):
        ours = [model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, **s) for s in settings]
    for i, name in [(-1, None), *enumerate(handle.prefix_names)]:
        single_model = build("llama") if name is None else _single("llama", "lm", handle, name)[0]
        with torch.no_grad():
            theirs = [single_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, **s)
                      for s in settings]
        mine = rows == i
        assert torch.equal(ours[0][mine], theirs[0][mine]), name
        assert torch.equal(ours[1][mine.repeat_interleave(2)], theirs[1][mine.repeat_interleave(2)]), name
    assert not torch.equal(ours[0][rows == 0], ours[0][rows == -1][:1].expand(2, -1))  # the prefixes matter


def test_user_4d_mask_with_a_bank_takes_the_dense_path():
    model, handle = _bank("llama", "lm")
    ids, _ = batch(batch_size=4, padding=None)
    keep = torch.rand(4, 1, 9, 9, generator=torch.Generator().manual_seed(0)) > 0.3
    keep |= torch.eye(9, dtype=torch.bool)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    index = [2, 0, -1, 1]
    with torch.no_grad():
        with handle.use_prefix(index):
            ours = model(input_ids=ids, attention_mask=additive).logits
        with handle.disabled():
            plain = model(input_ids=ids, attention_mask=additive).logits
        torch.testing.assert_close(ours[2], plain[2], rtol=1e-5, atol=1e-5)
        for i, name in enumerate(handle.prefix_names):
            theirs = _single("llama", "lm", handle, name)[0](input_ids=ids, attention_mask=additive).logits
            row = index.index(i)
            torch.testing.assert_close(ours[row], theirs[row], rtol=1e-5, atol=1e-5)


def test_num_prefixes_and_selection_errors():
    model = build("llama")
    handle = pk.apply_prefix_tuning(model, pk.PrefixConfig(num_virtual_tokens=3, backend="torch"), num_prefixes=2)
    assert handle.prefix_names == ("0", "1") and handle.is_bank
    ids, mask = batch(batch_size=3, padding="left")
    with pytest.raises(ValueError, match="bank of 2 prefixes"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(IndexError, match="prefix index 2 out of range: the model holds 2"):
        handle.set_prefix_index([0, 2, 1])
    with pytest.raises(IndexError, match="prefix index -2 out of range"):
        handle.set_prefix_index(torch.tensor([0, -2, 1]))
    with pytest.raises(KeyError, match="no prefix named 'x'"):
        handle.set_prefix_index(["x", 0, 1])
    with pytest.raises(TypeError, match="one entry per row"):
        handle.set_prefix_index(1)
    with handle.use_prefix([0, 1]), pytest.raises(ValueError, match="selection has 2 rows but the batch has 3"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="name the one to save"):
        handle.save_peft_adapter("unused")
    handle.remove()
    with pytest.raises(ValueError, match="shift_positions"):
        pk.apply_prefix_tuning(model, {"a": pk.PrefixConfig(3), "b": pk.PrefixConfig(3, shift_positions=False)})
    with pytest.raises(ValueError, match="num_prefixes must be a positive int"):
        pk.apply_prefix_tuning(model, pk.PrefixConfig(3), num_prefixes=0)
    # a single prefix takes a selection of 0 / -1 per row
    single = pk.apply_prefix_tuning(model, pk.PrefixConfig(num_virtual_tokens=3, backend="torch"))
    with pytest.raises(IndexError, match="holds 1 prefix"):
        single.set_prefix_index([0, 1, 0])
    with torch.no_grad():
        with single.use_prefix([0, -1, "default"]):
            mixed = model(input_ids=ids, attention_mask=mask).logits
        full = model(input_ids=ids, attention_mask=mask).logits
        with single.disabled():
            plain = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(mixed[[0, 2]][real[[0, 2]]], full[[0, 2]][real[[0, 2]]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1][real[1]], plain[1][real[1]], rtol=1e-5, atol=1e-5)


def test_frozen_bank_is_not_rebuilt():
    model, handle = _bank("llama", "lm")
    for p in handle.prefix_encoder.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        first = handle.prefix(torch.float32)
        assert handle.prefix(torch.float32) is first
        handle.encoder_of("b").embedding.weight.add_(1.0)  # a change: rebuilt
        assert handle.prefix(torch.float32) is not first


def test_each_prefix_saves_as_its_own_adapter_and_a_bank_loads_from_them(tmp_path):
    peft = pytest.importorskip("peft")
    model, handle = _bank("bert", "seq_cls")
    ids, mask = batch(batch_size=5, padding="right")
    with torch.no_grad(), handle.use_prefix(INDEX):
        ours = model(input_ids=ids, attention_mask=mask).logits
    written = handle.save_peft_adapters(tmp_path)
    assert sorted(written) == ["a", "b", "c"]
    for i, name in enumerate(handle.prefix_names):
        loaded = peft.PeftModel.from_pretrained(build("bert", "seq_cls"), written[name])
        flat = loaded.prompt_encoder["default"].embedding.weight
        with torch.no_grad():
            prefix = handle.encoder_of(name)()
        assert flat.shape[0] == handle.prefix_lengths[i]
        torch.testing.assert_close(flat, prefix.permute(3, 0, 1, 2, 4).reshape(prefix.shape[3], -1))
        single_model = build("bert", "seq_cls")
        pk.load_peft_adapter(single_model, written[name], backend="torch")
        with torch.no_grad():
            theirs = single_model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours[torch.tensor(INDEX) == i], theirs[torch.tensor(INDEX) == i],
                                   rtol=1e-5, atol=1e-5)
    again = build("bert", "seq_cls")
    bank = pk.load_peft_adapters(again, written, backend="torch")
    assert bank.prefix_names == ("a", "b", "c") and bank.prefix_lengths == (3, 5, 2)
    with torch.no_grad(), bank.use_prefix(INDEX):
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, ours, rtol=1e-5, atol=1e-5)
    # heads giving outputs of different shapes (numbers of labels) cannot share a batch
    bank.modules_to_save["classifier"].heads[1] = torch.nn.Linear(64, 2)
    with torch.no_grad(), bank.use_prefix(INDEX), pytest.raises(ValueError, match="different shapes"):
        again(input_ids=ids, attention_mask=mask)


def test_triton_interpreter_bank_matches_torch_backend():
    """The Triton kernels (the CPU interpreter here) serve a bank inside a model: outputs and every prefix's
    gradient as the torch backend gives them, for mixed lengths and a row without a prefix."""
    configs = {n: dataclasses.replace(c, backend="auto") for n, c in CONFIGS.items()}
    model, handle = _bank("llama", "lm", configs)
    ids, mask = batch(batch_size=4, length=5, padding="left")
    results = []
    for backend in ("auto", "torch"):
        handle.state.backend = backend
        with handle.use_prefix([2, -1, 0, 1]):
            out = model(input_ids=ids, attention_mask=mask).logits
        (out[mask.bool()] * _weights(out[mask.bool()])).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in handle.prefix_encoder.parameters()]))
        handle.prefix_encoder.zero_grad()
    (out_t, grads_t), (out_r, grads_r) = results
    torch.testing.assert_close(out_t[mask.bool()], out_r[mask.bool()], rtol=1e-4, atol=1e-5)
    for got, want in zip(grads_t, grads_r, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,head", [("llama", "lm"), ("bert", "seq_cls")])
def test_torch_compile_with_a_selection(family, head):
    """torch.compile(model, fullgraph=True) of a bank: outputs, every prefix's gradient and every task head's
    gradient equal the eager model's; a new selection of the same batch size reuses the compiled graph (the
    selection is a tensor input, not a constant). BERT's per-task heads take their dense form inside the graph."""
    model, handle = _bank(family, head)
    compiled, graphs = compile_recording(model)
    ids, mask = batch(batch_size=5, padding="left" if family == "llama" else "right")
    kwargs = dict(input_ids=ids, attention_mask=mask) | ({"use_cache": False} if family == "llama" else {})
    params = [p for p in model.parameters() if p.requires_grad]

    def run(fn, selection):
        for p in params:
            p.grad = None
        with handle.use_prefix(selection):
            out = outputs(fn(**kwargs))
        (out * _weights(out)).sum().backward()
        return out, [p.grad.clone() if p.grad is not None else None for p in params]

    for selection in (INDEX, [2, 2, -1, 0, 1], [0, 1, 2, 0, 1]):
        got, got_grads = run(compiled, selection)
        want, want_grads = run(model, selection)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(got_grads, want_grads, strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    n_graphs = len(graphs)
    run(compiled, [1, 0, -1, -1, 2])
    assert len(graphs) == n_graphs <= 2  # at most one recompile, for the caches the first eager call fills
    assert all("prefix_kernels.attention_fwd" in str(g.graph) for g in graphs)

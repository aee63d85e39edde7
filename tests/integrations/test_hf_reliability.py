"""A prefix-tuned model used as users use models (issue 18): deep-copied, pickled, shared by threads, with bank
selections that must not be silently repeated or edited after being set; and the integration's imports run one
way (issue 13). Each test failed before its fix."""

import ast
import copy
import io
import pathlib
import pickle
import subprocess
import sys
import threading

import pytest
import torch

import prefix_kernels as pk
from prefix_kernels.integrations.hf import handle_of

from .models import DECODERS, ENCODERS, apply, batch, build, checkpointing_enable, outputs

ALL = [(f, "lm") for f in DECODERS] + [(f, "seq_cls") for f in ENCODERS]
BANK = {"a": pk.PrefixConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24, backend="torch"),
        "b": pk.PrefixConfig(num_virtual_tokens=5, backend="torch"),
        "c": pk.PrefixConfig(num_virtual_tokens=2, backend="torch")}


def _inputs(family):
    ids, mask = batch(padding="right" if family in ENCODERS else "left")
    return dict(input_ids=ids, attention_mask=mask)


def _tuned(family, head, **config):
    """A prefix-tuned model whose prefix matters (scaled up), and a plain copy made before applying."""
    model = build(family, head)
    plain = copy.deepcopy(model)
    handle = apply(model, **config)
    with torch.no_grad():
        for p in handle.prefix_encoder.parameters():
            p.mul_(3.0)
    return model, plain, handle


def _out(model, inputs):
    with torch.no_grad():
        return outputs(model(**inputs))


@pytest.mark.parametrize("family,head", ALL)
def test_deepcopy_gives_an_independent_prefix_tuned_model(family, head):
    model, plain, handle = _tuned(family, head)
    inputs = _inputs(family)
    want, base = _out(model, inputs), _out(plain, inputs)
    assert not torch.allclose(want, base)
    twin = copy.deepcopy(model)
    mine = handle_of(twin)
    assert mine is not handle and mine.model is twin and mine.active and handle.active
    assert mine.prefix_encoder is twin.prefix_encoder is not model.prefix_encoder
    assert torch.equal(_out(twin, inputs), want) and torch.equal(_out(model, inputs), want)
    with torch.no_grad():  # the copy's prefix is its own
        for p in mine.prefix_encoder.parameters():
            p.add_(0.5)
    assert not torch.allclose(_out(twin, inputs), want)
    assert torch.equal(_out(model, inputs), want)
    mine.remove()  # undoes the copy only
    assert not mine.active and handle.active
    assert torch.equal(_out(twin, inputs), base)
    assert torch.equal(_out(model, inputs), want)
    assert not hasattr(twin, "prefix_encoder") and hasattr(model, "prefix_encoder")
    handle.remove()
    assert torch.equal(_out(model, inputs), base)
    assert twin.config._attn_implementation == model.config._attn_implementation == plain.config._attn_implementation


@pytest.mark.parametrize("family,head", [("llama", "lm"), ("roberta", "seq_cls"), ("bloom", "lm"), ("opt", "lm")])
def test_pickled_model_runs_with_its_prefix(family, head):
    model, plain, handle = _tuned(family, head)
    inputs = _inputs(family)
    want = _out(model, inputs)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for other in (loaded, pickle.loads(pickle.dumps(model))):
        assert torch.equal(_out(other, inputs), want)
        handle_of(other).remove()
        assert torch.equal(_out(other, inputs), _out(plain, inputs))
    assert torch.equal(_out(model, inputs), want)


def test_pickled_model_loads_in_a_fresh_process(tmp_path):
    """In a new process (where our attention name is not yet registered with transformers), torch.load gives a
    model that runs with its prefix."""
    model, _, _ = _tuned("llama", "lm")
    inputs = _inputs("llama")
    torch.save({"model": model, "inputs": inputs, "want": _out(model, inputs)}, tmp_path / "model.pt")
    script = ("import sys, torch\n"
              "saved = torch.load(sys.argv[1], weights_only=False)\n"
              "with torch.no_grad():\n"
              "    got = saved['model'](**saved['inputs']).logits\n"
              "assert torch.equal(got, saved['want']), (got - saved['want']).abs().max()\n"
              "print('ok')\n")
    root = pathlib.Path(pk.__file__).parent.parent
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt")], capture_output=True,
                          text=True, cwd=root, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def _overlapping(model, layer, runs, wait_at):
    """Run ``runs`` (two callables) in two threads whose forwards overlap: thread 2 starts once thread 1's forward
    has begun; thread 1 then waits (at the pre-hook of layer 0, or after the last layer) until thread 2's forward
    has begun; thread 2 then waits, at its layer 0, until thread 1's forward has finished. Returns each run's
    result (or raises its error)."""
    one_began, began, finished = threading.Event(), threading.Event(), threading.Event()
    first, last = layer(0), layer(-1)

    def at_first(module, args):
        if threading.current_thread().name == "two":
            began.set()
            assert finished.wait(60)
        else:
            one_began.set()
            if wait_at == "first":
                assert began.wait(60)

    def at_last(module, args, output):
        if threading.current_thread().name == "one" and wait_at == "last":
            assert began.wait(60)

    results = {}

    def target(name, run):
        try:
            if name == "two":
                assert one_began.wait(60)
            results[name] = run()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            results[name] = e
        finally:
            if name == "one":
                finished.set()

    hooks = [first.register_forward_pre_hook(at_first), last.register_forward_hook(at_last)]
    try:
        threads = [threading.Thread(target=target, args=(n, r), name=n) for n, r in zip(("one", "two"), runs,
                                                                                         strict=True)]
        threads[0].start()
        threads[1].start()
        for t in threads:
            t.join(120)
    finally:
        for h in hooks:
            h.remove()
    assert one_began.is_set() and began.is_set() and finished.is_set()
    for value in results.values():
        if isinstance(value, BaseException):
            raise value
    return results["one"], results["two"]


@pytest.mark.parametrize("family,head", [("llama", "lm"), ("bert", "seq_cls")])
def test_threads_keep_their_own_selection(family, head):
    """One bank model, two threads with different use_prefix selections, overlapping forwards: each thread gets
    the output of its own selection; a thread without use_prefix gets the model-wide set_prefix_index."""
    model = build(family, head)
    handle = pk.apply_prefix_tuning(model, BANK)
    with torch.no_grad():
        for p in handle.prefix_encoder.parameters():
            p.mul_(3.0)
    inputs = _inputs(family)
    selections = ([0, 1, 2], [2, -1, 1])
    want = []
    for s in selections:
        with handle.use_prefix(s):
            want.append(_out(model, inputs))

    def run(selection):
        def go():
            if selection is None:
                return _out(model, inputs)
            with handle.use_prefix(selection):
                return _out(model, inputs)
        return go

    layer = handle.family.layer_list(model).__getitem__
    for wait_at in ("first", "last"):
        got = _overlapping(model, layer, [run(selections[0]), run(selections[1])], wait_at)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        handle.set_prefix_index(selections[0])  # thread one: the default; thread two: its own use_prefix
        got = _overlapping(model, layer, [run(None), run(selections[1])], wait_at)
        handle.set_prefix_index(None)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_threads_share_a_single_prefix_model():
    """A single-prefix model used by two threads at once: no misleading 'attention implementation changed'
    error, and both outputs are the model's."""
    model, _, handle = _tuned("llama", "lm")
    inputs = _inputs("llama")
    want = _out(model, inputs)
    layer = handle.family.layer_list(model).__getitem__
    for wait_at in ("first", "last"):
        got = _overlapping(model, layer, [lambda: _out(model, inputs)] * 2, wait_at)
        for g in got:
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)


def test_selection_is_not_repeated_outside_generate():
    model = build("llama")
    handle = pk.apply_prefix_tuning(model, BANK)
    ids, mask = batch(batch_size=4)
    handle.set_prefix_index([0, 1])
    with pytest.raises(ValueError, match="has 2 rows but the batch has 4"):
        model(input_ids=ids, attention_mask=mask)
    with handle.use_prefix([0, 1, 2]), pytest.raises(ValueError, match="has 3 rows but the batch has 6"):
        model(input_ids=torch.cat([ids, ids[:2]]), attention_mask=torch.cat([mask, mask[:2]]))
    # inside generate(), the repetition it makes is followed: 2 prompts x 2 sequences each
    handle.set_prefix_index([0, 2])
    out = model.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=2, do_sample=False,
                         num_beams=2, num_return_sequences=2, pad_token_id=1)
    assert out.shape[0] == 4
    with pytest.raises(ValueError, match="has 2 rows but the batch has 4"):  # and not after it
        model(input_ids=ids, attention_mask=mask)


def test_set_prefix_index_copies_the_selection():
    model = build("llama")
    handle = pk.apply_prefix_tuning(model, BANK)
    inputs = dict(zip(("input_ids", "attention_mask"), batch(batch_size=4), strict=True))
    selection = torch.tensor([0, 1, 2, -1])
    handle.set_prefix_index(selection)
    want = _out(model, inputs)
    selection.copy_(torch.tensor([1, 1, 1, 1]))  # the caller's later edit stays out of the model
    assert torch.equal(_out(model, inputs), want)
    handle.set_prefix_index(selection)
    with handle.use_prefix([1, 1, 1, 1]):
        assert torch.equal(_out(model, inputs), _out(model, inputs))
        other = _out(model, inputs)
    assert torch.equal(_out(model, inputs), other)


def test_opt_causal_lm_computes_its_prefix_every_forward():
    """OPTForCausalLM calls its decoder past the base model: the prefix is still recomputed at each forward (a
    changed prefix is seen), and the forward's end is checked."""
    model, _, handle = _tuned("opt", "lm", prefix_projection=True, encoder_hidden_size=24)
    inputs = _inputs("opt")
    first = _out(model, inputs)
    with torch.no_grad():
        for p in handle.prefix_encoder.parameters():
            p.mul_(2.0)
    fresh = build("opt")
    again = apply(fresh, prefix_projection=True, encoder_hidden_size=24)
    again.prefix_encoder.load_state_dict(handle.prefix_encoder.state_dict())
    second = _out(model, inputs)
    assert not torch.allclose(first, second)
    assert torch.equal(second, _out(fresh, inputs))


def _imports(path: pathlib.Path, package: str) -> set[str]:
    """The modules of the package that ``path`` imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def test_apply_does_not_import_peft_io():
    """PEFT I/O stays free functions over the handle (the package-wide cycle check is tests/test_imports.py)."""
    root = pathlib.Path(pk.__file__).parent / "integrations"
    imported = _imports(root / "hf" / "apply.py", "prefix_kernels.integrations.hf")
    assert not any(m == "prefix_kernels.integrations.peft" or m.startswith("prefix_kernels.integrations.peft.")
                   for m in imported), imported


def test_checkpoint_recompute_in_another_thread():
    """Gradient checkpointing recomputes layers in the thread that runs the backward (autograd's device threads on
    a GPU): a thread that ran no forward uses the model's latest call, so the gradients are those of a forward and
    backward in one thread; after forwards that overlapped in two threads it refuses instead of guessing."""
    model, _, handle = _tuned("llama", "lm", prefix_projection=True, encoder_hidden_size=24)
    checkpointing_enable(model, use_reentrant=False)
    model.train()
    inputs = _inputs("llama")
    params = list(handle.prefix_encoder.parameters())

    def loss():
        return outputs(model(**inputs, use_cache=False)).square().mean()

    want = torch.autograd.grad(loss(), params)
    box = {}
    for target in (lambda: box.setdefault("loss", loss()),  # the forward in one thread,
                   lambda: box.setdefault("grads", torch.autograd.grad(box["loss"], params))):  # recompute in another
        worker = threading.Thread(target=target)
        worker.start()
        worker.join(120)
    got = box["grads"]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)

    model.eval()
    layer = handle.family.layer_list(model).__getitem__
    _overlapping(model, layer, [lambda: _out(model, inputs)] * 2, "first")
    errors = []
    fresh = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, handle.state.current)))
    fresh.start()
    fresh.join(60)
    assert errors and "overlapped" in str(errors[0].value)


def test_selection_checked_once_per_forward_and_again_in_the_next():
    """The HF forward opens a memo scope: the bank selection's range check (a read-back) runs at the first layer
    and is reused by the others; the next forward checks again, so an edit between forwards is always seen."""
    from prefix_kernels.ops.attention import inputs

    model = build("llama", "lm")
    handle = pk.apply_prefix_tuning(model, BANK)
    layers = model.config.num_hidden_layers
    assert layers >= 2
    ids, mask = batch(padding="left")
    handle.set_prefix_index(["a", "b", None])
    for _ in range(2):
        hits, misses = inputs._checked.hits, inputs._checked.misses
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        checked = inputs._checked.misses - misses  # the selected index and the bank's lengths, at the first layer
        assert checked == 2
        assert inputs._checked.hits - hits == checked * (layers - 1)


def test_attention_dtype_follows_the_probe_after_casts_and_replacements():
    """The attention dtype is read from the probe module's first parameter, whose place is remembered: a cast of
    the model, a replaced submodule and a replaced parameter are all seen, and a forward still runs in the new
    dtype."""
    model = build("llama")
    handle = apply(model)
    state = handle.state
    probe = state.probe
    assert state.attention_dtype() == torch.float32
    model.to(torch.float64)
    assert state.attention_dtype() == torch.float64
    owner_name, param_name = next((n.rpartition(".")[0], n.rpartition(".")[2]) for n, _ in probe.named_parameters())
    owner = probe.get_submodule(owner_name) if owner_name else probe
    setattr(owner, param_name, torch.nn.Parameter(getattr(owner, param_name).detach().to(torch.bfloat16)))
    assert state.attention_dtype() == torch.bfloat16
    if owner_name:  # a fresh submodule in the same place
        parent_name, _, child = owner_name.rpartition(".")
        parent = probe.get_submodule(parent_name) if parent_name else probe
        fresh = copy.deepcopy(owner).to(torch.float16)
        setattr(parent, child, fresh)
        assert state.attention_dtype() == torch.float16
    model.to(torch.float64)
    ids, mask = batch()
    with torch.no_grad():
        out = outputs(model(input_ids=ids, attention_mask=mask))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()

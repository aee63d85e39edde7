"""Adapter directories as files (issues 18 and 15): what load_peft_adapter verifies against the config, the error
each damaged file gives (naming the file and what is wrong), atomic saves, and trained parameters outside the
prefix (BitFit's biases) surviving a save and a reload, by us and by PEFT."""

import copy
import errno
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import prefix_kernels as pk

from .models import apply, batch, build, outputs, real

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _perturb(params, seed=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def _classifier_adapter(directory, seed=3):
    """A BERT classifier prefix-tuned with a trained head, saved; returns (base model, tuned model)."""
    model = build("bert", "seq_cls")
    base = copy.deepcopy(model)
    handle = apply(model)
    _perturb(handle.trainable_parameters(), seed=seed)
    pk.save_peft_adapter(model, directory)
    return base, model


def _rewrite_weights(directory, edit):
    path = os.path.join(directory, WEIGHTS)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path


def _rewrite_config(directory, edit):
    path = os.path.join(directory, CONFIG)
    with open(path) as f:
        config = json.load(f)
    config = edit(config)
    with open(path, "w") as f:
        json.dump(config, f)
    return path


# ------------------------------------------------------------------ item 5: contents against the config
def test_missing_head_weights_raise_naming_the_file_and_keys(tmp_path):
    base, _ = _classifier_adapter(tmp_path)
    path = _rewrite_weights(tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("base_model.classifier.")])
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="base_model.classifier.bias") as info:
        pk.load_peft_adapter(model, tmp_path, backend="torch")
    assert path in str(info.value) and "base_model.classifier.weight" in str(info.value)
    assert not hasattr(model, "prefix_encoder")  # nothing left applied
    assert torch.equal(model.classifier.weight, base.classifier.weight)


def test_partial_head_weights_raise(tmp_path):
    base, _ = _classifier_adapter(tmp_path)
    path = _rewrite_weights(tmp_path, lambda t: t.pop("base_model.classifier.bias"))
    with pytest.raises(ValueError, match="missing.*base_model.classifier.bias") as info:
        pk.load_peft_adapter(copy.deepcopy(base), tmp_path, backend="torch")
    assert path in str(info.value)


def test_unexpected_keys_raise_naming_them(tmp_path):
    base, _ = _classifier_adapter(tmp_path)
    path = _rewrite_weights(tmp_path, lambda t: t.update({"base_model.pooler.nothing.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="base_model.pooler.nothing.weight") as info:
        pk.load_peft_adapter(copy.deepcopy(base), tmp_path, backend="torch")
    assert path in str(info.value)


# ------------------------------------------------------------------ item 10: each damaged file named
def test_wrong_shape_head_weight(tmp_path):
    base, _ = _classifier_adapter(tmp_path)
    path = _rewrite_weights(tmp_path, lambda t: t.update({"base_model.classifier.weight": torch.zeros(5, 64)}))
    with pytest.raises(ValueError, match=r"base_model.classifier.weight.*\(5, 64\).*\(3, 64\)") as info:
        pk.load_peft_adapter(copy.deepcopy(base), tmp_path, backend="torch")
    assert path in str(info.value)


def test_wrong_shape_prompt(tmp_path):
    base, _ = _classifier_adapter(tmp_path)
    path = _rewrite_weights(tmp_path, lambda t: t.update({"prompt_embeddings": torch.zeros(3, 7)}))
    with pytest.raises(ValueError, match="prompt_embeddings has shape") as info:
        pk.load_peft_adapter(copy.deepcopy(base), tmp_path, backend="torch")
    assert path in str(info.value)


def test_bad_json_names_the_file(tmp_path):
    base, _ = _classifier_adapter(tmp_path)
    path = os.path.join(tmp_path, CONFIG)
    with open(path, "w") as f:
        f.write('{"peft_type": "PREFIX_TUNING", ')
    with pytest.raises(ValueError, match="not valid JSON") as info:
        pk.load_peft_adapter(copy.deepcopy(base), tmp_path, backend="torch")
    assert path in str(info.value)


def test_json_list_names_the_file(tmp_path):
    base, _ = _classifier_adapter(tmp_path)
    path = _rewrite_config(tmp_path, lambda c: [c])
    with pytest.raises(ValueError, match="a JSON list, not an object") as info:
        pk.load_peft_adapter(copy.deepcopy(base), tmp_path, backend="torch")
    assert path in str(info.value)


@pytest.mark.parametrize("value", ["drop", None, "4", 0, 2.5, True])
def test_missing_or_bad_num_virtual_tokens(tmp_path, value):
    base, _ = _classifier_adapter(tmp_path)

    def edit(config):
        if value == "drop":
            del config["num_virtual_tokens"]
        else:
            config["num_virtual_tokens"] = value
        return config

    path = _rewrite_config(tmp_path, edit)
    with pytest.raises(ValueError, match="num_virtual_tokens") as info:
        pk.load_peft_adapter(copy.deepcopy(base), tmp_path, backend="torch")
    assert path in str(info.value) and "None, 256" not in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    base, _ = _classifier_adapter(tmp_path)
    path = os.path.join(tmp_path, WEIGHTS)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) - 40] if damage == "truncated" else b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt") as info:
        pk.load_peft_adapter(copy.deepcopy(base), tmp_path, backend="torch")
    assert path in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_tensors"])
def test_corrupt_bin_names_the_file_and_never_advises_unsafe_loading(tmp_path, damage):
    base, _ = _classifier_adapter(tmp_path)
    tensors = load_file(os.path.join(tmp_path, WEIGHTS))
    os.remove(os.path.join(tmp_path, WEIGHTS))
    path = os.path.join(tmp_path, "adapter_model.bin")
    torch.save(tensors, path)
    with open(path, "rb") as f:
        data = f.read()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"garbage pickle"
    if damage == "not_tensors":
        torch.save([1, 2], path)
    else:
        with open(path, "wb") as f:
            f.write(data)
    with pytest.raises(ValueError) as info:
        pk.load_peft_adapter(copy.deepcopy(base), tmp_path, backend="torch")
    message = str(info.value)
    assert path in message and "weights_only" not in message and "False" not in message
    assert info.value.__cause__ is None or "weights_only" not in str(info.value.__cause__)


def test_a_sound_bin_still_loads(tmp_path):
    base, tuned = _classifier_adapter(tmp_path)
    tensors = load_file(os.path.join(tmp_path, WEIGHTS))
    os.remove(os.path.join(tmp_path, WEIGHTS))
    torch.save(tensors, os.path.join(tmp_path, "adapter_model.bin"))
    model = copy.deepcopy(base)
    pk.load_peft_adapter(model, tmp_path, backend="torch")
    ids, mask = batch(padding="right")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   tuned(input_ids=ids, attention_mask=mask).logits, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ item 9: atomic saves
def _snapshot(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def _failing_writer(monkeypatch):
    import safetensors.torch

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # a partial file, then the disk is full
            f.write(b"\0" * 16)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_a_failed_save_leaves_the_old_adapter_untouched(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    base, tuned = _classifier_adapter(target)
    before, parent = _snapshot(target), sorted(os.listdir(tmp_path))
    other = build("bert", "seq_cls")
    apply(other, num_virtual_tokens=5)  # a different adapter: other sizes, other config
    _failing_writer(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        pk.save_peft_adapter(other, target)
    monkeypatch.undo()
    assert _snapshot(target) == before
    assert sorted(os.listdir(tmp_path)) == parent  # no temporary directory left beside it
    model = copy.deepcopy(base)
    pk.load_peft_adapter(model, target, backend="torch")
    ids, mask = batch(padding="right")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   tuned(input_ids=ids, attention_mask=mask).logits, rtol=1e-6, atol=1e-6)


def test_a_failed_first_save_leaves_no_directory(tmp_path, monkeypatch):
    model = build("llama")
    apply(model)
    _failing_writer(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        pk.save_peft_adapter(model, tmp_path / "new")
    assert os.listdir(tmp_path) == []


def test_a_save_replaces_an_adapter_and_keeps_other_files(tmp_path):
    target = tmp_path / "checkpoint"
    _classifier_adapter(target, seed=3)
    (target / "trainer_state.json").write_text("{}")
    base, tuned = _classifier_adapter(target, seed=4)  # saved over the first
    assert (target / "trainer_state.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    model = copy.deepcopy(base)
    pk.load_peft_adapter(model, target, backend="torch")
    ids, mask = batch(padding="right")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   tuned(input_ids=ids, attention_mask=mask).logits, rtol=1e-6, atol=1e-6)


def test_a_save_through_a_symlink_replaces_what_it_names(tmp_path):
    _classifier_adapter(tmp_path / "real", seed=3)
    os.symlink(tmp_path / "real", tmp_path / "link")
    base, tuned = _classifier_adapter(tmp_path / "link", seed=4)
    assert os.path.islink(tmp_path / "link") and sorted(os.listdir(tmp_path)) == ["link", "real"]
    model = copy.deepcopy(base)
    pk.load_peft_adapter(model, tmp_path / "real", backend="torch")
    ids, mask = batch(padding="right")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   tuned(input_ids=ids, attention_mask=mask).logits, rtol=1e-6, atol=1e-6)


def test_saving_over_a_file_raises(tmp_path):
    model = build("llama")
    apply(model)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        pk.save_peft_adapter(model, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


# ------------------------------------------------------------------ issue 15: other trained parameters
def _bitfit(model, handle, seed=5):
    """BitFit beside the prefix: every bias of the base model trains too (and has trained: perturbed)."""
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias") and not n.startswith("prefix_encoder")
              and not any(n.startswith(h + ".") for h in handle.modules_to_save)]
    assert biases
    for p in biases:
        p.requires_grad_(True)
    _perturb(handle.trainable_parameters(), seed=seed, scale=0.5)
    return biases


@pytest.mark.parametrize("family,head", [("bert", "seq_cls"), ("gpt2", "lm")])
def test_bitfit_biases_survive_save_and_load(tmp_path, family, head):
    model = build(family, head)
    base = copy.deepcopy(model)
    handle = apply(model)
    _bitfit(model, handle)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped, so nothing to warn about
        pk.save_peft_adapter(model, tmp_path)
    ids, mask = batch(padding="right" if head != "lm" else "left")
    with torch.no_grad():
        ours = outputs(model(input_ids=ids, attention_mask=mask))
    again = copy.deepcopy(base)
    loaded = pk.load_peft_adapter(again, tmp_path, backend="torch", is_trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(outputs(again(input_ids=ids, attention_mask=mask)), ours, rtol=1e-6, atol=1e-6)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in again.named_parameters() if p.requires_grad} == trained  # trains on as it was
    loaded.remove()  # the base model's own biases are back
    for (n, p), (n2, p2) in zip(again.named_parameters(), base.named_parameters(), strict=True):
        assert n == n2 and torch.equal(p, p2) and p.requires_grad == p2.requires_grad, n


@pytest.mark.parametrize("family,head,task", [("bert", "seq_cls", "SEQ_CLS"), ("gpt2", "lm", "CAUSAL_LM")])
def test_peft_loads_an_adapter_with_bitfit_biases(tmp_path, family, head, task):
    peft = pytest.importorskip("peft")
    model = build(family, head)
    base = copy.deepcopy(model)
    handle = apply(model)
    biases = dict((n, p) for n, p in model.named_parameters() if p in set(_bitfit(model, handle)))
    pk.save_peft_adapter(model, tmp_path)
    twin = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert twin.peft_config["default"].task_type == task
    theirs = dict(twin.base_model.named_parameters())
    for name, p in biases.items():  # PEFT puts each trained bias into its base model
        assert torch.equal(theirs[name], p.detach()), name
    if head == "lm":  # PEFT's forward runs for decoders
        ids, mask = batch(padding="left")
        with torch.no_grad():
            torch.testing.assert_close(real(twin(input_ids=ids, attention_mask=mask).logits, mask),
                                       real(model(input_ids=ids, attention_mask=mask).logits, mask),
                                       rtol=1e-5, atol=1e-5)


def test_a_bank_of_adapters_with_different_trained_biases_raises(tmp_path):
    for i, name in enumerate(("a", "b")):
        model = build("llama", attention_bias=True)
        handle = apply(model)
        _bitfit(model, handle, seed=i)
        pk.save_peft_adapter(model, tmp_path / name)
    with pytest.raises(ValueError, match="base model"):
        pk.load_peft_adapters(build("llama", attention_bias=True), [tmp_path / "a", tmp_path / "b"], backend="torch")


def test_a_saved_bank_with_shared_biases_reloads(tmp_path):
    model = build("llama", attention_bias=True)
    base = copy.deepcopy(model)
    handle = pk.apply_prefix_tuning(model, pk.PrefixConfig(num_virtual_tokens=3, backend="torch"), num_prefixes=2)
    _bitfit(model, handle)
    handle.save_peft_adapters(tmp_path)
    again = copy.deepcopy(base)
    loaded = pk.load_peft_adapters(again, {"0": tmp_path / "0", "1": tmp_path / "1"}, backend="torch")
    ids, mask = batch(padding="left")
    with torch.no_grad(), handle.use_prefix([0, 1, None]), loaded.use_prefix([0, 1, None]):
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=1e-6, atol=1e-6)


def test_a_trained_parameter_that_cannot_be_saved_is_named(tmp_path):
    """A bank's rows without a prefix use the model's own head; trained (base not frozen), it is in no adapter."""
    model = build("bert", "seq_cls")
    pk.apply_prefix_tuning(model, pk.PrefixConfig(num_virtual_tokens=3, backend="torch", freeze_base_model=False),
                           num_prefixes=2)
    with pytest.warns(UserWarning, match=r"classifier\.original\.weight"):
        pk.save_peft_adapter(model, tmp_path, prefix=0)

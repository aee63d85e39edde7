"""transformers' Trainer on a prefix-tuned model: checkpoints hold the trained state only (the prefix encoder with
its MLP, the heads, BitFit's biases), resume and load_best_model_at_end restore it exactly, a plain from_pretrained
of a saved directory raises naming pk.from_pretrained, and pk.from_pretrained reloads the same predictions."""

from __future__ import annotations

import json
import logging
import os
import warnings

import pytest
import torch

from .models import VOCAB, apply, build

transformers = pytest.importorskip("transformers")

import prefix_kernels as pk  # noqa: E402
from prefix_kernels.integrations.hf import checkpoint  # noqa: E402

BASE_KEYS = ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight")


def _data(n: int = 24, length: int = 10, seed: int = 0):
    """Labels decided by the first token: a task a prefix and a head can learn."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
             "labels": int(ids[i, 0]) % 3} for i in range(n)]


def _base(tmp_path):
    """A tiny BERT classifier saved as a base checkpoint, and loaded back from it (so it records its path)."""
    path = tmp_path / "base"
    if not path.exists():
        build("bert", "seq_cls").save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForSequenceClassification.from_pretrained(path)


def _prefix_tuned(tmp_path, bitfit: bool = False):
    model = _base(tmp_path)
    torch.manual_seed(0)  # the same initial prefix in every run (a resumed run loads its own anyway)
    handle = apply(model, num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=24)
    if bitfit:
        for name, p in model.named_parameters():
            if name.startswith("bert.") and name.endswith(".bias"):
                p.requires_grad_(True)
    return model, handle


def _args(out, **kw):
    kw.setdefault("max_steps", 6)
    return transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=3e-2,
        logging_steps=1, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, lr_scheduler_type="constant", **kw)


def _trainer(model, out, **kw):
    return transformers.Trainer(model=model, args=_args(out, **kw), train_dataset=_data(),
                                eval_dataset=_data(8, seed=5))


def _trained(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k in set(checkpoint.trained_keys(model._prefix_kernels_handle))}


def _file(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_checkpoints_hold_the_trained_state_only(tmp_path):
    model, handle = _prefix_tuned(tmp_path, bitfit=True)
    _trainer(model, tmp_path / "run").train()
    saved = _file(tmp_path / "run" / "checkpoint-6")
    expected = {k for k in model.state_dict() if k.startswith(("prefix_encoder.", "classifier."))}
    expected |= {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == expected
    assert {"prefix_encoder.transform.0.weight", "prefix_encoder.transform.2.bias"} <= set(saved)  # the MLP (#2256)
    assert not set(BASE_KEYS) & set(saved)
    assert _equal(saved, _trained(model))  # the final checkpoint is the final state
    full = sum(v.numel() for v in model.state_dict().values())
    assert sum(v.numel() for v in saved.values()) < full / 3


def test_resume_from_checkpoint_restores_exactly(tmp_path):
    model, _ = _prefix_tuned(tmp_path, bitfit=True)
    _trainer(model, tmp_path / "straight").train()
    straight = _trained(model)

    interrupted, _ = _prefix_tuned(tmp_path, bitfit=True)
    _trainer(interrupted, tmp_path / "resumed", max_steps=4).train()
    first_part = _trained(interrupted)
    assert not _equal(first_part, straight)

    resumed, _ = _prefix_tuned(tmp_path, bitfit=True)  # a new run: the base again, the same config
    before = _trained(resumed)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addHandler(handler)
    try:
        _trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    finally:
        trainer_logger.removeHandler(handler)
    assert not _equal(_trained(resumed), before)
    after = _trained(resumed)
    for key in straight:
        torch.testing.assert_close(after[key], straight[key], rtol=1e-6, atol=1e-7, msg=key)
    assert not [r for r in records if "missing keys" in r.getMessage()], [r.getMessage() for r in records]


def test_missing_trained_tensor_is_reported_on_resume(tmp_path):
    from safetensors.torch import save_file

    model, _ = _prefix_tuned(tmp_path)
    _trainer(model, tmp_path / "run", max_steps=2).train()
    ck = tmp_path / "run" / "checkpoint-2"
    tensors = _file(ck)
    del tensors["classifier.weight"]
    save_file(tensors, str(ck / "model.safetensors"), metadata={"format": "pt"})
    fresh, _ = _prefix_tuned(tmp_path)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addHandler(handler)
    try:
        _trainer(fresh, tmp_path / "run", max_steps=3).train(resume_from_checkpoint=str(ck))
    finally:
        trainer_logger.removeHandler(handler)
    assert [r for r in records if "classifier.weight" in r.getMessage()]


def test_load_best_model_at_end_restores_the_best(tmp_path):
    model, _ = _prefix_tuned(tmp_path)
    calls = []

    def first_is_best(prediction):  # a metric that makes the first evaluation the best, not the last state
        calls.append(1)
        return {"order": -len(calls)}

    trainer = _trainer(model, tmp_path / "run", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                       metric_for_best_model="order", greater_is_better=True)
    trainer.compute_metrics = first_is_best
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")
    assert _equal(_trained(model), _file(best))
    assert not _equal(_file(best), _file(tmp_path / "run" / "checkpoint-6"))


def test_plain_from_pretrained_refuses_and_pk_from_pretrained_reloads(tmp_path):
    model, handle = _prefix_tuned(tmp_path, bitfit=True)
    trainer = _trainer(model, tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    ids = torch.stack([d["input_ids"] for d in _data(6, seed=9)])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for cls in (transformers.AutoModelForSequenceClassification, transformers.BertForSequenceClassification):
        with pytest.raises(ValueError, match=r"prefix_kernels\.from_pretrained"):
            cls.from_pretrained(tmp_path / "final")
    with open(tmp_path / "final" / checkpoint.PK_CONFIG_NAME) as f:
        assert json.load(f)["base_model_name_or_path"] == str(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = pk.from_pretrained(transformers.AutoModelForSequenceClassification, tmp_path / "final")
    with torch.no_grad():
        got = loaded.model.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    # BitFit's biases came back into the base model, and go away again on remove()
    bias = "bert.encoder.layer.0.attention.self.query.bias"
    torch.testing.assert_close(loaded.model.state_dict()[bias], model.state_dict()[bias], rtol=0, atol=0)
    loaded.remove()
    assert not torch.equal(loaded.model.state_dict()[bias], model.state_dict()[bias])
    assert "save_pretrained" not in loaded.model.__dict__


def test_from_pretrained_checks(tmp_path):
    model, handle = _prefix_tuned(tmp_path)
    model.save_pretrained(tmp_path / "ck")
    with pytest.raises(ValueError, match="already prefix-tuned"):
        pk.from_pretrained(model, tmp_path / "ck")
    tensors = _file(tmp_path / "ck")
    from safetensors.torch import save_file

    del tensors["prefix_encoder.transform.0.bias"]
    save_file(tensors, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['prefix_encoder.transform.0.bias'\]"):
        pk.from_pretrained(_base(tmp_path), tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="neither"):
        pk.from_pretrained(_base(tmp_path), tmp_path)
    other = build("llama", "seq_cls")
    model.save_pretrained(tmp_path / "ck")
    with pytest.raises(ValueError, match="model_type"):
        pk.from_pretrained(other, tmp_path / "ck")


def test_print_trainable_parameters(tmp_path, capsys):
    model, handle = _prefix_tuned(tmp_path)
    trainable = sum(p.numel() for p in handle.trainable_parameters())
    total = sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    handle.print_trainable_parameters()
    line = (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}")
    assert capsys.readouterr().out == f"{line}\n{line}\n"
    handle.remove()
    assert not hasattr(model, "print_trainable_parameters")


def test_checkpointing_switch_names_this_transformers_method(tmp_path):
    from prefix_kernels.integrations.hf import training

    model, handle = _prefix_tuned(tmp_path)
    text = training.checkpointing_call_text(use_reentrant=False)
    name = text.split("(")[0]
    assert callable(getattr(model, name))
    new = hasattr(model, "activation_checkpointing_enable")
    assert name == ("activation_checkpointing_enable" if new else "gradient_checkpointing_enable")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the new name where it exists: no deprecation warning
        training.checkpointing_enable(model, use_reentrant=False)
    flag = "is_activation_checkpointing" if new else "is_gradient_checkpointing"
    assert getattr(model, flag)
    training.checkpointing_disable(model)
    assert not getattr(model, flag)


def test_from_pretrained_of_a_peft_adapter_directory(tmp_path):
    model, handle = _prefix_tuned(tmp_path)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    ids = torch.stack([d["input_ids"] for d in _data(4, seed=3)])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        without = _base(tmp_path).eval()(input_ids=ids).logits
    handle.save_peft_adapter(tmp_path / "peft")
    loaded = pk.from_pretrained(transformers.AutoModelForSequenceClassification, tmp_path / "peft")
    with torch.no_grad():
        got = loaded.model.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (without - expected).abs().max() > 1e-3

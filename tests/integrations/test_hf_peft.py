"""Against PEFT itself (peft 0.21.2 pinned): forward outputs and prefix gradients where PEFT's own path runs, and
adapter directories both ways (PEFT saves, we load; we save, PEFT loads), with the classifier head PEFT trains."""

import copy

import pytest
import torch

import prefix_kernels as pk
from prefix_kernels.integrations.hf.reference import eager_forward

from .models import DECODERS, apply, batch, build, eager_copy, loss_of, outputs, real

peft = pytest.importorskip("peft")

# PEFT's forward refuses these (transformers 5.24, peft 0.21.2): our path serves them (see test_hf_parity).
PEFT_REFUSES = "Model does not support past key values"


def _peft(base, handle, task="CAUSAL_LM", **config):
    """PEFT's prefix tuning of ``base`` (a copy of the model before applying) holding the handle's encoder weights.
    Eager attention: transformers 5.17's SDPA path silently drops Gemma 2's logit softcap."""
    base.set_attn_implementation("eager")
    config = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=handle.num_virtual_tokens, **config)
    twin = peft.get_peft_model(base, config).eval()
    twin.prompt_encoder["default"].load_state_dict(handle.prefix_encoder.state_dict())
    return twin


@pytest.mark.parametrize("family", DECODERS)
def test_forward_and_gradients_match_peft(family):
    model = build(family)
    base = copy.deepcopy(model)
    handle = apply(model, prefix_projection=True, encoder_hidden_size=24)
    twin = _peft(base, handle, prefix_projection=True, encoder_hidden_size=24)
    ids, mask = batch(padding="left")
    ours = model(input_ids=ids, attention_mask=mask).logits
    loss_of(ours, mask).backward()
    theirs = twin(input_ids=ids, attention_mask=mask).logits
    loss_of(theirs, mask).backward()
    torch.testing.assert_close(real(ours, mask), real(theirs, mask), rtol=1e-4, atol=1e-5)
    peft_params = dict(twin.prompt_encoder["default"].named_parameters())
    for name, p in handle.prefix_encoder.named_parameters():
        torch.testing.assert_close(p.grad, peft_params[name].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,head,task", [("bert", "seq_cls", "SEQ_CLS"), ("roberta", "token_cls", "TOKEN_CLS"),
                                              ("bert", "qa", "QUESTION_ANS")])
def test_encoder_tasks_match_peft(family, head, task):
    """Where PEFT's P-Tuning v2 path runs, ours gives its outputs; with transformers 5.24 / peft 0.21.2 PEFT raises
    "Model does not support past key values" (test_hf_parity compares these with the eager reference instead)."""
    model = build(family, head)
    base = copy.deepcopy(model)
    handle = apply(model)
    twin = _peft(base, handle, task=task)
    for name, module in handle.modules_to_save.items():  # PEFT's trainable copy of the head: ours
        twin.base_model.get_submodule(name).modules_to_save["default"].load_state_dict(module.state_dict())
    ids, mask = batch(padding="right")
    try:
        with torch.no_grad():
            theirs = outputs(twin(input_ids=ids, attention_mask=mask))
    except ValueError as e:
        if PEFT_REFUSES not in str(e):
            raise
        pytest.skip(f"PEFT {peft.__version__} refuses {type(base).__name__} here: {e}")
    with torch.no_grad():
        ours = outputs(model(input_ids=ids, attention_mask=mask))
    torch.testing.assert_close(real(ours, mask), real(theirs, mask), rtol=1e-5, atol=1e-5)


def _trained_peft_adapter(tmp_path, family, head, task):
    """A PEFT prefix-tuning adapter with a projection and a (randomised) classifier head, saved by PEFT."""
    base = build(family, head)
    twin = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type=task, num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=20))
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if p.requires_grad:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    twin.save_pretrained(tmp_path / "peft")
    return base, twin


def test_load_a_peft_adapter_with_a_classifier_head(tmp_path):
    base, twin = _trained_peft_adapter(tmp_path, "bert", "seq_cls", "SEQ_CLS")
    ref = eager_copy(base)
    ref.classifier.load_state_dict(twin.base_model.classifier.modules_to_save["default"].state_dict())
    model = copy.deepcopy(base)
    handle = pk.load_peft_adapter(model, tmp_path / "peft", backend="torch")
    assert list(handle.modules_to_save) == ["classifier"]
    assert not any(p.requires_grad for p in model.parameters())  # PEFT's default: inference
    prompt = twin.get_prompt(batch_size=1)  # the cache PEFT would feed: layer l holds our prefix[l]
    for layer, cached in enumerate(prompt.layers):
        torch.testing.assert_close(handle.prefix()[layer, 0], cached.keys[0])
        torch.testing.assert_close(handle.prefix()[layer, 1], cached.values[0])
    ids, mask = batch(padding="right")
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = eager_forward(ref, handle.prefix(), ids, mask).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert torch.equal(model.classifier.weight, base.classifier.weight)  # the model's own head is back


def test_load_a_peft_adapter_for_a_decoder(tmp_path):
    base, twin = _trained_peft_adapter(tmp_path, "llama", "lm", "CAUSAL_LM")
    model = copy.deepcopy(base)
    pk.load_peft_adapter(model, tmp_path / "peft", backend="torch")
    ids, mask = batch(padding="left")
    with torch.no_grad():
        torch.testing.assert_close(real(model(input_ids=ids, attention_mask=mask).logits, mask),
                                   real(twin(input_ids=ids, attention_mask=mask).logits, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,head,task", [("roberta", "token_cls", "TOKEN_CLS"), ("gpt2", "lm", "CAUSAL_LM"),
                                              ("bert", "qa", "QUESTION_ANS")])
def test_save_then_peft_loads(tmp_path, family, head, task):
    model = build(family, head)
    base = copy.deepcopy(model)
    handle = apply(model, prefix_projection=True, encoder_hidden_size=20)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    pk.save_peft_adapter(model, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert loaded.peft_config["default"].task_type == task
    # PEFT's prompt table is our prefix, and its heads are ours
    flat = loaded.prompt_encoder["default"].embedding.weight  # [P, 2 * L * Hkv * D]
    prefix = handle.prefix().detach()
    torch.testing.assert_close(flat, prefix.permute(3, 0, 1, 2, 4).reshape(prefix.shape[3], -1))
    for name, module in handle.modules_to_save.items():
        saved = loaded.base_model.get_submodule(name).modules_to_save["default"]
        for (k, v), (k2, v2) in zip(module.state_dict().items(), saved.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(v, v2)
    ids, mask = batch(padding="left" if head == "lm" else "right")
    with torch.no_grad():
        ours = outputs(model(input_ids=ids, attention_mask=mask))
    if head == "lm":  # PEFT's forward runs for decoders
        with torch.no_grad():
            theirs = outputs(loaded(input_ids=ids, attention_mask=mask))
        torch.testing.assert_close(real(ours, mask), real(theirs, mask), rtol=1e-5, atol=1e-5)
    # and back: our loader gives the same model
    again = copy.deepcopy(base)
    pk.load_peft_adapter(again, tmp_path / "ours", backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(outputs(again(input_ids=ids, attention_mask=mask)), ours, rtol=1e-6, atol=1e-6)


def test_adapter_errors(tmp_path):
    model = build("llama")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        pk.load_peft_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="not prefix-tuned"):
        pk.save_peft_adapter(model, tmp_path / "x")
    other = build("qwen3")  # other head sizes
    handle = apply(other)
    pk.save_peft_adapter(handle, tmp_path / "qwen3")
    with pytest.raises(ValueError, match="num_attention_heads=1, but LlamaForCausalLM needs 2"):
        pk.load_peft_adapter(model, tmp_path / "qwen3")
    lora = peft.get_peft_model(build("llama"), peft.LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="'LORA' adapter"):
        pk.load_peft_adapter(model, tmp_path / "lora")
    assert not hasattr(model, "prefix_encoder")
    handle.remove()
    with pytest.raises(ValueError, match="removed"):
        pk.save_peft_adapter(handle, tmp_path / "y")

"""Encoder-decoder prefix tuning in "peft" mode against PEFT 0.21.2 itself (``PrefixTuningConfig(task_type=
"SEQ_2_SEQ_LM")``), on tiny random T5, BART and mBART.

What PEFT 0.21.2 does there (read from peft_model.py: ``get_prompt``, ``PeftModelForSeq2SeqLM.forward`` /
``prepare_inputs_for_generation``), pinned by the first tests against the independent eager reference:

- ``num_layers`` is the config's ``num_hidden_layers`` (the *encoder's* layer count) and the table is ``[P,
  num_layers * 2 * H * D]``; ``get_prompt`` duplicates it, splits it in chunks of 4 (self k, v, cross k, v) and
  then empties the cross-attention cache, so the prefix reaches the decoder's self-attention only, decoder layer
  l reading table slot ``2l mod num_layers`` (with 2 layers: slot 0 twice; slot 1 is never read and its
  gradient is zero);
- the prefix sits in the self-attention cache, P ones before ``decoder_attention_mask`` (when given): BART's
  decoder positions start at P, T5's decoder relative bias sees the prefix as the P tokens before the input;
- ``generate`` puts ``get_prompt(batch)`` into the cache at the first (prefill) step only.
"""

import copy

import pytest
import torch

from prefix_kernels.integrations.hf.seq2seq_reference import peft_decoder_prefix, reference_forward

from .seq2seq_models import batch, build, decoder_inputs, eager_copy

peft = pytest.importorskip("peft")


def _peft_twin(base, P=3, **config):
    base.set_attn_implementation("eager")
    cfg = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, **config)
    twin = peft.get_peft_model(base, cfg).eval()
    with torch.no_grad():
        for name, p in twin.prompt_encoder["default"].named_parameters():
            p.normal_(generator=torch.Generator().manual_seed(len(name)))
    return twin


def _table(twin):
    """PEFT's prefix table ``[P, num_layers * 2 * H * D]`` (after the projection, if any) for one row."""
    encoder = twin.prompt_encoder["default"]
    P = twin.peft_config["default"].num_virtual_tokens
    return encoder(torch.arange(P).unsqueeze(0))[0]


@pytest.mark.parametrize("family,layers,projection", [("bart", 2, False), ("t5", 2, True), ("mbart", 3, False),
                                                      ("t5", 3, False)])
def test_peft_prefixes_the_decoder_self_attention_only(family, layers, projection):
    """PEFT's forward is the reference with only a decoder prefix, layer l holding slot 2l mod L."""
    sizes = ({"num_layers": layers, "num_decoder_layers": layers} if family == "t5"
             else {"encoder_layers": layers, "decoder_layers": layers})
    model = build(family, **sizes)
    ref = eager_copy(model)
    extra = {"prefix_projection": True, "encoder_hidden_size": 20} if projection else {}
    twin = _peft_twin(copy.deepcopy(model), **extra)
    config = twin.peft_config["default"]
    assert config.num_layers == layers and config.num_transformer_submodules == 2
    ids, mask, labels = batch(padding="right")
    dec, dmask = decoder_inputs(model, labels)
    theirs = twin(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
    table = _table(twin)
    prefix = peft_decoder_prefix(table, config.num_layers, config.num_attention_heads, layers)
    with torch.no_grad():
        ours = reference_forward(ref, {"decoder": prefix}, input_ids=ids, attention_mask=mask,
                                 decoder_input_ids=dec, decoder_attention_mask=dmask).logits
        naive = table.reshape(table.shape[0], layers, 2, config.num_attention_heads, -1).permute(1, 2, 3, 0, 4)
        layer_by_layer = reference_forward(ref, {"decoder": naive}, input_ids=ids, attention_mask=mask,
                                           decoder_input_ids=dec, decoder_attention_mask=dmask).logits
    keep = dmask.bool()
    torch.testing.assert_close(theirs[keep], ours[keep], rtol=1e-5, atol=1e-5)
    assert (layer_by_layer[keep] - theirs[keep]).abs().max() > 1e-3  # slot l for layer l is not what PEFT does
    if layers == 2 and not projection:  # slot 1 is never read
        theirs[keep].square().sum().backward()
        grad = twin.prompt_encoder["default"].embedding.weight.grad.reshape(3, 2, 2, -1)  # [P, slot, kv, H*D]
        assert grad[:, 0].abs().max() > 0 and torch.equal(grad[:, 1], torch.zeros_like(grad[:, 1]))

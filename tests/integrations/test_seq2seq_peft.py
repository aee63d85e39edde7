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

from prefix_kernels.integrations.hf.seq2seq_reference import (
    peft_decoder_prefix,
    reference_forward,
    reference_generate,
)
from prefix_kernels.testing import compare

from .seq2seq_models import apply, batch, build, decoder_inputs, eager_copy

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


# ---------------------------------------------------------------------------------- "peft" mode against PEFT itself
def _sizes(family, layers):
    if family == "t5":
        return {"num_layers": layers, "num_decoder_layers": layers}
    return {"encoder_layers": layers, "decoder_layers": layers}


def _pair(family, layers=2, projection=False, P=3, scale=1.0):
    """Ours in "peft" mode and PEFT's twin of the same base model, holding the same random prefix weights (std
    ``scale``: 3 for generation, where tiny T5's greedy tokens ignore a prefix of std 1)."""
    model = build(family, **_sizes(family, layers))
    base = copy.deepcopy(model)
    extra = {"prefix_projection": True, "encoder_hidden_size": 20} if projection else {}
    handle = apply(model, prefix_sites="peft", num_virtual_tokens=P, **extra)
    with torch.no_grad():
        for p in handle.prefix_encoder.parameters():
            p.normal_(0.0, scale, generator=torch.Generator().manual_seed(p.numel()))
    base.set_attn_implementation("eager")
    twin = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, **extra))
    twin.prompt_encoder["default"].load_state_dict(handle.prefix_encoder.state_dict())
    return model, handle, twin.eval()


def _close(ours, theirs, what):
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _sdpa_copy(twin):
    """PEFT's twin on transformers' sdpa attention (its default), or None where this transformers gives the family
    no sdpa path."""
    other = copy.deepcopy(twin)
    try:
        other.base_model.set_attn_implementation("sdpa")
    except (ValueError, NotImplementedError):
        return None
    return other


def _stock_baseline(truth, eager, sdpa):
    """The fp32 baseline of the tolerance rule where stock PyTorch has two paths (PEFT on eager attention and on
    sdpa): per quantity, the one farther from the truth.

    Both are plain PyTorch in fp32, and on these tiny models the prefix gradients are sensitive enough that one
    path alone is a poor measure of fp32's error: on T5 with a projection (left padding), d embedding.weight is off
    by 1.2e-4 through eager and 7.1e-4 through sdpa, and the fp64 model with its fp32 weights moved by half an ulp
    (nothing rounded) moves it by 6e-5 to 7.4e-4. The sdpa path widens the bound only where it agrees with eager's
    logits to fp32's precision, so a broken sdpa path cannot loosen it."""
    logits = [eager[0], sdpa[0]]
    assert (logits[0] - logits[1]).abs().max() <= 1e-4 * max(1.0, truth[0].abs().max().item()), \
        "PEFT's sdpa and eager paths disagree: the baseline would not be fp32's rounding"

    def worse(ref, a, b):
        return a if (a.double() - ref.double()).abs().max() >= (b.double() - ref.double()).abs().max() else b

    grads = {n: worse(truth[2][n], eager[2][n], sdpa[2][n]) for n in truth[2]}
    return worse(truth[0], eager[0], sdpa[0]), worse(truth[1], eager[1], sdpa[1]), grads


@pytest.mark.parametrize("family,layers,projection", [("bart", 2, False), ("bart", 2, True), ("mbart", 2, False),
                                                      ("t5", 2, False), ("t5", 2, True), ("bart", 3, False),
                                                      ("t5", 3, True)])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_peft_mode_matches_peft(family, layers, projection, padding):
    """Logits at real target tokens, the loss from labels and every prefix-encoder gradient are PEFT's, under the
    tolerance rule (truth: PEFT in fp64; baseline: PEFT in fp32, the worse of its eager and sdpa attention, see
    :func:`_stock_baseline`), with the source padded on either side (3 layers: PEFT's slot rule 2l mod L is not
    the identity there)."""
    model, handle, twin = _pair(family, layers, projection)
    truth_twin = copy.deepcopy(twin).double()
    sdpa_twin = _sdpa_copy(twin)
    ids, mask, labels = batch(padding=padding)
    real = labels != -100
    probe = None

    def run(net, params):
        nonlocal probe
        out = net(input_ids=ids, attention_mask=mask, labels=labels)
        logits = out.logits[real]
        if probe is None:
            probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        ((logits.double() * probe).sum() + out.loss.double()).backward()
        return logits.detach(), out.loss.detach(), {n: p.grad for n, p in params}

    ours = run(model, handle.prefix_encoder.named_parameters())
    eager = run(twin, twin.prompt_encoder["default"].named_parameters())
    truth = run(truth_twin, truth_twin.prompt_encoder["default"].named_parameters())
    base = eager
    if sdpa_twin is not None:
        sdpa = run(sdpa_twin, sdpa_twin.prompt_encoder["default"].named_parameters())
        base = _stock_baseline(truth, eager, sdpa)
    n_terms = handle.num_virtual_tokens + ids.shape[1]
    results = [compare("logits", ours[0], truth[0], base[0], 2.0, n_terms),
               compare("loss", ours[1], truth[1], base[1], 2.0, n_terms)]
    assert set(ours[2]) == set(truth[2])
    for name in ours[2]:
        results.append(compare(f"d {name}", ours[2][name], truth[2][name], base[2][name], 3.0, n_terms * ids.shape[0]))
    failed = [str(r) for r in results if not r.ok]
    assert not failed, "tolerance rule violated:\n  " + "\n  ".join(failed)


@pytest.mark.parametrize("family", ["bart", "mbart", "t5"])
def test_peft_mode_with_a_decoder_mask_matches_peft(family):
    """decoder_input_ids with a decoder_attention_mask (PEFT prepends P ones to it)."""
    model, handle, twin = _pair(family)
    ids, mask, labels = batch(padding="right")
    dec, dmask = decoder_inputs(model, labels)
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dmask}
    with torch.no_grad():
        _close(model(**inputs).logits[dmask.bool()], twin(**inputs).logits[dmask.bool()], "logits")


@torch.no_grad()
def _peft_forward_greedy(twin, ids, mask, steps):
    """Greedy decoding by PEFT's own forward, recomputed over the tokens so far each step (no cache): the tokens
    PEFT's prefix gives, whether or not PEFT's generate() passes it on."""
    start = twin.get_base_model().config.decoder_start_token_id
    tokens = torch.full((ids.shape[0], 1), start, dtype=torch.long)
    for _ in range(steps):
        logits = twin(input_ids=ids, attention_mask=mask, decoder_input_ids=tokens).logits[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def _peft_decoder_sites(twin):
    config = twin.peft_config["default"]
    layers = len(twin.get_base_model().get_decoder().block if hasattr(twin.get_base_model().get_decoder(), "block")
                 else twin.get_base_model().get_decoder().layers)
    with torch.no_grad():
        return {"decoder": peft_decoder_prefix(_table(twin), config.num_layers, config.num_attention_heads, layers)}


@pytest.mark.parametrize("family,layers", [("bart", 2), ("mbart", 2), ("t5", 2), ("bart", 3)])
@pytest.mark.parametrize("beams", [1, 3])
def test_peft_mode_generates_peft_tokens(family, layers, beams):
    """generate() (greedy; beam search) gives the tokens of PEFT's prefix: PEFT's own forward decoding greedily,
    and the reference holding PEFT's decoder prefix under transformers' generate (greedy and beam)."""
    model, handle, twin = _pair(family, layers, P=4, scale=3.0)
    ref = eager_copy(twin.get_base_model())
    ids, mask, _ = batch(padding="right")
    options = {"max_new_tokens": 6, "do_sample": False, "num_beams": beams}
    with torch.no_grad():
        ours = model.generate(input_ids=ids, attention_mask=mask, **options)
        with handle.disabled():
            plain = model.generate(input_ids=ids, attention_mask=mask, **options)
    assert not torch.equal(ours, plain)  # the prefix changes the tokens: the comparisons can fail
    reference = reference_generate(ref, _peft_decoder_sites(twin), input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(ours, reference)
    if beams == 1:
        assert torch.equal(ours, _peft_forward_greedy(twin, ids, mask, 6))


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize("beams", [1, 3])
def test_peft_mode_generates_what_peft_generate_does(family, beams):
    """Against PEFT's generate() itself, where it passes its prefix on. PEFT 0.21.2 with transformers 5.24 does
    not: its prepare_inputs_for_generation puts the prompt under ``past_key_values`` while generate() hands the
    model its own (empty) cache under ``cache``, which wins, so PEFT generates as if it had no prefix."""
    model, handle, twin = _pair(family, P=4, scale=3.0)
    ids, mask, _ = batch(padding="right")
    options = {"max_new_tokens": 6, "do_sample": False, "num_beams": beams}
    with torch.no_grad():
        ours = model.generate(input_ids=ids, attention_mask=mask, **options)
        theirs = twin.generate(input_ids=ids, attention_mask=mask, **options)
        with twin.disable_adapter():
            unprefixed = twin.get_base_model().generate(input_ids=ids, attention_mask=mask, **options)
    if torch.equal(theirs, unprefixed) and not torch.equal(ours, unprefixed):
        pytest.skip(f"PEFT {peft.__version__}'s generate() drops its seq2seq prefix with this transformers (it "
                    "generates the unprefixed model's tokens); test_peft_mode_generates_peft_tokens checks ours "
                    "against PEFT's forward instead")
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_a_peft_adapter_loads_and_gives_peft_outputs(tmp_path, family):
    import prefix_kernels as pk

    base = build(family)
    twin = _peft_twin(copy.deepcopy(base), P=4, prefix_projection=True, encoder_hidden_size=20)
    twin.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    handle = pk.load_peft_adapter(model, tmp_path / "peft", backend="torch")
    assert set(handle.site_prefixes()) == {"decoder"}
    ids, mask, labels = batch(padding="left")
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels)
        theirs = twin(input_ids=ids, attention_mask=mask, labels=labels)
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    their_tokens = _peft_forward_greedy(twin, ids, mask, 5)
    real = labels != -100
    _close(ours.logits[real], theirs.logits[real], "logits")
    _close(ours.loss, theirs.loss, "loss")
    assert torch.equal(tokens, their_tokens)


@pytest.mark.parametrize("family,layers", [("bart", 2), ("t5", 3)])
def test_ours_saved_loads_into_peft(tmp_path, family, layers):
    import prefix_kernels as pk

    model, handle, _ = _pair(family, layers, projection=True)
    base = build(family, **_sizes(family, layers))
    pk.save_peft_adapter(model, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    config = loaded.peft_config["default"]
    assert config.task_type == "SEQ_2_SEQ_LM" and config.num_transformer_submodules == 2
    ids, mask, labels = batch(padding="right")
    real = labels != -100
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels).logits[real]
        theirs = loaded(input_ids=ids, attention_mask=mask, labels=labels).logits[real]
        again = copy.deepcopy(base)
        pk.load_peft_adapter(again, tmp_path / "ours", backend="torch")
        back = again(input_ids=ids, attention_mask=mask, labels=labels).logits[real]
    _close(ours, theirs, "logits")
    _close(back, ours, "logits after our reload")


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_paper_mode_adapter_is_not_misread_by_peft(tmp_path, family):
    """PEFT has no layout for three sites: what save_peft_adapter writes in "paper" mode must not load into PEFT
    (which would misread it as a decoder prefix), and must reload here exactly."""
    import prefix_kernels as pk

    base = build(family)
    model = copy.deepcopy(base)
    handle = apply(model, prefix_sites="paper", num_virtual_tokens=4)
    with torch.no_grad():
        for p in handle.prefix_encoder.parameters():
            p.normal_(generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="PEFT"):
        pk.save_peft_adapter(model, tmp_path / "paper")
    with pytest.raises(Exception):  # noqa: B017 (PEFT's own error: a missing adapter_config.json)
        peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "paper")
    again = copy.deepcopy(base)
    reloaded = pk.load_peft_adapter(again, tmp_path / "paper", backend="torch")
    assert set(reloaded.site_prefixes()) == {"encoder", "decoder", "cross"}
    ids, mask, labels = batch(padding="right")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask, labels=labels).logits,
                           model(input_ids=ids, attention_mask=mask, labels=labels).logits)

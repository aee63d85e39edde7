"""PrefixEncoder against PEFT's prefix encoder: the layout PEFT feeds each layer, the state dict, and the
output and every parameter gradient of both backends under the tolerance rule.

On a CPU machine the Triton backend runs in the interpreter (see conftest.py).
"""

import pytest
import torch

from prefix_kernels import PrefixEncoder
from prefix_kernels.testing import assert_parity

from .reparam_cases import ODD, TINY, check_against_peft, ours_from, peft_config, peft_encoder, peft_prefix

pytest.importorskip("peft")

BACKENDS = ("triton", "torch")


@pytest.mark.parametrize(
    "dtype,autocast",
    [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16),
     (torch.float32, torch.float16)],
    ids=["fp32", "fp16", "bf16", "fp32-autocast-bf16", "fp32-autocast-fp16"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_projection_matches_peft(backend, dtype, autocast):
    assert_parity(check_against_peft(ODD, dtype, backend, autocast=autocast))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_single_head(backend, dtype):
    assert_parity(check_against_peft(TINY, dtype, backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_without_projection_matches_peft(dtype):
    """The plain prefix is a view of embedding.weight: equal to PEFT's bit for bit, gradients too."""
    results = check_against_peft(ODD, dtype, "auto", projection=False)
    assert_parity(results)
    assert all(r.error == 0.0 for r in results), [str(r) for r in results]


def test_without_projection_is_a_view_not_a_copy():
    ours = PrefixEncoder(5, 3, 2, 16)
    prefix = ours()
    assert prefix.shape == (3, 2, 2, 5, 16)
    assert prefix.data_ptr() == ours.embedding.weight.data_ptr()
    with torch.no_grad():
        ours.embedding.weight[2, 16 * 2 + 3] = 42.0  # layer 0, values (kv = 1), head 0, token 2, d = 3
    assert prefix[0, 1, 0, 2, 3].item() == 42.0


@pytest.mark.parametrize("projection", [True, False])
def test_state_dict_loads_strict_and_saves_back_the_same(projection):
    from peft import PrefixEncoder as PeftPrefixEncoder

    enc = peft_encoder(ODD, projection)
    ours = ours_from(enc, ODD, torch.float32, "auto", projection)
    saved = ours.state_dict()
    assert list(saved) == list(enc.state_dict())
    for k, v in enc.state_dict().items():
        assert torch.equal(saved[k], v), k
    fresh = PeftPrefixEncoder(peft_config(ODD, projection))
    fresh.load_state_dict(saved, strict=True)
    assert torch.equal(peft_prefix(fresh, ODD), peft_prefix(enc, ODD))


@pytest.mark.parametrize("backend", BACKENDS)
def test_once_per_step_gradient_equals_peft_per_batch_row(backend):
    """PEFT runs the MLP for every batch row; the prefix is shared, so the gradient of running it once with
    the rows' upstream gradients summed (what prefix_attention's in-kernel batch reduction hands back)
    is the gradient PEFT accumulates over its B copies."""
    enc = peft_encoder(ODD)
    ours = ours_from(enc, ODD, torch.float32, backend)
    prefix_rows = peft_prefix(enc, ODD, batch=3)  # [L, 2, B, Hkv, P, D]
    assert torch.equal(prefix_rows[:, :, 0], prefix_rows[:, :, 2])
    g = torch.randn(prefix_rows.shape, generator=torch.Generator().manual_seed(3))
    (prefix_rows * g).sum().backward()
    out = ours()
    (out * g.sum(2)).sum().backward()
    torch.testing.assert_close(out, prefix_rows[:, :, 0], rtol=1e-5, atol=1e-5)
    peft_grads = dict(enc.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, peft_grads[name].grad, rtol=1e-4, atol=1e-4, msg=name)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_is_what_peft_get_prompt_feeds_each_layer(backend, projection):
    """A real PeftModel (tiny Llama, GQA 4/2, no weights downloaded): layer l of get_prompt's cache holds
    out[l, 0] as keys and out[l, 1] as values for every batch row."""
    pytest.importorskip("transformers")
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                             prefix_projection=projection, encoder_hidden_size=24))
    cfg = model.peft_config["default"]
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.token_dim) == (3, 2, 32)  # kv heads, Hkv * D
    enc = model.prompt_encoder["default"]
    ours = PrefixEncoder(5, 3, 2, 16, prefix_projection=projection, encoder_hidden_size=24, backend=backend)
    ours.load_state_dict(enc.state_dict(), strict=True)
    with torch.no_grad():
        cache = model.get_prompt(batch_size=2)
        prefix = ours()
    for layer in range(3):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values  # [B, Hkv, P, D]
        for b in range(2):
            torch.testing.assert_close(prefix[layer, 0], keys[b], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(prefix[layer, 1], values[b], rtol=1e-5, atol=1e-6)


def test_dropout_in_training_only():
    torch.manual_seed(0)
    ours = PrefixEncoder(7, 2, 2, 16, prefix_projection=True, prefix_dropout=0.5, backend="torch")
    clean = ours.eval()()
    dropped = ours.train()()
    zeros = dropped == 0
    assert 0.3 < zeros.float().mean().item() < 0.7
    torch.testing.assert_close(dropped[~zeros], clean[~zeros] * 2.0)
    assert torch.equal(ours.eval()(), clean)


def test_output_dtype_argument():
    ours = PrefixEncoder(4, 2, 2, 16, prefix_projection=True, backend="torch")
    out = ours(dtype=torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ours().detach(), rtol=2e-3, atol=2e-3)
    plain = PrefixEncoder(4, 2, 2, 16)
    torch.testing.assert_close(plain(dtype=torch.bfloat16), plain().detach().to(torch.bfloat16))


def test_prefix_unpacks_into_per_layer_views():
    ours = PrefixEncoder(4, 3, 2, 16, prefix_projection=True, backend="torch")
    prefix = ours()
    for layer in range(3):
        pk, pv = prefix[layer]
        assert pk.shape == pv.shape == (2, 4, 16)
        assert pk.data_ptr() == prefix.data_ptr() + layer * 2 * pk.numel() * prefix.element_size()
        assert pv.data_ptr() == pk.data_ptr() + pk.numel() * prefix.element_size()


def test_triton_is_deterministic():
    enc = peft_encoder(ODD)
    grads = []
    for _ in range(2):
        ours = ours_from(enc, ODD, torch.float32, "triton")
        (ours() ** 2).sum().backward()
        grads.append([p.grad for p in ours.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)

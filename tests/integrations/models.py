"""Tiny random-weight models of every supported family (2 layers, hidden 64, 4 heads of 16), batches with
padding, and the comparisons the integration tests share. Nothing is downloaded."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import prefix_kernels as pk  # noqa: E402
from prefix_kernels.integrations.hf.reference import compare_with_reference  # noqa: E402
from prefix_kernels.testing import compare  # noqa: E402

VOCAB = 97
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4}
ENCODER_DROPOUTS = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _config(family: str, **overrides):
    t = transformers
    if family == "bert":
        return t.BertConfig(**COMMON, **{**ENCODER_DROPOUTS, **overrides})
    if family == "roberta":
        return t.RobertaConfig(**COMMON, pad_token_id=1, max_position_embeddings=40,
                               **{**ENCODER_DROPOUTS, **overrides})
    if family == "gpt2":
        return t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, initializer_range=0.2,
                            **overrides)
    if family == "llama":
        return t.LlamaConfig(**COMMON, num_key_value_heads=2, **overrides)
    if family == "qwen2":
        # the second layer slides (with a window too wide to cut anything: tests/…/test_hf_parity has the window test)
        return t.Qwen2Config(**COMMON, num_key_value_heads=2, sliding_window=64,
                             **{"use_sliding_window": True, "max_window_layers": 1, **overrides})
    if family == "qwen3":
        return t.Qwen3Config(**COMMON, num_key_value_heads=1, head_dim=32, **overrides)  # head_dim != 64 / 4
    if family == "mistral":
        return t.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=overrides.pop("sliding_window", 64),
                               **overrides)
    if family == "gemma2":
        return t.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                              attn_logit_softcapping=2.0, sliding_window=overrides.pop("sliding_window", 64),
                              **overrides)
    if family == "opt":
        return t.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0, max_position_embeddings=64,
                           **overrides)
    if family == "bloom":
        return t.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, hidden_dropout=0.0,
                             attention_dropout=0.0, initializer_range=0.2, **overrides)
    raise ValueError(family)


DECODERS = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma2", "opt", "bloom")
ENCODERS = ("bert", "roberta")
HEADS = {"seq_cls": "ForSequenceClassification", "token_cls": "ForTokenClassification",
         "qa": "ForQuestionAnswering", "lm": "ForCausalLM"}
_CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta", "gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2",
                 "qwen3": "Qwen3", "mistral": "Mistral", "gemma2": "Gemma2", "opt": "OPT", "bloom": "Bloom"}


def build(family: str, head: str = "lm", seed: int = 0, **overrides):
    """A tiny model of ``family`` with the given head, in eval mode, with random weights from ``seed``. (GPT-2 and
    Bloom are initialised 10x wider than their defaults: at the default, their tied embeddings decide the greedy
    tokens alone and a prefix could not change them.)"""
    name = _CLASS_PREFIX[family] + HEADS[head]
    if family == "gpt2" and head == "lm":
        name = "GPT2LMHeadModel"
    config = _config(family, **overrides)
    if head != "lm":
        config.num_labels = 2 if head == "qa" else 3
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, name)(config)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None  # greedy runs for exactly max_new_tokens
    return model.eval()


def eager_copy(model):
    """The same weights with transformers' eager attention: the reference model."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref


def batch(batch_size: int = 3, length: int = 9, padding: str | None = "left", seed: int = 1):
    """(input_ids, attention_mask): row 0 full, the others padded by 2 and 4 tokens on ``padding``'s side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    if padding is not None:
        for row in range(1, batch_size):
            pads = min(2 * row, length - 1)
            if padding == "left":
                mask[row, :pads] = 0
            else:
                mask[row, length - pads:] = 0
    return ids.masked_fill(mask == 0, 1), mask


def real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The entries of per-token outputs ``[B, L, ...]`` at real tokens (or x itself if not per token)."""
    if x.dim() >= 2 and x.shape[:2] == mask.shape:
        return x[mask.bool()]
    return x


def outputs(result) -> torch.Tensor:
    """The logits of a model output (both QA logits stacked)."""
    if hasattr(result, "start_logits"):
        return torch.stack([result.start_logits, result.end_logits], dim=-1)
    return result.logits


def loss_of(x: torch.Tensor, mask: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """A fixed random linear functional of the real entries of ``x``: its gradient probes every entry."""
    x = real(x, mask)
    g = torch.Generator().manual_seed(seed)
    return (x.float() * torch.randn(x.shape, generator=g).to(x.device)).sum()


def encoder_grads(handle) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in handle.prefix_encoder.named_parameters()}


def apply(model, **config):
    config.setdefault("num_virtual_tokens", 3)
    config.setdefault("backend", "torch")
    return pk.apply_prefix_tuning(model, pk.PrefixConfig(**config))


def assert_rule(name: str, ours: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor, factor: float = 2.0,
                n_terms: int = 64):
    """prefix_kernels.testing's tolerance rule: ours is at most ``factor`` times as far from the fp64 truth as
    the eager fp32 reference, plus one rounding of fp32 accumulated over ``n_terms``."""
    result = compare(name, ours, truth, baseline, factor, n_terms)
    assert result.ok, str(result)
    return result


def parity(model, ref, handle, ids, mask, *, grads: bool = True, **forward_kwargs):
    """The outputs at real tokens and every prefix-encoder gradient of ``model`` against the eager reference
    ``ref`` (made before applying), under the tolerance rule (truth: ``ref`` in fp64; baseline: ``ref`` in fp32)."""
    results = compare_with_reference(model, ref, handle, ids, mask, grads=grads, **forward_kwargs)
    failed = [str(r) for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    return results


def compile_recording(model):
    """``torch.compile(model, fullgraph=True)`` through AOTAutograd (aot_eager), after a dynamo reset; returns
    the compiled model and the list that receives every graph it builds (to count recompilations)."""
    from torch._dynamo import lookup_backend

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(model, backend=backend, fullgraph=True), graphs


def checkpointing_enable(model, **checkpoint_kwargs):
    """Activation (gradient) checkpointing by transformers' new name where it has one (5.24:
    ``activation_checkpointing_enable``; the old ``gradient_checkpointing_enable`` warns FutureWarning), else the
    old (5.17, the GPU machine's). ``checkpoint_kwargs`` go to ``torch.utils.checkpoint.checkpoint``."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs or None)


def checkpointing_disable(model):
    """The undo of :func:`checkpointing_enable`, by the same rule."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def is_checkpointing(model) -> bool:
    """``model.is_activation_checkpointing`` (5.24), else ``is_gradient_checkpointing`` (5.17)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


# ---------------------------------------------------------------------------------------------------- seq2seq
SEQ2SEQ = ("t5", "bart", "mbart")
_SEQ2SEQ_CLASS = {"t5": "T5", "mt5": "MT5", "bart": "Bart", "mbart": "MBart", "marian": "Marian",
                  "pegasus": "Pegasus"}


def _seq2seq_config(family: str, **overrides):
    t = transformers
    if family in ("t5", "mt5"):
        # initializer_factor 5: at the default the random logits are nearly flat and a prefix moves no token
        kind = t.T5Config if family == "t5" else t.MT5Config
        return kind(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, dropout_rate=0.0,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
                    eos_token_id=1, decoder_start_token_id=0, initializer_factor=5.0, **overrides)
    kinds = {"bart": t.BartConfig, "mbart": t.MBartConfig, "marian": t.MarianConfig, "pegasus": t.PegasusConfig}
    return kinds[family](vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96,
                         max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                         pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, init_std=0.2,
                         forced_eos_token_id=None, **overrides)


def build_seq2seq(family: str, head: str = "lm", seed: int = 0, **overrides):
    """A tiny encoder-decoder model (2 + 2 layers, d_model 64, 4 heads of 16): ``head`` "lm" for
    ``*ForConditionalGeneration``, "bare" for the bare model; eval mode; greedy runs for exactly max_new_tokens."""
    name = _SEQ2SEQ_CLASS[family] + ("ForConditionalGeneration" if head == "lm" else "Model")
    if family == "marian" and head == "lm":
        name = "MarianMTModel"
    config = _seq2seq_config(family, **overrides)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, name)(config)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.eos_token_id = None
        generation.forced_eos_token_id = None
        generation.forced_bos_token_id = None
    return model.eval()


def seq2seq_batch(batch_size: int = 3, length: int = 9, target: int = 6, seed: int = 1):
    """``input_ids``, ``attention_mask`` (rows after the first right-padded by 2 and 4) and ``labels`` (the last
    row's tail -100; the model shifts them right into its decoder inputs)."""
    ids, mask = batch(batch_size, length, padding="right", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(3, VOCAB, (batch_size, target), generator=g)
    labels[-1, target - 2:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

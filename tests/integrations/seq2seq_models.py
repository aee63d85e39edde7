"""Tiny random-weight encoder-decoder models (T5, BART, mBART: 2 + 2 layers, d_model 32, 4 heads of 8, vocab 97)
and padded source / target batches, for the seq2seq parity tests. Nothing is downloaded."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import prefix_kernels as pk  # noqa: E402

VOCAB = 97
SEQ2SEQ = ("t5", "bart", "mbart")
PAD = 1


def config(family: str, **overrides):
    t = transformers
    if family in ("t5", "mt5"):
        cls = t.T5Config if family == "t5" else t.MT5Config
        # d_kv != d_model / heads is allowed in T5: keep it equal; relative buckets small so the prefix's distance
        # lands in distinct buckets
        return cls(**{**dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                             num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                             dropout_rate=0.0, pad_token_id=PAD, eos_token_id=2, decoder_start_token_id=0),
                      **overrides})
    common = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD, bos_token_id=0,
                  eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, init_std=0.2)
    if family == "bart":
        return t.BartConfig(**{**common, **overrides})
    if family == "mbart":
        return t.MBartConfig(**{**common, **overrides})
    raise ValueError(family)


_CLASSES = {"t5": "T5", "mt5": "MT5", "bart": "Bart", "mbart": "MBart"}


def build(family: str, *, bare: bool = False, seed: int = 0, **overrides):
    """A tiny ``*ForConditionalGeneration`` (or the bare ``*Model``) in eval mode, random weights from ``seed``.
    BART-likes are initialised with std 0.2 (their default 0.02 makes the tied embeddings decide the greedy tokens
    alone); generation runs exactly max_new_tokens (no eos, no forced tokens)."""
    name = _CLASSES[family] + ("Model" if bare else "ForConditionalGeneration")
    cfg = config(family, **overrides)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, name)(cfg)
    if family in ("t5", "mt5"):  # T5's default init (factor 1.0) gives near-constant logits at this size
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = None
        gen.forced_eos_token_id = None
        gen.forced_bos_token_id = None
        gen.min_length = 0
        gen.no_repeat_ngram_size = 0
        gen.max_length = None
    return model.eval()


def eager_copy(model):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref


def batch(batch_size: int = 3, src_len: int = 9, tgt_len: int = 6, padding: str | None = "right", seed: int = 1):
    """(input_ids, attention_mask, labels): row 0 full, the others' sources padded by 2 and 4 tokens on
    ``padding``'s side; labels right-padded with -100 (by 1 and 3 tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, src_len), generator=g)
    mask = torch.ones(batch_size, src_len, dtype=torch.long)
    labels = torch.randint(3, VOCAB, (batch_size, tgt_len), generator=g)
    for row in range(1, batch_size):
        pads = min(2 * row, src_len - 1)
        if padding == "left":
            mask[row, :pads] = 0
        elif padding == "right":
            mask[row, src_len - pads:] = 0
        labels[row, tgt_len - min(2 * row - 1, tgt_len - 1):] = -100
    return ids.masked_fill(mask == 0, PAD), mask, labels


def decoder_inputs(model, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder_input_ids, decoder_attention_mask) the model derives from ``labels``: shifted right, the -100
    tail padded (the mask marks it, so the decoder's own padding is exercised too)."""
    dec = model._shift_right(labels) if hasattr(model, "_shift_right") else _shift_bart(model, labels)
    keep = torch.cat([torch.ones_like(labels[:, :1]), (labels[:, :-1] != -100).long()], dim=1)
    return dec, keep


def _shift_bart(model, labels):
    from transformers.models.bart.modeling_bart import shift_tokens_right

    return shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)


def apply(model, **config):
    config.setdefault("num_virtual_tokens", 3)
    config.setdefault("backend", "torch")
    return pk.apply_prefix_tuning(model, pk.PrefixConfig(**config))

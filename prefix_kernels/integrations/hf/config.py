"""``PrefixConfig``: what :func:`apply_prefix_tuning` builds. Plain data, checked on construction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefixConfig:
    """How to prefix-tune a model.

    Args:
        num_virtual_tokens: P, the number of learned prefix positions per layer.
        prefix_projection: learn the prefix through a two-layer MLP (Li & Liang, P-Tuning v2) or as a table.
        encoder_hidden_size: the MLP's hidden size (default: num_kv_heads * head_dim, as PEFT).
        prefix_dropout: dropout on the prefix in training (one mask per step, shared by the batch).
        shift_positions: True (PEFT's semantics): the real tokens' positions start at P, as if P tokens preceded
            them (RoPE, learned absolute positions and Bloom's ALiBi alike). False: they start at 0.
        modules_to_save: modules trained beside the prefix, by name or name suffix (PEFT's ``modules_to_save``).
            "auto": the task head PEFT trains for the model's task (``classifier``/``score`` for sequence and
            token classification, ``qa_outputs`` for question answering), none for language models. The model's
            own module is swapped for a trainable copy; ``remove()`` puts the original back.
        freeze_base_model: set ``requires_grad=False`` on every parameter of the model (``remove()`` restores
            the previous flags).
        backend: prefix_attention / PrefixEncoder backend ("auto", "triton", "torch").
        encoder_dtype: dtype of the prefix encoder's parameters (default float32, as PEFT keeps adapter weights;
            the prefix is cast to the attention's dtype when it is computed).
        prefix_init: how the prefix starts: "random" (PEFT's default initialisation), "zeros" (the table, or with a
            projection the MLP's output layer, set to zero), or P token ids (a sequence of ints: the keys and
            values the frozen model computes for those tokens, as if they preceded the input; decoders without a
            projection, see :func:`prefix_kernels.init_prefix_from_tokens`). PEFT #3128 measured zeros and
            real-token initialisation far ahead of random on MetaMathQA.
        prefix_sites: for encoder-decoder models (T5, BART, mBART, Marian, Pegasus), which attentions get a
            prefix: "paper" (the default, None: the encoder's self-attention, the decoder's self-attention and the
            decoder's cross-attention, each its own learned prefix per layer, as Li & Liang and adapter-hub
            ``adapters``) or "peft" (the decoder's self-attention only, exactly PEFT's prefix tuning, whose
            adapters then load both ways). Models with one kind of attention (decoder-only, encoder-only) accept
            both values, which mean the same there: their self-attention. See
            :mod:`prefix_kernels.integrations.hf.seq2seq` for the positions of each site.
    """

    num_virtual_tokens: int
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    prefix_dropout: float = 0.0
    shift_positions: bool = True
    modules_to_save: tuple[str, ...] | str | None = "auto"
    freeze_base_model: bool = True
    backend: str = "auto"
    encoder_dtype: torch.dtype | None = None
    prefix_init: str | tuple[int, ...] = "random"
    prefix_sites: str | None = None

    def __post_init__(self):
        p = self.num_virtual_tokens
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"num_virtual_tokens must be an int, got {type(p).__name__}")
        if p < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {p}")
        for name in ("prefix_projection", "shift_positions", "freeze_base_model"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        hidden = self.encoder_hidden_size
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"encoder_hidden_size must be a positive int or None, got {hidden!r}")
        drop = self.prefix_dropout
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
            raise ValueError(f"prefix_dropout must be a float in [0, 1), got {drop!r}")
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a string, got {type(self.backend).__name__}")
        if self.encoder_dtype is not None and (not isinstance(self.encoder_dtype, torch.dtype)
                                               or not self.encoder_dtype.is_floating_point):
            raise TypeError(f"encoder_dtype must be a floating torch.dtype or None, got {self.encoder_dtype!r}")
        init = self.prefix_init
        if isinstance(init, str):
            if init not in ("random", "zeros"):
                raise ValueError(f'prefix_init must be "random", "zeros" or a sequence of token ids, got {init!r}')
        else:
            if isinstance(init, torch.Tensor):
                init = init.flatten().tolist()
            if not isinstance(init, Sequence) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in init):
                raise TypeError(f'prefix_init must be "random", "zeros" or a sequence of token ids, got {init!r}')
            if len(init) != p:
                raise ValueError(f"prefix_init has {len(init)} token ids but num_virtual_tokens={p}: give one token "
                                 "per prefix position")
            object.__setattr__(self, "prefix_init", tuple(init))
        if self.prefix_sites is not None and self.prefix_sites not in ("paper", "peft"):
            raise ValueError(f'prefix_sites must be "paper", "peft" or None (the model\'s default), got '
                             f'{self.prefix_sites!r}')
        modules = self.modules_to_save
        if modules is None:
            modules = ()
        elif isinstance(modules, str):
            if modules != "auto":
                modules = (modules,)
        elif isinstance(modules, Sequence) and all(isinstance(m, str) and m for m in modules):
            modules = tuple(modules)
        else:
            raise TypeError(f'modules_to_save must be "auto", None, a module name or a list of names, got {modules!r}')
        object.__setattr__(self, "modules_to_save", modules)

"""Integrations with model libraries.

``hf``: prefix tuning for Hugging Face transformers models (attention registration, per-family adapters,
apply / remove). ``peft``: read and write PEFT prefix-tuning adapter directories.

Integrations call :func:`prefix_kernels.prefix_attention` and :class:`prefix_kernels.PrefixEncoder`; they know
nothing of the backends or kernels behind them.
"""

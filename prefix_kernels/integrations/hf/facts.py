"""Facts read off a Hugging Face model, for the integration and the PEFT adapter I/O: its attention sizes, the
modules a name (or name suffix) matches, and the task heads PEFT trains for its head class.

A leaf: it imports nothing of the package, so both ``apply.py`` and ``integrations/peft.py`` can read it.
"""

from __future__ import annotations

from torch import nn


class UnsupportedModelError(TypeError):
    """The model's family has no adapter, or its structure is not what the adapter expects."""

# Where applying puts things on the model: the prefix encoder submodule, and the handle (an instance attribute).
ENCODER_NAME = "prefix_encoder"
HANDLE_ATTR = "_prefix_kernels_handle"

# PEFT's task type and modules_to_save for its task-specific models, by the head class's name suffix.
_TASK_HEADS = (
    ("ForSequenceClassification", "SEQ_CLS", ("classifier", "score")),
    ("ForTokenClassification", "TOKEN_CLS", ("classifier", "score")),
    ("ForQuestionAnswering", "QUESTION_ANS", ("qa_outputs",)),
    ("ForCausalLM", "CAUSAL_LM", ()),
    ("LMHeadModel", "CAUSAL_LM", ()),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM", ()),
)


def model_sizes(model: nn.Module) -> tuple[int, int, int, int]:
    """``(num_layers, num_heads, num_kv_heads, head_dim)`` from the model's config."""
    config = model.config
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, heads, kv_heads, head_dim


def find_modules(model: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Module]:
    """Qualified name -> module, for the modules whose qualified name is, or ends with ``.`` + , one of ``names``
    (PEFT's matching); the outermost match wins (nothing inside a match is listed)."""
    found: dict[str, nn.Module] = {}
    for qualified, module in model.named_modules():
        if any(qualified.startswith(f + ".") for f in found):
            continue
        if any(qualified == n or qualified.endswith("." + n) for n in names):
            found[qualified] = module
    return found


def task_of(model: nn.Module) -> tuple[str | None, tuple[str, ...]]:
    """PEFT's task type for ``model``'s head class and the head modules PEFT trains for it."""
    name = type(model).__name__
    for suffix, task, heads in _TASK_HEADS:
        if name.endswith(suffix):
            return task, heads
    return None, ()

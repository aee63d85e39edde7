"""The mask function registered with transformers' ``AttentionMaskInterface`` under our name.

transformers builds every attention mask through ``create_causal_mask`` / ``create_sliding_window_causal_mask``
/ ``create_bidirectional_mask``, which call the function registered for ``config._attn_implementation`` with
the mask's geometry (query and key lengths and offsets), its pattern (a ``mask_function``) and the 2D padding
mask. Without a registered function a model gets ``attention_mask=None``, even for a padded batch.

Ours materialises nothing of size (B, 1, Lq, P + Lk). It returns a :class:`PrefixMask`: the ``[B, Lk]`` key
padding mask the kernels take directly, whether the pattern is causal (bottom-right aligned, as the op defines
it) or bidirectional, the sliding window, and how many leading key columns are real. That last number matters
for static caches, whose keys are a fixed-size buffer of which only the first ``q_offset + Lq`` slots are
filled: the attention keeps those columns, so that the op's bottom-right alignment holds.

A pattern the op cannot express (packed sequences found from ``position_ids``, models that overlay their own
mask functions) gets the dense boolean mask transformers' SDPA path would build, and the attention takes a
slower explicit path for it. A module that delegates to the model's previous attention implementation asks the
PrefixMask for that implementation's own mask, built lazily from the same arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import masking_utils


@dataclass
class PrefixMask:
    """What one ``create_*_mask`` call hands the attention of every layer that uses it.

    Attributes:
        key_padding_mask: ``[B, kv_end]`` bool, True = attend, or None (every key visible).
        kv_end: keep key columns ``[:kv_end]``; after that the last key belongs to the last query.
        causal: the pattern is causal (else bidirectional).
        sliding_window: W when the pattern is a causal sliding window, else None.
        dense: ``[B, 1, Lq, Lk]`` bool when the pattern is none of the above; the other fields are then unused.
        build_kwargs: the arguments transformers passed, to build another implementation's mask from.
    """

    key_padding_mask: torch.Tensor | None
    kv_end: int
    causal: bool
    sliding_window: int | None = None
    dense: torch.Tensor | None = None
    build_kwargs: dict = field(default_factory=dict, repr=False)
    _for_implementation: dict = field(default_factory=dict, repr=False)

    def for_implementation(self, name: str):
        """The mask transformers would hand the attention implementation ``name`` for the same call (None when
        ``name`` has no mask function, as transformers itself does)."""
        if name not in self._for_implementation:
            builder = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(name)
            self._for_implementation[name] = None if builder is None else builder(**self.build_kwargs)
        return self._for_implementation[name]


def _same_function(a, b) -> bool:
    """Whether two mask functions compute the same thing: the same function, or closures of the same code over
    equal values (ints, tuples, and such functions). Tensors compare by identity."""
    if a is b:
        return True
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same_function(x, y) for x, y in zip(a, b, strict=True))
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    if code_a is not None and code_b is not None:
        if code_a is not code_b:
            return False
        cells_a, cells_b = a.__closure__ or (), b.__closure__ or ()
        return len(cells_a) == len(cells_b) and all(
            _same_function(x.cell_contents, y.cell_contents) for x, y in zip(cells_a, cells_b, strict=True))
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool):
        return a == b
    return False


def classify(mask_function, local_size) -> tuple[str, int | None] | None:
    """("causal", None), ("bidirectional", None), ("sliding", W), or None for a pattern the op cannot take."""
    if mask_function is None or _same_function(mask_function, masking_utils.causal_mask_function):
        return "causal", None
    if _same_function(mask_function, masking_utils.bidirectional_mask_function):
        return "bidirectional", None
    if local_size is not None and _same_function(
            mask_function, masking_utils.sliding_window_causal_mask_function(local_size)):
        return "sliding", int(local_size)
    return None


def _is_int(x) -> bool:
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def prefix_mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                          mask_function=None, attention_mask: torch.Tensor | None = None, local_size=None,
                          **kwargs) -> PrefixMask:
    """The mask function for our attention name (see the module docstring). Arguments as transformers passes
    them to every mask function: ``attention_mask`` is the 2D padding mask (bool) over absolute positions, key
    column j is at ``kv_offset + j`` and query i at ``q_offset + i`` (an int, or a 0-d tensor for static caches).
    """
    build = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                 kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                 local_size=local_size, **kwargs)
    kind = classify(mask_function, local_size)
    if kind is None:
        dense_kwargs = {**build, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False}
        dense_kwargs.pop("local_size", None)
        dense = masking_utils.sdpa_mask(**dense_kwargs)
        return PrefixMask(None, kv_length, causal=False, dense=dense, build_kwargs=build)
    pattern, window = kind

    pad = None
    if attention_mask is not None:
        pad = attention_mask[:, kv_offset:kv_offset + kv_length]
        if pad.shape[-1] < kv_length:  # keys past the given mask are unfilled cache slots, as transformers has it
            pad = F.pad(pad, (0, kv_length - pad.shape[-1]), value=False)

    end = kv_length
    if pattern != "bidirectional":
        if _is_int(q_offset):
            end = min(kv_length, q_offset + q_length - kv_offset)
        elif q_length == 1:
            # A decode step on a static cache, whose fill level is a tensor (reading it would sync and break
            # compiled graphs): keep every column and mask the unfilled and out-of-window slots instead. With one
            # query, bottom-right causality sees every column, so nothing else changes.
            cols = torch.arange(kv_length, device=q_offset.device)
            query = q_offset - kv_offset
            visible = cols <= query
            if window is not None:
                visible = visible & (cols > query - window)
                window = None
            visible = visible.view(1, kv_length).expand(batch_size, kv_length)
            pad = visible if pad is None else pad & visible
        else:  # a multi-token step on a static cache: its fill level is needed as a number
            end = min(kv_length, int(q_offset) + q_length - kv_offset)
    if pad is not None and end < pad.shape[-1]:
        pad = pad[:, :end]
    if pad is not None and pad.device.type == "cpu" and not torch.compiler.is_compiling() and bool(pad.all()):
        pad = None  # generate() passes a mask for an unpadded batch too: on a CPU, where reading it costs no sync,
        # every layer of this forward then skips the padding (transformers' own sdpa mask skips it the same way)
    return PrefixMask(pad, end, causal=pattern != "bidirectional", sliding_window=window, build_kwargs=build)

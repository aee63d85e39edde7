"""Registration of our attention and mask functions with transformers.

``register()`` adds one name, :data:`NAME`, to transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` (idempotent). That adds an entry to their registries and replaces nothing: a model
sees our functions only while its config names them, which applying sets (``Patches.switch_config``) and
``remove()`` undoes. The implementation a config named before is kept on each module's slot (see
``state.PrefixSlot`` / ``state.DelegateSlot``), not here.
"""

from __future__ import annotations

from .attention import IMPLEMENTATION, prefix_attention_forward
from .masks import prefix_mask_interface

NAME = IMPLEMENTATION


def register() -> None:
    """Make :data:`NAME` a valid attention implementation with its own mask function (in this process: a model
    unpickled in another process registers it again)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, prefix_attention_forward)
    AttentionMaskInterface.register(NAME, prefix_mask_interface)

"""pyproject.toml filters three transformers FutureWarnings that PEFT's own calls raise (issue 13 item 6). Those
filters must hide nothing of ours: our paths (apply, forward, backward, generate, checkpointing, the eager
reference, adapter save and load) raise no FutureWarning at all, with every filter overridden."""

import copy
import warnings

import pytest
import torch

import prefix_kernels as pk
from prefix_kernels.integrations.hf.reference import eager_forward

from .models import apply, batch, build, checkpointing_disable, checkpointing_enable, eager_copy, loss_of, outputs


@pytest.mark.parametrize("family,head", [("llama", "lm"), ("bert", "seq_cls")])
def test_our_paths_raise_no_future_warning(tmp_path, family, head):
    model = build(family, head)
    ref = eager_copy(model)
    ids, mask = batch(padding="left" if head == "lm" else "right")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        handle = apply(model, prefix_projection=True, encoder_hidden_size=16)
        model.train()
        checkpointing_enable(model)
        loss_of(outputs(model(input_ids=ids, attention_mask=mask)), mask).backward()
        checkpointing_disable(model)
        model.eval()
        with torch.no_grad():
            eager_forward(ref, handle.prefix(), ids, mask)
            if head == "lm":
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        pk.save_peft_adapter(model, tmp_path)
        pk.load_peft_adapter(copy.deepcopy(ref), tmp_path, backend="torch")

"""PEFT's prefix encoder as the truth for the PrefixEncoder tests, and the parity check under the tolerance rule.

PEFT builds the prefix in ``PeftModel.get_prompt``: the encoder runs on tokens 0..P-1 of every batch row,
then ``view(B, P, 2L, Hkv, D).permute(2, 0, 3, 1, 4).split(2)`` gives each layer its [2, B, Hkv, P, D]
keys and values. :func:`peft_prefix` repeats exactly those lines (test_reparam checks them against
``get_prompt`` of a real PeftModel) and stacks the layers as [L, 2, B, Hkv, P, D].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from prefix_kernels import PrefixEncoder
from prefix_kernels.testing import Comparison, compare


@dataclass(frozen=True)
class Case:
    P: int
    L: int
    Hkv: int
    D: int
    hidden: int

    @property
    def token_dim(self) -> int:
        return self.Hkv * self.D

    @property
    def out_features(self) -> int:
        return 2 * self.L * self.token_dim

    def id(self) -> str:
        return f"P{self.P}-L{self.L}-H{self.Hkv}-D{self.D}-hid{self.hidden}"


# Odd sizes: several partial tiles of the interpreter's 16 x 32 x 16 tiles on every axis; and the
# smallest encoder (one token, one head, a hidden size below a tile).
ODD = Case(P=37, L=3, Hkv=3, D=12, hidden=40)
TINY = Case(P=1, L=2, Hkv=1, D=16, hidden=8)


def peft_config(case: Case, projection: bool = True, inference_mode: bool = False):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=case.P, token_dim=case.token_dim,
                              num_attention_heads=case.Hkv, num_layers=case.L, encoder_hidden_size=case.hidden,
                              prefix_projection=projection, inference_mode=inference_mode)


def peft_encoder(case: Case, projection: bool = True, seed: int = 0):
    from peft import PrefixEncoder as PeftPrefixEncoder

    torch.manual_seed(seed)
    enc = PeftPrefixEncoder(peft_config(case, projection))
    with torch.no_grad():  # nn.Linear's default init makes tiny outputs: widen them so errors are visible
        for name, p in enc.named_parameters():
            if name.startswith("transform"):
                p.mul_(3.0)
    return enc


def peft_prefix(enc, case: Case, batch: int = 1) -> torch.Tensor:
    """[L, 2, B, Hkv, P, D]: PEFT's encoder on every batch row, reshaped as get_prompt does."""
    tokens = torch.arange(case.P, device=enc.embedding.weight.device).unsqueeze(0).expand(batch, -1)
    flat = enc(tokens)
    layers = flat.view(batch, case.P, case.L * 2, case.Hkv, case.D).permute([2, 0, 3, 1, 4]).split(2)
    return torch.stack(layers)


def ours_from(enc, case: Case, dtype: torch.dtype, backend: str, projection: bool = True) -> PrefixEncoder:
    ours = PrefixEncoder(case.P, case.L, case.Hkv, case.D, prefix_projection=projection,
                         encoder_hidden_size=case.hidden, backend=backend, dtype=dtype)
    ours.load_state_dict({k: v.to(dtype) for k, v in enc.state_dict().items()}, strict=True)
    return ours


def _autocast(device, dtype: torch.dtype | None):
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def check_against_peft(case: Case, dtype: torch.dtype, backend: str, *, autocast: torch.dtype | None = None,
                       projection: bool = True, seed: int = 0, device="cpu") -> list[Comparison]:
    """Output and every parameter gradient of PrefixEncoder against PEFT's encoder with the same weights.

    Truth: PEFT's encoder in float64 on the parameters as stored in ``dtype``. Baseline: PEFT's encoder in
    ``dtype`` itself (under the same autocast), what PEFT achieves at that precision. The upstream gradient
    is one random [L, 2, Hkv, P, D] tensor, applied to batch row 0 of PEFT's prefix.
    """
    enc = peft_encoder(case, projection, seed)
    state = {k: v.to(dtype) for k, v in enc.state_dict().items()}
    ours = ours_from(enc, case, dtype, backend, projection).to(device)
    base = peft_encoder(case, projection, seed).to(device, dtype)
    base.load_state_dict(state)
    truth = peft_encoder(case, projection, seed).to(device, torch.float64)
    truth.load_state_dict({k: v.double() for k, v in state.items()})
    out_dtype = autocast if (autocast is not None and projection) else dtype
    g = torch.randn((case.L, 2, case.Hkv, case.P, case.D), generator=torch.Generator().manual_seed(seed + 1))
    g = g.to(device, out_dtype)

    with _autocast(device, autocast):
        out = ours()
        (out * g.to(out.dtype)).sum().backward()
        base_out = peft_prefix(base, case)[:, :, 0]
        (base_out * g.to(base_out.dtype)).sum().backward()
    truth_out = peft_prefix(truth, case)[:, :, 0]
    (truth_out * g.double()).sum().backward()

    assert out.dtype == base_out.dtype == out_dtype, (out.dtype, base_out.dtype, out_dtype)
    assert out.shape == (case.L, 2, case.Hkv, case.P, case.D)
    H = case.hidden if projection else 0
    results = [compare("out", out, truth_out, base_out, 2.0, case.token_dim + H)]
    # Terms of each gradient's reduction: over tokens for the second layer's, through dH (over N) for the first's.
    terms = {"embedding.weight": case.out_features, "transform.0.weight": case.out_features,
             "transform.0.bias": case.out_features, "transform.2.weight": case.P, "transform.2.bias": case.P}
    truth_params = dict(truth.named_parameters())
    base_params = dict(base.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        results.append(compare("d " + name, p.grad, truth_params[name].grad, base_params[name].grad, 3.0,
                               terms[name] if projection else 1))
    return results

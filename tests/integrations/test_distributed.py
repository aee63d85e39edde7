"""Beyond one process: torch DDP over 2 CPU processes (gloo) training a prefix-tuned Llama decoder (the prefix
through its MLP) and a prefix-tuned BERT classifier (prefix and head): both ranks end with identical trained
parameters, equal to one process training on the full batch (the tolerance rule: fp32 one-process as the
baseline, fp64 one-process as the truth). FSDP2 (``fully_shard``) is tried the same way where this torch has it."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from .models import VOCAB, apply, assert_rule, build

transformers = pytest.importorskip("transformers")

WORLD = 2
STEPS = 3
BATCH = 8  # the global batch; each rank trains on its half


def _batches(family: str):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(3, VOCAB, (BATCH, 9), generator=g)
        labels = ids if family == "llama" else torch.randint(0, 3, (BATCH,), generator=g)
        out.append((ids, labels))
    return out


def _model(family: str, dtype=torch.float32):
    model = build(family, "lm" if family == "llama" else "seq_cls").to(dtype).train()
    torch.manual_seed(3)
    handle = apply(model, num_virtual_tokens=4, prefix_projection=family == "llama", encoder_hidden_size=16,
                   encoder_dtype=dtype)
    return model, handle


def _train(model, handle, family, rows=slice(None), wrap=None):
    """STEPS of SGD on ``rows`` of each global batch; the trained parameters after."""
    runner = wrap(model) if wrap is not None else model
    opt = torch.optim.SGD(handle.trainable_parameters(), lr=0.5)
    for ids, labels in _batches(family):
        opt.zero_grad()
        loss = runner(input_ids=ids[rows], labels=labels[rows]).loss
        loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, directory: str, modes: tuple[str, ...]):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        results = {}
        for mode in modes:
            for family in ("llama", "bert"):
                model, handle = _model(family)
                if mode == "ddp":
                    results[mode, family] = _train(model, handle, family, rows, wrap=DistributedDataParallel)
                    continue
                from torch.distributed.fsdp import fully_shard

                for layer in model.base_model.layers if family == "llama" else model.base_model.encoder.layer:
                    fully_shard(layer)
                fully_shard(model)  # the prefix encoder and the head are sharded with the root
                trained = _train(model, handle, family, rows)
                results[mode, family] = {n: p.full_tensor() if hasattr(p, "full_tensor") else p
                                         for n, p in trained.items()}
        torch.save(results, os.path.join(directory, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both ranks' trained parameters per (mode, family), and the one-process fp32 / fp64 / initial ones (computed
    while the ranks run)."""
    import torch.multiprocessing as mp

    directory = tmp_path_factory.mktemp("ddp")
    modes = ("ddp", "fsdp") if _has_fsdp2() else ("ddp",)
    context = mp.start_processes(_worker, args=(str(directory), modes), nprocs=WORLD, join=False,
                                 start_method="spawn")
    single = {}
    for family in ("llama", "bert"):
        single[family] = {"baseline": _train(*_model(family), family),
                          "truth": _train(*_model(family, torch.float64), family),
                          "initial": {n: p.detach().clone() for n, p in _model(family)[0].named_parameters()
                                      if p.requires_grad}}
    while not context.join():
        pass
    return [torch.load(directory / f"rank{r}.pt") for r in range(WORLD)], single


def _check(runs, mode):
    ranks, single = runs
    for family in ("llama", "bert"):
        first = ranks[0][mode, family]
        for other in ranks[1:]:
            assert set(other[mode, family]) == set(first)
            for name in first:
                assert torch.equal(other[mode, family][name], first[name]), f"{family} {name} differs between ranks"
        baseline, truth, initial = (single[family][k] for k in ("baseline", "truth", "initial"))
        assert set(first) == set(baseline)
        assert any(n.startswith("prefix_encoder.") for n in first)
        for name in first:
            assert not torch.equal(first[name], initial[name]), f"{family} {name} did not train"
            assert_rule(f"{mode} {family} {name}", first[name], truth[name], baseline[name], n_terms=BATCH * 64)


def test_ddp_two_processes_match_one_process(runs):
    _check(runs, "ddp")


def test_fsdp2_two_processes_match_one_process(runs):
    if not _has_fsdp2():
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    _check(runs, "fsdp")

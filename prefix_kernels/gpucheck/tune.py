"""Stage "tune": time a small set of candidate tiles per kernel and head dim at the benchmark shapes, in bf16
(fp16 shares the 2-byte tiles), and keep the fastest one that passes the tolerance rule. One JSON line per
(kernel, head dim) as soon as its candidates are measured; ``table`` turns the lines into the tile JSON that
``prefix_kernels.ops.attention.tile_overrides`` loads."""

from __future__ import annotations

import argparse
import math
import sys
import time

from .runner import append_jsonl, stage_entry

# Candidates beside the shipped tile: (block_m, block_n, num_warps, num_stages). In the dK/dV kernels block_n is
# the key tile a program owns and block_m the query tile it walks.
CANDIDATES = {
    "fwd": {64: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4)],
            128: [(128, 64, 8, 3), (128, 64, 4, 2), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)]},
    "fwd_decode": {64: [(16, 64, 4, 3), (16, 128, 4, 2), (16, 128, 8, 3), (16, 32, 4, 4)],
                   128: [(16, 64, 4, 3), (16, 128, 4, 2), (16, 128, 8, 3), (16, 32, 4, 4)]},
    "bwd_dkdv": {64: [(64, 64, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 2)],
                 128: [(32, 64, 8, 3), (32, 64, 4, 3), (64, 64, 8, 2), (32, 128, 8, 2), (16, 64, 4, 4)]},
    "bwd_dq": {64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 2)],
               128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 64, 8, 2)]},
}
CANDIDATES["bwd_prefix_dkdv"] = CANDIDATES["bwd_dkdv"]
# The goals' kernels first (a run cut by its limit keeps the entries it finished).
ORDER = [("fwd", 64), ("fwd", 128), ("bwd_dkdv", 64), ("bwd_dq", 64), ("bwd_dkdv", 128), ("bwd_dq", 128),
         ("bwd_prefix_dkdv", 64), ("bwd_prefix_dkdv", 128), ("fwd_decode", 64), ("fwd_decode", 128)]
DRY_CANDIDATES = [(16, 16, 1, 1), (16, 32, 1, 2)]
DRY_ORDER = [("fwd", 32), ("bwd_dkdv", 32)]


def shapes(kernel: str, dry: bool) -> list[dict]:
    """The benchmark shapes timed (B H/Hkv L P, causal, no padding: the goal grid's)."""
    if dry:
        return [dict(batch=1, heads_q=2, heads_kv=1, len_q=1 if kernel == "fwd_decode" else 20, len_k=20,
                     prefix_len=8)]
    if kernel == "fwd_decode":
        return [dict(batch=16, heads_q=32, heads_kv=8, len_q=1, len_k=2048, prefix_len=64)]
    return [dict(batch=32, heads_q=32, heads_kv=8, len_q=512, len_k=512, prefix_len=64),
            dict(batch=8, heads_q=32, heads_kv=8, len_q=2048, len_k=2048, prefix_len=64)]


def check_shape(kernel: str, dry: bool) -> dict:
    """A small shape with the same integer divisibility as the timed ones (no extra compile) and partial tiles."""
    if dry:
        return dict(batch=1, heads_q=2, heads_kv=1, len_q=1 if kernel == "fwd_decode" else 20, len_k=20, prefix_len=8)
    return dict(batch=2, heads_q=8, heads_kv=2, len_q=1 if kernel == "fwd_decode" else 528, len_k=528, prefix_len=80)


def _timer(kernel: str, shape: dict, head_dim: int, dtype, device):
    """A callable running the kernel's pass once (forward, or the whole backward: the other backward kernels keep
    their tiles, so differences between candidates are this kernel's)."""
    import torch

    from prefix_kernels.ops.attention import triton_impl
    from prefix_kernels.testing import make_inputs

    x = make_inputs(**shape, head_dim=head_dim, dtype=dtype, device=device)
    args = (x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], None, True, head_dim ** -0.5)
    if kernel.startswith("fwd"):
        from prefix_kernels.ops.attention import triton_decode

        def forward():
            with triton_decode.disabled():  # "fwd_decode" is the tiled forward's Lq <= 16 tile, not the decode kernel
                return triton_impl.forward(*args, True)

        return forward
    out, lse = triton_impl.forward(*args, True)
    dout = torch.randn_like(out)
    return lambda: triton_impl.backward(dout, None, *args[:5], None, out, lse, True, args[7])


def measure_candidate(kernel, head_dim, cfg, dtype, device, dry: bool) -> dict:
    import torch

    from prefix_kernels._timing import measure
    from prefix_kernels.ops.attention import tile_overrides
    from prefix_kernels.testing import check_backend, make_inputs

    entry = {tile_overrides.key(kernel, head_dim, 2): cfg}
    with tile_overrides.overrides(entry):
        results = check_backend(make_inputs(**check_shape(kernel, dry), head_dim=head_dim, dtype=dtype,
                                            device=device), "triton", causal=True)
        bad = [str(r) for r in results if not r.ok]
        if bad:
            return {"status": "FAIL", "failed": bad}
        times = []
        for shape in shapes(kernel, dry):
            fn = _timer(kernel, shape, head_dim, dtype, device)
            t = measure(fn, device, warmup=1 if dry else 3, reps=1 if dry else 15)
            times.append(t.median_ms)
            del fn
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"status": "ok", "ms": times}


def name(cfg) -> str:
    return f"{cfg[0]}x{cfg[1]}w{cfg[2]}s{cfg[3]}"


def tune_one(kernel: str, head_dim: int, dtype, device, dry: bool) -> dict:
    from prefix_kernels.ops.attention import triton_impl

    arch = triton_impl.arch_of(device)
    shipped_cfg = triton_impl.tile_config(kernel if kernel != "fwd_decode" else "fwd", head_dim, 2,
                                          1 if kernel == "fwd_decode" else None, arch)
    shipped = (shipped_cfg.block_m, shipped_cfg.block_n, shipped_cfg.num_warps, shipped_cfg.num_stages)
    pool = DRY_CANDIDATES if dry else CANDIDATES[kernel][head_dim]
    candidates = list(dict.fromkeys([shipped, *pool]))
    measured = {}
    for cfg in candidates:
        try:
            measured[name(cfg)] = {"config": cfg, **measure_candidate(kernel, head_dim, cfg, dtype, device, dry)}
        except Exception as e:  # out of shared memory, a compile error: this candidate is out
            text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            measured[name(cfg)] = {"config": cfg, "status": f"error: {type(e).__name__}: {text}"}
        print(f"  {kernel} D{head_dim} {name(cfg)}: {measured[name(cfg)].get('ms', measured[name(cfg)]['status'])}",
              flush=True)
    base = measured[name(shipped)]
    ok = {n: m for n, m in measured.items() if m["status"] == "ok"}
    row = {"kernel": kernel, "block_d": head_dim, "elem_bytes": 2, "featured": False, "dtype": str(dtype)[6:],
           "shipped": name(shipped), "shapes": shapes(kernel, dry), "candidates": measured}
    if base["status"] != "ok" or not ok:
        row["status"] = f"no choice: the shipped tile {base['status']}" if ok else "no candidate passed"
        return row

    def score(m):  # geometric mean of the time ratios to the shipped tile over the shapes
        return math.exp(sum(math.log(t / b) for t, b in zip(m["ms"], base["ms"], strict=True)) / len(m["ms"]))

    best = min(ok, key=lambda n: score(ok[n]))
    cfg = ok[best]["config"]
    row.update(status="ok", chosen=best, config=dict(zip(("block_m", "block_n", "num_warps", "num_stages"), cfg,
                                                         strict=True)),
               speedup_vs_shipped=round(1 / score(ok[best]), 4))
    return row


def table(rows: list[dict], machine: dict) -> dict:
    """The tile JSON document from the stage's lines (only entries whose choice was made)."""
    import triton

    cap = machine.get("capability") or [9, 0]
    return {"format": 1, "device": machine.get("device", "unknown"), "arch": 90 if cap[0] >= 9 else 80,
            "capability": f"{cap[0]}.{cap[1]}", "triton": triton.__version__,
            "torch": machine.get("versions", {}).get("torch"), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime()),
            "how": "python -m prefix_kernels gpu-check: the fastest candidate at the shapes listed (median ms, "
                   "CUDA events), each candidate checked first against the fp32 reference",
            "entries": [r for r in rows if r.get("status") == "ok"]}


def main(argv=None) -> int:
    stage_entry("tune")
    parser = argparse.ArgumentParser()
    parser.add_argument("--jsonl", required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dry = args.dry_run or device.type == "cpu"
    dtype = torch.bfloat16
    for kernel, head_dim in DRY_ORDER if dry else ORDER:
        start = time.monotonic()
        row = tune_one(kernel, head_dim, dtype, device, dry)
        row["seconds"] = round(time.monotonic() - start, 1)
        append_jsonl(args.jsonl, row)
        print(f"{kernel} D{head_dim}: {row['status']}"
              + (f", {row['chosen']} ({row['speedup_vs_shipped']:.3f}x the shipped {row['shipped']})"
                 if row["status"] == "ok" else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

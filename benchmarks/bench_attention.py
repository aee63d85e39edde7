"""Prefix attention: forward, backward and forward+backward, this library against what users write.

Providers: prefix_kernels (triton; cuda when built), and concatenating the prefix then SDPA (flash,
efficient, cudnn), FlexAttention, or flash-attn's function (when installed); the concatenation is
part of their time. Reports median ms with 20/80% quantiles, TFLOP/s counted on the P + L keys
(forward 4 B Hq L (P + L) D, the input part halved when causal; backward 2.5x the forward), and the
peak memory of each (CUDA). Rows are appended to ``results/attention_<device>.csv``, this run is
``attention_<device>.json``, and ``attention_<device>_<mode>.png`` plots TFLOP/s against L, one panel per
(D, Hkv, P, mask).

    python benchmarks/bench_attention.py            # the full grid, on a GPU
    python benchmarks/bench_attention.py --quick    # small shapes; the CPU smoke run (< 1 minute)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # common.py, and this checkout's prefix_kernels before an installed one
from common import (  # noqa: E402
    RESULTS,
    THREADS_HELP,
    Progress,
    append_csv,
    line_plot,
    run_metadata,
    set_cpu_threads,
    slug,
    write_json,
)

from prefix_kernels._timing import measure  # noqa: E402
from prefix_kernels.perf import Shape, available_providers, make_tensors  # noqa: E402

MODES = ("fwd", "bwd", "full")


def grid(quick: bool, device: torch.device) -> list[Shape]:
    if quick or device.type != "cuda":
        return [Shape(max(1, 512 // L), 4, Hkv, L, P, 64, causal)
                for L, Hkv, P, causal in itertools.product((64, 128), (4, 2), (16,), (False, True))]
    tokens = 16384
    return [Shape(max(1, tokens // L), 32, Hkv, L, P, D, causal)
            for D, Hkv, P, L, causal in itertools.product((64, 128), (32, 8), (16, 64, 256), (128, 512, 2048, 8192),
                                                          (False, True))]


def bench_one(fn, shape: Shape, dtype, device, reps: int) -> dict:
    q, k, v, pk, pv = make_tensors(shape, dtype, device)
    leaves = (q, k, v, pk, pv)

    def fwd():
        with torch.no_grad():
            return fn(q, k, v, pk, pv, shape.causal)

    out = fn(q, k, v, pk, pv, shape.causal)
    grad = torch.randn_like(out)
    results = {"fwd": measure(fwd, device, warmup=2, reps=reps)}
    results["bwd"] = measure(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), device, warmup=2,
                             reps=reps)
    results["full"] = measure(lambda: torch.autograd.grad(fn(q, k, v, pk, pv, shape.causal), leaves, grad), device,
                              warmup=1, reps=reps)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (the CPU smoke run)")
    parser.add_argument("--out", default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--providers", nargs="*", help="substrings selecting providers (default: all available)")
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meta = {**run_metadata(device), "cpu_threads": set_cpu_threads(device, args.threads, True)}
    providers = available_providers(device)
    if args.providers:
        providers = {n: f for n, f in providers.items() if any(s in n for s in args.providers)}
    shapes = grid(args.quick, device)
    reps = 3 if device.type == "cpu" else 20
    progress = Progress(len(shapes) * len(providers), "bench_attention")
    rows = []
    built = {}
    for shape in shapes:
        for name, factory in providers.items():
            progress.step(f"{name} L={shape.seq} P={shape.prefix} D={shape.head_dim}")
            base = {**meta, "provider": name, "dtype": str(dtype).replace("torch.", ""),
                    **{f: getattr(shape, f) for f in shape.__dataclass_fields__}}
            try:
                fn = built.setdefault(name, factory())
                timings = bench_one(fn, shape, dtype, device, reps)
            except (RuntimeError, ValueError, NotImplementedError) as e:  # e.g. an SDPA kernel refusing a shape
                reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                rows += [{**base, "mode": m, "median_ms": "", "p20_ms": "", "p80_ms": "", "tflops": "",
                          "peak_mib": "", "status": f"unsupported: {reason}"} for m in MODES]
                continue
            for mode, t in timings.items():
                flops = {"fwd": shape.forward_flops(), "bwd": shape.backward_flops(),
                         "full": shape.forward_flops() + shape.backward_flops()}[mode]
                rows.append({**base, "mode": mode, "median_ms": round(t.median_ms, 4), "p20_ms": round(t.p20_ms, 4),
                             "p80_ms": round(t.p80_ms, 4), "tflops": float(f"{flops / t.median_ms / 1e9:.4g}"),
                             "peak_mib": "" if t.peak_mib is None else round(t.peak_mib, 1), "status": "ok"})
            if device.type == "cuda":
                torch.cuda.empty_cache()

    stem = os.path.join(args.out, f"attention_{slug(meta['device'])}")
    append_csv(stem + ".csv", rows)
    write_json(stem + ".json", meta, rows)
    print(f"wrote {len(rows)} rows to {stem}.csv (appended) and {stem}.json (this run)")
    if not args.no_plot:
        for mode in MODES:
            panels: dict = {}
            for r in rows:
                if r["mode"] != mode or r["status"] != "ok":
                    continue
                panel = (r["head_dim"], -r["heads_kv"], r["prefix"], r["causal"])  # every (D, Hkv, P, mask)
                panels.setdefault(panel, {}).setdefault(r["provider"], []).append((r["seq"], r["tflops"]))
            titled = {f"D={D} Hkv={-h} P={P} {'causal' if c else 'full'}": series
                      for (D, h, P, c), series in sorted(panels.items())}
            line_plot(f"{stem}_{mode}.png", titled, "L (tokens per row)", "TFLOP/s",
                      f"prefix attention {mode}, {meta['device']}, {rows[0]['dtype']}, commit {meta['commit']}")
            print(f"wrote {stem}_{mode}.png")
    print_summary(rows)
    return 0


def print_summary(rows: list[dict]) -> None:
    """For each shape and mode: ours against the fastest alternative (time ratio < 1 means ours is faster)."""
    by_key: dict = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        key = (r["batch"], r["heads_kv"], r["seq"], r["prefix"], r["head_dim"], r["causal"], r["mode"])
        by_key.setdefault(key, {})[r["provider"]] = r["median_ms"]
    print(f"{'B':>4} {'Hkv':>4} {'L':>5} {'P':>4} {'D':>4} {'mask':6} {'mode':4}  ours/best-alternative (ms)")
    for key, provs in sorted(by_key.items()):
        ours = {n: t for n, t in provs.items() if n.startswith("prefix_kernels")}
        alts = {n: t for n, t in provs.items() if not n.startswith("prefix_kernels")}
        if not ours or not alts:
            continue
        o_name, o_t = min(ours.items(), key=lambda x: x[1])
        a_name, a_t = min(alts.items(), key=lambda x: x[1])
        B, Hkv, L, P, D, causal, mode = key
        print(f"{B:>4} {Hkv:>4} {L:>5} {P:>4} {D:>4} {'causal' if causal else 'full':6} {mode:4}  "
              f"{o_t / a_t:5.2f}  ({o_name} {o_t:.3f} vs {a_name} {a_t:.3f})")


if __name__ == "__main__":
    sys.exit(main())

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
    python benchmarks/bench_attention.py --grid goals --only prefix_kernels "sdpa[flash]" --deadline-s 120
    python benchmarks/bench_attention.py --shapes L=512,2048 D=64 causal=1
    python benchmarks/bench_attention.py --decode   # decode steps (Lq = 1) over long caches, forward only

``--decode`` times one decode step (Lq = 1, no_grad) over a cache of L keys with a P-key prefix (B 8 and 64,
Hq 32, Hkv 8, D 128, L 1k-32k, P 16 and 128 on a GPU): the Triton decode kernel (packed GQA, split-KV),
the tiled Triton forward it replaces, SDPA over a cache that already holds the prefix (PEFT's way: nothing
concatenated per step) and concatenation + SDPA. Its rows (mode "decode", GB/s of K/V read) go to
``results/attention_decode_<device>.csv`` and one plot of GB/s against L.

Rows are appended as they are measured, so a run cut by a time limit keeps what it measured. A provider whose
score tensors would not fit in memory (the torch backend at L = 8192) is skipped with the reason in its rows; a
FlexAttention call that fell back to its unfused path is reported as such, never timed as "flex".
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
    DEADLINE_HELP,
    RESULTS,
    SHAPES_HELP,
    THREADS_HELP,
    Deadline,
    Progress,
    RowSink,
    line_plot,
    matches,
    run_metadata,
    set_cpu_threads,
    shape_filter,
    slug,
)

from prefix_kernels._timing import measure  # noqa: E402
from prefix_kernels.perf import FlexFallback, Shape, available_providers, make_tensors, memory_reason  # noqa: E402

MODES = ("fwd", "bwd", "full")


ALIASES = {"B": "batch", "H": "heads_q", "Hq": "heads_q", "Hkv": "heads_kv", "L": "seq", "P": "prefix", "D": "head_dim",
           **{f: f for f in ("batch", "heads_q", "heads_kv", "seq", "prefix", "head_dim", "causal")}}


def grid(kind: str, device: torch.device) -> list[Shape]:
    """quick: small shapes (the CPU's grid); full: the GPU sweep; goals: the full sweep, the shapes that answer the
    issue's goals first (the GQA decoder and the MHA encoder at P = 64, every L), for a run cut by a time limit."""
    if kind == "quick" or device.type != "cuda":
        return [Shape(max(1, 512 // L), 4, Hkv, L, P, 64, causal)
                for L, Hkv, P, causal in itertools.product((64, 128), (4, 2), (16,), (False, True))]
    tokens = 16384
    full = [Shape(max(1, tokens // L), 32, Hkv, L, P, D, causal)
            for D, Hkv, P, L, causal in itertools.product((64, 128), (32, 8), (16, 64, 256), (128, 512, 2048, 8192),
                                                          (False, True))]
    if kind == "full":
        return full
    first = [s for hkv, causal in ((8, True), (32, False)) for D in (64, 128) for s in full
             if (s.heads_kv, s.causal, s.head_dim, s.prefix) == (hkv, causal, D, 64)]
    return first + [s for s in full if s not in first]


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


def measure_rows(name: str, fn, shape: Shape, dtype, device, reps: int, base: dict) -> list[dict]:
    """The three rows (fwd, bwd, full) of one provider at one shape; a provider that refuses the shape, does not fit
    or falls back gets rows that say so."""
    skip = memory_reason(name, shape, device)
    try:
        if skip:
            raise _Skip(skip)
        timings = bench_one(fn(), shape, dtype, device, reps)
    except (RuntimeError, ValueError, NotImplementedError, _Skip) as e:  # e.g. an SDPA kernel refusing a shape
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        kind = "fallback" if isinstance(e, FlexFallback) else "unsupported"
        status = reason if isinstance(e, _Skip) else f"{kind}: {reason}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return [{**base, "mode": m, "median_ms": "", "p20_ms": "", "p80_ms": "", "tflops": "", "peak_mib": "",
                 "status": status} for m in MODES]
    rows = []
    for mode, t in timings.items():
        flops = {"fwd": shape.forward_flops(), "bwd": shape.backward_flops(),
                 "full": shape.forward_flops() + shape.backward_flops()}[mode]
        rows.append({**base, "mode": mode, "median_ms": round(t.median_ms, 4), "p20_ms": round(t.p20_ms, 4),
                     "p80_ms": round(t.p80_ms, 4), "tflops": float(f"{flops / t.median_ms / 1e9:.4g}"),
                     "peak_mib": "" if t.peak_mib is None else round(t.peak_mib, 1), "status": "ok"})
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


class _Skip(Exception):
    pass


def decode_grid(quick: bool, device: torch.device) -> list[Shape]:
    """Decode steps: ``seq`` is the cache length Lk (the query is one token), causal (bottom-right: it sees all)."""
    if quick or device.type != "cuda":
        return [Shape(2, 8, 2, L, 16, 64, True) for L in (64, 256)]
    return [Shape(B, 32, 8, L, P, 128, True) for B in (8, 64) for P in (16, 128) for L in (1024, 4096, 16384, 32768)]


def decode_providers(device: torch.device) -> dict:
    """name -> fn(q, k, v, pk, pv, kv_with_prefix) running one decode step. The Triton ones run on a GPU, or on the
    CPU under TRITON_INTERPRET (the dry run)."""
    import torch.nn.functional as F

    from prefix_kernels.ops.attention import prefix_attention
    from prefix_kernels.ops.triton_utils import is_interpreting

    def ours(backend):
        return lambda q, k, v, pk, pv, cat: prefix_attention(q, k, v, pk, pv, causal=True, backend=backend)

    def tiled(q, k, v, pk, pv, cat):
        from prefix_kernels.ops.attention import triton_decode

        with triton_decode.disabled():
            return prefix_attention(q, k, v, pk, pv, causal=True, backend="triton")

    def cached(q, k, v, pk, pv, cat):  # the cache holds [prefix ; keys] already
        return F.scaled_dot_product_attention(q, cat[0], cat[1], enable_gqa=True)

    def concat(q, k, v, pk, pv, cat):
        B = k.shape[0]
        kk = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
        vv = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
        return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

    found = {}
    if device.type == "cuda" or is_interpreting():
        found["prefix_kernels[triton-decode]"] = ours("triton")
        found["prefix_kernels[triton-tiled]"] = tiled
    if device.type == "cpu":
        found["prefix_kernels[torch]"] = ours("torch")
    found["sdpa[cache with prefix]"] = cached
    found["concat+sdpa"] = concat
    return found


def _decode_row(name: str, fn, shape: Shape, device, dtype, meta: dict, reps: int) -> dict:
    """One provider's row at one decode shape (its tensors made for it and freed after)."""
    from prefix_kernels.ops.attention import triton_decode

    B, H, Hkv, L, P, D = shape.batch, shape.heads_q, shape.heads_kv, shape.seq, shape.prefix, shape.head_dim
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

    q = rnd(B, 1, H, D).transpose(1, 2)  # HF's layout; the cache is [B, Hkv, L, D]
    k, v, pk, pv = rnd(B, Hkv, L, D), rnd(B, Hkv, L, D), rnd(Hkv, P, D), rnd(Hkv, P, D)
    cat = tuple(torch.cat([p.unsqueeze(0).expand(B, -1, -1, -1), x], dim=2) for p, x in ((pk, k), (pv, v)))
    kv_bytes = 2 * B * Hkv * (L + P) * D * q.element_size()
    flops = 4.0 * B * H * (L + P) * D
    base = {**meta, "provider": name, "dtype": str(dtype).replace("torch.", ""), "mode": "decode",
            **{f: getattr(shape, f) for f in shape.__dataclass_fields__}}
    try:
        with torch.no_grad():
            before = triton_decode.counts["decode"]
            fn(q, k, v, pk, pv, cat)
            if name.endswith("[triton-decode]") and triton_decode.counts["decode"] == before:
                raise RuntimeError(f"the decode kernel declined: {triton_decode.last_reasons}")
            plan = triton_decode.last_plan if name.endswith("[triton-decode]") else ()
            t = measure(lambda: fn(q, k, v, pk, pv, cat), device, warmup=2, reps=reps)
    except (RuntimeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return {**base, "median_ms": "", "p20_ms": "", "p80_ms": "", "tflops": "", "gbps": "", "peak_mib": "",
                "splits": "", "status": f"unsupported: {reason}"}
    return {**base, "median_ms": round(t.median_ms, 4), "p20_ms": round(t.p20_ms, 4), "p80_ms": round(t.p80_ms, 4),
            "tflops": float(f"{flops / t.median_ms / 1e9:.4g}"), "gbps": float(f"{kv_bytes / t.median_ms / 1e6:.4g}"),
            "peak_mib": "" if t.peak_mib is None else round(t.peak_mib, 1),
            "splits": sum(plan[:2]) if plan else "", "status": "ok"}


def run_decode(args, device, dtype, meta, filters) -> int:
    """The decode rows: one forward step per provider and shape, no_grad."""
    providers = decode_providers(device)
    if args.providers:
        providers = {n: f for n, f in providers.items() if any(s in n for s in args.providers)}
    shapes = [s for s in decode_grid(args.quick, device)
              if matches(filters, {f: getattr(s, f) for f in s.__dataclass_fields__})]
    reps = 3 if device.type == "cpu" else 30
    stem = os.path.join(args.out, f"attention_decode_{slug(meta['device'])}")
    sink = RowSink(stem, meta)
    progress = Progress(len(shapes) * len(providers), "bench_attention --decode")
    deadline = Deadline(args.deadline_s)
    for shape in shapes:
        if deadline.passed():
            break
        for name, fn in providers.items():
            progress.step(f"{name} B={shape.batch} L={shape.seq} P={shape.prefix}")
            sink.add([_decode_row(name, fn, shape, device, dtype, meta, reps)])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = sink.rows
    print(f"wrote {len(rows)} rows to {stem}.csv (appended as measured) and {stem}.json (this run)")
    if not args.no_plot and rows:
        panels: dict = {}
        for r in rows:
            if r["status"] == "ok":
                title = f"B={r['batch']} Hq={r['heads_q']} Hkv={r['heads_kv']} P={r['prefix']} D={r['head_dim']}"
                panels.setdefault(title, {}).setdefault(r["provider"], []).append((r["seq"], r["gbps"]))
        line_plot(f"{stem}.png", panels, "L (cached keys)", "GB/s of K/V read",
                  f"decode step (Lq = 1), {meta['device']}, {rows[0]['dtype']}, commit {meta['commit']}")
        print(f"wrote {stem}.png")
    print(f"{'B':>4} {'L':>6} {'P':>4}  provider: ms (GB/s)")
    by_shape: dict = {}
    for r in rows:
        if r["status"] == "ok":
            by_shape.setdefault((r["batch"], r["seq"], r["prefix"]), []).append(r)
    for (B, L, P), group in sorted(by_shape.items()):
        print(f"{B:>4} {L:>6} {P:>4}  " + "; ".join(f"{r['provider']}: {r['median_ms']:.4f} ({r['gbps']:.0f})"
                                                   for r in group))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (the CPU smoke run)")
    parser.add_argument("--grid", choices=("quick", "full", "goals"), help="the shape grid (default: full on a GPU, "
                                                                            "quick on a CPU or with --quick)")
    parser.add_argument("--shapes", nargs="*", help=SHAPES_HELP)
    parser.add_argument("--out", default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--providers", "--only", nargs="*", dest="providers",
                        help="substrings selecting providers (default: all available)")
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    parser.add_argument("--deadline-s", type=float, help=DEADLINE_HELP)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--decode", action="store_true", help="decode steps (Lq = 1, forward) instead of training")
    args = parser.parse_args(argv)

    deadline = Deadline(args.deadline_s)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        filters = shape_filter(args.shapes, ALIASES)
    except ValueError as e:
        parser.error(str(e))
    meta = {**run_metadata(device), "cpu_threads": set_cpu_threads(device, args.threads, True)}
    if args.decode:
        return run_decode(args, device, dtype, meta, filters)
    providers = available_providers(device)
    if args.providers:
        providers = {n: f for n, f in providers.items() if any(s in n for s in args.providers)}
    shapes = [s for s in grid("quick" if args.quick else args.grid or "full", device)
              if matches(filters, {f: getattr(s, f) for f in s.__dataclass_fields__})]
    reps = 3 if device.type == "cpu" else 20
    progress = Progress(len(shapes) * len(providers), "bench_attention")
    stem = os.path.join(args.out, f"attention_{slug(meta['device'])}")
    sink = RowSink(stem, meta)
    built = {}
    for shape in shapes:
        if deadline.passed():
            print(f"\n--deadline-s {args.deadline_s:g} reached: {len(sink.rows) // len(MODES)} measurements kept",
                  file=sys.stderr)
            break
        for name, factory in providers.items():
            progress.step(f"{name} L={shape.seq} P={shape.prefix} D={shape.head_dim}")
            base = {**meta, "provider": name, "dtype": str(dtype).replace("torch.", ""),
                    **{f: getattr(shape, f) for f in shape.__dataclass_fields__}}
            sink.add(measure_rows(name, lambda factory=factory, name=name: built.setdefault(name, factory()), shape,
                                  dtype, device, reps, base))
    rows = sink.rows
    print(f"wrote {len(rows)} rows to {stem}.csv (appended as measured) and {stem}.json (this run)")
    if not args.no_plot and rows:
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

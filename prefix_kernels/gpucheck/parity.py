"""Stage "parity": the kernels against the fp32 reference under the tolerance rule, at the shipped tile sizes,
in bf16 and fp16 (on a GPU; a dry run walks tiny shapes in the interpreter). One JSON line per case."""

from __future__ import annotations

import argparse
import sys
import time

from .runner import append_jsonl, stage_entry

# (label, make_inputs arguments, check_backend arguments); the goals' shapes first.
GPU_CASES = [
    ("P-Tuning v2 encoder B4 H12 L86 P64 D64 right-pad", dict(batch=4, heads_q=12, heads_kv=12, len_q=86, len_k=86,
                                                             prefix_len=64, head_dim=64, padding="right"), {}),
    ("decoder GQA 16/4 L300 P37 D128 causal left-pad", dict(batch=2, heads_q=16, heads_kv=4, len_q=300, len_k=300,
                                                           prefix_len=37, head_dim=128, padding="left"),
     {"causal": True}),
    ("long B1 8/2 L1030 P250 D64 causal", dict(batch=1, heads_q=8, heads_kv=2, len_q=1030, len_k=1030,
                                               prefix_len=250, head_dim=64), {"causal": True}),
    ("decode Lq1 Lk515 P16 D128 causal", dict(batch=4, heads_q=8, heads_kv=2, len_q=1, len_k=515, prefix_len=16,
                                              head_dim=128), {"causal": True}),
    ("no prefix L257 D64 causal", dict(batch=2, heads_q=4, heads_kv=4, len_q=257, len_k=257, prefix_len=0,
                                       head_dim=64), {"causal": True}),
    ("D80 L129 P1", dict(batch=2, heads_q=8, heads_kv=8, len_q=129, len_k=129, prefix_len=1, head_dim=80), {}),
    ("D256 L200 P13 causal", dict(batch=2, heads_q=4, heads_kv=4, len_q=200, len_k=200, prefix_len=13,
                                  head_dim=256), {"causal": True}),
    ("features: ALiBi, window 64, softcap 30, causal, D64", dict(batch=2, heads_q=8, heads_kv=2, len_q=300,
                                                                 len_k=300, prefix_len=20, head_dim=64),
     {"causal": True, "alibi": True, "sliding_window": 64, "softcap": 30.0}),
    ("dropout 0.1 D128 L257 P64", dict(batch=2, heads_q=4, heads_kv=4, len_q=257, len_k=257, prefix_len=64,
                                       head_dim=128), {"dropout_p": 0.1}),
]
DRY_CASES = [
    ("tiny encoder L9 P3 D16 right-pad", dict(batch=2, heads_q=2, heads_kv=2, len_q=9, len_k=9, prefix_len=3,
                                              head_dim=16, padding="right"), {}),
    ("tiny decoder GQA 2/1 L11 P5 D32 causal", dict(batch=1, heads_q=2, heads_kv=1, len_q=11, len_k=11,
                                                    prefix_len=5, head_dim=32), {"causal": True}),
]


def _backends(device) -> list[tuple[str, str | None]]:
    """(backend, why it is skipped or None)."""
    from prefix_kernels import backends

    out = []
    for name in ("triton", "cuda"):
        why = backends.get(name).device_reasons(device)
        out.append((name, "; ".join(why) if why else None))
    return out


def main(argv=None) -> int:
    stage_entry("parity")
    parser = argparse.ArgumentParser()
    parser.add_argument("--jsonl", required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    import torch

    from prefix_kernels import BackendUnavailableError
    from prefix_kernels.testing import check_backend, make_inputs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = DRY_CASES if args.dry_run or device.type == "cpu" else GPU_CASES
    backend_list = _backends(device)
    for name, why in backend_list:
        if why:
            append_jsonl(args.jsonl, {"backend": name, "status": f"skipped: {why}"})
            print(f"{name}: skipped ({why})")
    for label, shape, options in cases:
        for dtype in (torch.bfloat16, torch.float16):
            for name, why in backend_list:
                if why:
                    continue
                options = dict(options)
                kw = {k: v for k, v in options.items() if k != "alibi"}
                if options.get("alibi"):
                    kw["alibi_slopes"] = torch.linspace(0.05, 0.5, shape["heads_q"], device=device)
                row = {"backend": name, "dtype": str(dtype)[6:], "case": label}
                start = time.monotonic()
                try:
                    results = check_backend(make_inputs(**shape, dtype=dtype, device=device), name, **kw)
                except BackendUnavailableError as e:
                    row["status"] = f"unsupported: {str(e).splitlines()[0][:200]}"
                except Exception as e:  # a kernel that fails to compile or launch is a result, not the stage's end
                    row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                else:
                    worst = max(results, key=lambda r: r.error / max(r.bound, 1e-30))
                    row.update(status="ok" if all(r.ok for r in results) else "FAIL",
                               failed=[str(r) for r in results if not r.ok], worst=worst.name,
                               error=worst.error, bound=worst.bound, ratio=worst.error / max(worst.bound, 1e-30))
                row["seconds"] = round(time.monotonic() - start, 2)
                append_jsonl(args.jsonl, row)
                print(f"{name:6} {row['dtype']:8} {row['status'][:60]:10} {label}"
                      + (f"  (worst {row['worst']}: {row['error']:.2e} / bound {row['bound']:.2e})"
                         if "worst" in row else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

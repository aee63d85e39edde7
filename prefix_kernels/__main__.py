"""Command line: ``python -m prefix_kernels info | demo | bench | report``.

info    versions, device, the extension, and which backend can serve on this machine (and why not)
demo    prefix tuning of a small BERT classifier and a small decoder (transformers, random weights): parity with
        the eager PEFT-style reference, training, generation, speed and memory beside that path; then the
        kernels alone: parity of every backend with the reference, speed beside concatenating + SDPA
bench   the same timing over a sweep of shapes
report  the static kernel report (compiles every shipped Triton kernel for sm80/sm90; no GPU needed)
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_info(_args=None) -> int:
    import torch

    import prefix_kernels
    from prefix_kernels import _ext, backends

    print(f"prefix_kernels {prefix_kernels.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA build: {torch.version.cuda})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError as e:
        print(f"triton: not importable ({e})")
    if torch.cuda.is_available():
        d = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(d)
        print(f"device: {torch.cuda.get_device_name(d)} (sm_{major}{minor})")
    else:
        print("device: CPU only (no CUDA device visible)")
    err = _ext.error()
    print(f"extension prefix_kernels._C: {'loaded' if err is None else 'not available: ' + err}")
    print(f"build record: {_ext.build_info()}")
    env = os.environ.get(backends.ENV_VAR)
    print(f"{backends.ENV_VAR}={env!r}" if env else f"{backends.ENV_VAR} not set (backend='auto')")
    print("backends (preference order):")
    for row in backends.describe():
        print(f"  {row['name']:7} {row['description']}")
        for dev, reasons in row["devices"].items():
            print(f"          {dev}: {'available' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
    return 0


def _parity(device, quick: bool = False) -> bool:
    import torch

    from prefix_kernels import backends
    from prefix_kernels.testing import check_backend, make_inputs

    shapes = [
        ("encoder, P-Tuning v2: B=2 H=4 L=37 P=13 D=64, right padding", dict(len_q=37, len_k=37, prefix_len=13,
                                                                            head_dim=64, padding="right"), False),
        ("decoder, GQA 8/2: B=2 L=33 P=16 D=64, causal, left padding", dict(heads_q=8, heads_kv=2, len_q=33,
                                                                           len_k=33, prefix_len=16, head_dim=64,
                                                                           padding="left"), True),
        ("decode step: Lq=1 Lk=65 P=16 D=128, causal", dict(len_q=1, len_k=65, prefix_len=16, head_dim=128), True),
    ]
    if quick:  # the P-Tuning v2 shape and the decode step
        shapes = [shapes[0], shapes[2]]
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    all_ok = True
    for name in backends.names():
        b = backends.get(name)
        why = b.device_reasons(device)
        if why:
            print(f"  {name}: skipped ({'; '.join(why)})")
            continue
        for label, kw, causal in shapes:
            for dtype in dtypes:
                res = check_backend(make_inputs(**kw, dtype=dtype, device=device), name, causal=causal)
                ok = all(r.ok for r in res)
                all_ok &= ok
                worst = max(res, key=lambda r: r.error / max(r.bound, 1e-30))
                print(f"  {name:6} {str(dtype)[6:]:8} {'ok  ' if ok else 'FAIL'} {label}  "
                      f"(closest to its bound: {worst})")
    return all_ok


def _fwd_bwd(step, leaves, grad_out):
    import torch

    return torch.autograd.grad(step(), leaves, grad_out)


def _timing_rows(device, shapes, quick: bool):
    """Time prefix_attention (the backend "auto" picks) beside concatenating the prefix and calling SDPA."""
    import torch

    from prefix_kernels import select_backend
    from prefix_kernels._timing import measure
    from prefix_kernels.perf import Shape, make_tensors, ours, sdpa

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for i, dims in enumerate(shapes, 1):
        shape = Shape(*dims)
        leaves = make_tensors(shape, dtype, device)
        backend = select_backend(*leaves, causal=shape.causal)
        grad_out = torch.randn(leaves[0].shape, device=device, dtype=dtype)
        reps = 3 if quick else 10
        for name, fn in ((f"prefix_attention[{backend}]", ours()), ("concat + SDPA", sdpa())):
            step = functools.partial(fn, *leaves, shape.causal)
            fwd = measure(step, device, warmup=1, reps=reps)
            full = measure(functools.partial(_fwd_bwd, step, leaves, grad_out), device, warmup=1, reps=reps)
            rows.append((shape, name, fwd, full))
        print(f"\r  [{i}/{len(shapes)}] shapes timed", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return dtype, rows


def _print_timing(device, dtype, rows):
    import torch

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    print(f"  device: {where}; dtype {str(dtype)[6:]}; median ms [20%, 80%]")
    print(f"  {'B':>3} {'H/Hkv':>6} {'L':>5} {'P':>4} {'D':>4} {'mask':6} {'provider':28} {'forward':>22} "
          f"{'fwd+bwd':>22} {'peak MiB':>9}")
    for shape, name, fwd, full in rows:
        peak = f"{full.peak_mib:9.1f}" if full.peak_mib is not None else f"{'n/a':>9}"
        heads = f"{shape.heads_q}/{shape.heads_kv}"
        print(f"  {shape.batch:>3} {heads:>6} {shape.seq:>5} {shape.prefix:>4} {shape.head_dim:>4} "
              f"{'causal' if shape.causal else 'full':6} {name:28} "
              f"{fwd.median_ms:8.3f} [{fwd.p20_ms:.3f}, {fwd.p80_ms:.3f}] "
              f"{full.median_ms:8.3f} [{full.p20_ms:.3f}, {full.p80_ms:.3f}] {peak}")
    for (shape, _, fwd, full), (_, _, base_fwd, base_full) in zip(rows[::2], rows[1::2], strict=True):
        print(f"  L={shape.seq:>5} P={shape.prefix:>3} {'causal' if shape.causal else 'full':6}: ours/concat+SDPA "
              f"time ratio forward {fwd.median_ms / base_fwd.median_ms:.2f}, "
              f"fwd+bwd {full.median_ms / base_full.median_ms:.2f}")


def cmd_demo(args) -> int:
    import torch

    from prefix_kernels import demo

    device = _device()
    if device.type == "cpu":
        # Let the Triton kernels run in the CPU interpreter for the kernel parity check (set before they load).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    cmd_info()
    ok = demo.run(device)
    print("\n4. The kernels alone: parity of every backend here with the fp32 reference (tolerance rule of "
          "prefix_kernels.testing)")
    ok &= _parity(device, quick=device.type == "cpu")
    print("\n   timing against concatenating the prefix and calling SDPA, what users do today:")
    if device.type == "cpu":
        print("   (on the CPU the interpreter is far too slow to time; the torch backend is timed)")
        os.environ["PREFIX_KERNELS_BACKEND"] = "torch"
    torch.manual_seed(0)
    shapes = [(4, 12, 12, 128, 16, 64, False), (2, 8, 2, 256, 64, 64, True)]
    if device.type == "cuda":
        shapes = [(64, 12, 12, 128, 16, 64, False), (8, 32, 8, 512, 64, 64, True), (8, 32, 8, 2048, 64, 128, True)]
    dtype, rows = _timing_rows(device, shapes, quick=True)
    _print_timing(device, dtype, rows)
    print("\ndemo finished:", "all parity checks passed" if ok else "SOME PARITY CHECKS FAILED")
    return 0 if ok else 1


def cmd_bench(args) -> int:
    device = _device()
    if device.type == "cpu":
        os.environ.setdefault("PREFIX_KERNELS_BACKEND", "torch")
    if args.quick or device.type == "cpu":
        shapes = [(4, 12, 12, L, P, 64, c) for L in (64, 128) for P in (16, 64) for c in (False, True)]
    else:
        shapes = [(max(1, 16384 // L), 32, Hkv, L, P, D, c) for L in (128, 512, 2048) for P in (16, 64, 256)
                  for D in (64, 128) for Hkv in (32, 8) for c in (False, True)]
    dtype, rows = _timing_rows(device, shapes, quick=args.quick)
    _print_timing(device, dtype, rows)
    return 0


def cmd_report(args) -> int:
    from prefix_kernels import kernel_report

    return kernel_report.main(args.rest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefix_kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, backends")
    sub.add_parser("demo", help="prefix-tuned models and the kernels: parity, training, generation, timing")
    b = sub.add_parser("bench", help="timing sweep against concat + SDPA")
    b.add_argument("--quick", action="store_true", help="few small shapes")
    r = sub.add_parser("report", help="static kernel report (no GPU needed)")
    r.add_argument("rest", nargs=argparse.REMAINDER)
    from . import gpucheck

    gpucheck.add_arguments(sub.add_parser("gpu-check", help="validate and measure on a GPU in one budgeted run"))
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.cmd != "report":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.cmd == "report":
        args.rest = [*unknown, *args.rest]  # argparse leaves report's own options (--only, --arch) unknown
    commands = {"info": cmd_info, "demo": cmd_demo, "bench": cmd_bench, "report": cmd_report,
                "gpu-check": gpucheck.main}
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

"""Command line of prefix_kernels: python -m prefix_kernels {info,demo,bench,report,gpu-check}

  info    versions, the device, the CUDA extension, and which backend can serve on this machine (and why not)
  demo    prefix tuning of a small BERT classifier and a small decoder (transformers, random weights): parity with
          the eager PEFT-style reference, training, generation, speed and memory beside that path; then the
          kernels alone: parity of every backend with the reference, speed beside concatenating + SDPA
  bench   the same timing over a sweep of shapes (on a CPU: the torch backend only)
  report  the static kernel report (compiles every shipped Triton kernel for sm80/sm90; no GPU needed)
  gpu-check  validate and measure on a GPU in one budgeted run, installing nothing (--dry-run: on a CPU)

Timings: the compared paths run in turn, round after round, until the ratio of their times settles or a time cap
is reached; every time is a median with its 20%-80% range, and a ratio too noisy to read is marked as such.
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


def _machine_reasons(name: str, device, reasons: list[str]) -> list[str]:
    """What keeps a backend from serving tensors on ``device`` of this machine, said of the machine (info is given
    no tensors): the cuda backend on a CPU is "no CUDA device here" or "the extension is missing", not "tensors
    are on 'cpu'"; Triton on a CPU needs its interpreter."""
    import torch

    from prefix_kernels import _ext

    if device.type != "cpu" or not reasons:
        return reasons
    if name == "triton":
        return [("no CUDA device on this machine" if not torch.cuda.is_available() else "CPU tensors")
                + ": Triton kernels run on a CPU only in the interpreter (TRITON_INTERPRET=1, exact but far too slow "
                "to time), which is not set" if "TRITON_INTERPRET is not set" in r else r for r in reasons]
    if name != "cuda":
        return reasons
    if _ext.load() is None:
        if torch.cuda.is_available():
            return reasons  # the extension's own state is the reason, and it is said as it is
        built = str(_ext.build_info().get("extension", ""))
        state = built if built.startswith("not built") else f"not loadable ({_ext.error()})"
        return [f"no CUDA device on this machine, and the extension prefix_kernels._C is {state}"]
    if not torch.cuda.is_available():
        return ["no CUDA device on this machine (the extension prefix_kernels._C is loaded, but its kernels need a "
                "CUDA GPU)"]
    return ["CPU tensors: the CUDA kernels take CUDA tensors only (move them to the GPU)"]


def _triton_note(device, reasons: list[str], interpret_set_by: str | None) -> str:
    """'available' for Triton on a CPU means the CPU interpreter: say so, and who set TRITON_INTERPRET."""
    if device.type != "cpu" or reasons:
        return ""
    who = f", set by {interpret_set_by}" if interpret_set_by else ""
    return (f" in the CPU interpreter (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}{who}): exact, but "
            "far too slow to time")


def cmd_info(_args=None, interpret_set_by: str | None = None) -> int:
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
    record = _ext.build_info()
    if err is None:
        state = f"loaded (built for TORCH_CUDA_ARCH_LIST={record.get('archs')!r} at {record.get('built_at')})"
    elif str(record.get("extension", "")).startswith("not built") and "No module named" in err:
        state = f"not available, {record['extension']}"
    else:
        state = f"not available: {err}"
    print(f"extension prefix_kernels._C: {state}")
    if record.get("out_of_date"):
        print(f"  out of date: {record['out_of_date']}")
    print(f"build record: {record}")
    env = os.environ.get(backends.ENV_VAR)
    print(f"{backends.ENV_VAR}={env!r}" if env else f"{backends.ENV_VAR} not set (backend='auto')")
    print("backends (preference order), for tensors on each device of this machine:")
    for row in backends.describe():
        print(f"  {row['name']:7} {row['description']}")
        for dev, reasons in row["devices"].items():
            device = torch.device(dev)
            said = _machine_reasons(row["name"], device, reasons)
            note = _triton_note(device, reasons, interpret_set_by) if row["name"] == "triton" else ""
            print(f"          {dev}: {'available' + note if not said else 'unavailable: ' + '; '.join(said)}")
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


def _timing_rows(device, shapes, time_cap_s: float):
    """Time prefix_attention (the backend "auto" picks) beside concatenating the prefix and calling SDPA: the two
    run in turn until their ratio settles or ``time_cap_s`` passes, the forward and forward + backward apart.
    Memory: on a GPU the peak of one forward + backward; on a CPU, which keeps no allocator statistics, the MiB the
    forward holds for the backward (inputs excluded), as in the demo."""
    import torch

    from prefix_kernels import select_backend
    from prefix_kernels._timing import compare, held_mib
    from prefix_kernels.perf import Shape, make_tensors, ours, sdpa

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for i, dims in enumerate(shapes, 1):
        shape = Shape(*dims)
        leaves = make_tensors(shape, dtype, device)
        backend = select_backend(*leaves, causal=shape.causal)
        grad_out = torch.randn(leaves[0].shape, device=device, dtype=dtype)
        steps = {"ours": functools.partial(ours(), *leaves, shape.causal),
                 "sdpa": functools.partial(sdpa(), *leaves, shape.causal)}
        fwd = compare(steps, device, time_cap_s=time_cap_s)
        full = compare({k: functools.partial(_fwd_bwd, step, leaves, grad_out) for k, step in steps.items()}, device,
                       time_cap_s=time_cap_s, memory=device.type == "cuda")
        memory = full.peaks if device.type == "cuda" else {k: held_mib(step, leaves) for k, step in steps.items()}
        rows.append((shape, f"prefix_attention[{backend}]", fwd, full, memory))
        if sys.stderr.isatty():
            print(f"\r  [{i}/{len(shapes)}] shapes timed", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return dtype, rows


def _print_timing(device, dtype, rows) -> int:
    """The table, then each shape's ratios with their spreads; returns how many ratios were too noisy to read."""
    import torch

    from prefix_kernels._timing import TARGET_SPREAD, WARN_SPREAD

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    memory = "peak MiB" if device.type == "cuda" else "held MiB"
    print(f"  device: {where}; dtype {str(dtype)[6:]}; ms: median (p20-p80) over rounds of both providers in turn, "
          f"until their ratio's p20-p80 range is within {TARGET_SPREAD:.0%} of its median or the time cap")
    if device.type == "cpu":
        print("  memory (CPU, no allocator statistics): the MiB one forward holds for its backward, inputs excluded")
    print(f"  {'B':>3} {'H/Hkv':>6} {'L':>5} {'P':>4} {'D':>4} {'mask':6} {'provider':28} {'forward ms':>26} "
          f"{'fwd+bwd ms':>26} {memory:>9}")
    for shape, name, fwd, full, mem in rows:
        heads = f"{shape.heads_q}/{shape.heads_kv}"
        for key, label in (("ours", name), ("sdpa", "concat + SDPA")):
            mib = mem.get(key)
            print(f"  {shape.batch:>3} {heads:>6} {shape.seq:>5} {shape.prefix:>4} {shape.head_dim:>4} "
                  f"{'causal' if shape.causal else 'full':6} {label:28} {fwd.timing(key).text(3):>26} "
                  f"{full.timing(key).text(3):>26} {'n/a' if mib is None else f'{mib:.1f}':>9}")
    print("  time of prefix_attention / concat + SDPA, round by round: median (p20-p80); below 1 is faster")
    noisy = 0
    for shape, _, fwd, full, _ in rows:
        ratios = {"forward": fwd.ratio("ours", "sdpa"), "fwd+bwd": full.ratio("ours", "sdpa")}
        bad = [k for k, r in ratios.items() if not r.readable]
        noisy += len(bad)
        print(f"  L={shape.seq:>5} P={shape.prefix:>3} {'causal' if shape.causal else 'full':6}: "
              + ", ".join(f"{k} {r.text()} ({r.n} rounds)" for k, r in ratios.items())
              + (f"   NOISY: {' and '.join(bad)} not readable" if bad else ""))
    if noisy:
        print(f"  WARNING: {noisy} of {2 * len(rows)} ratios are too noisy to read (their p20-p80 range is wider "
              f"than {WARN_SPREAD:.0%} of the median): the machine was busy, or the work is too short to time. "
              "Rerun on an idle machine before reading them.")
    return noisy


def cmd_demo(args) -> int:
    import torch

    from prefix_kernels import demo

    device = _device()
    interpret_set_by = None
    if device.type == "cpu" and "TRITON_INTERPRET" not in os.environ:
        # Let the Triton kernels run in the CPU interpreter for the kernel parity check (set before they load).
        os.environ["TRITON_INTERPRET"] = "1"
        interpret_set_by = "the demo, for the parity check"
    cmd_info(interpret_set_by=interpret_set_by)
    summary: list[str] = []
    ok = demo.run(device, summary)
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
    dtype, rows = _timing_rows(device, shapes, time_cap_s=2.0)
    noisy = _print_timing(device, dtype, rows)
    print("\ndemo finished:", "all parity checks passed" if ok else "SOME PARITY CHECKS FAILED")
    if summary:
        print("  time and memory of prefix_kernels / the eager PEFT-style path, median (p20-p80) round by round:")
        for line in summary:
            print(f"    {line}")
    if noisy:
        print(f"  the kernels alone: {noisy} ratio(s) against concat + SDPA too noisy to read (see above)")
    return 0 if ok else 1


def cmd_bench(args) -> int:
    device = _device()
    if device.type == "cpu":
        os.environ.setdefault("PREFIX_KERNELS_BACKEND", "torch")
        print(f"bench on a CPU: only the {os.environ['PREFIX_KERNELS_BACKEND']!r} backend is timed (the Triton "
              "kernels run on a CPU only in the interpreter, a correctness tool far too slow to time, and the CUDA "
              "kernels need a GPU); the numbers say what the CPU fallback costs, not what the GPU kernels do")
    if args.quick or device.type == "cpu":
        shapes = [(4, 12, 12, L, P, 64, c) for L in (64, 128) for P in (16, 64) for c in (False, True)]
    else:
        shapes = [(max(1, 16384 // L), 32, Hkv, L, P, D, c) for L in (128, 512, 2048) for P in (16, 64, 256)
                  for D in (64, 128) for Hkv in (32, 8) for c in (False, True)]
    dtype, rows = _timing_rows(device, shapes, time_cap_s=args.time_cap_s)
    _print_timing(device, dtype, rows)
    return 0


def cmd_report(args) -> int:
    from prefix_kernels import kernel_report

    return kernel_report.main(args.rest)


def main(argv=None) -> int:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m prefix_kernels", description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, backends")
    sub.add_parser("demo", help="prefix-tuned models and the kernels: parity, training, generation, timing")
    b = sub.add_parser("bench", help="timing sweep against concat + SDPA")
    b.add_argument("--quick", action="store_true", help="few small shapes, and a 1 s cap per comparison")
    b.add_argument("--time-cap-s", type=float, default=None,
                   help="seconds a comparison may take at most before its ratio is given as it stands (default 3; "
                        "--quick: 1)")
    r = sub.add_parser("report", help="static kernel report (no GPU needed)")
    r.add_argument("rest", nargs=argparse.REMAINDER)
    from . import gpucheck

    gpucheck.add_arguments(sub.add_parser("gpu-check", help="validate and measure on a GPU in one budgeted run"))
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.cmd != "report":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.cmd == "report":
        args.rest = [*unknown, *args.rest]  # argparse leaves report's own options (--only, --arch) unknown
    if args.cmd == "bench":
        if args.time_cap_s is None:
            args.time_cap_s = 1.0 if args.quick else 3.0
        elif args.time_cap_s <= 0:
            parser.error(f"--time-cap-s must be positive, got {args.time_cap_s}")
    commands = {"info": cmd_info, "demo": cmd_demo, "bench": cmd_bench, "report": cmd_report,
                "gpu-check": gpucheck.main}
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

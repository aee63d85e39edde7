"""Static report of the shipped Triton and CUDA kernels, with no GPU needed.

Every tile configuration the launchers can pick (``shipped_configs`` of ``ops.attention.triton_impl``
and of ``ops.reparam.triton_impl``) is compiled ahead of time for sm80 and sm90 with the signature a
real launch would have (16-byte aligned pointers and strides, unit strides where the tensors are
contiguous). Attention tiles are built in three flag sets: the plain path (causal with padding), every
optional feature on but attn_bias ("scores": ALiBi, dropout, window, softcap), and every one ("all", with
attn_bias: the most state live), each with the tiles the launcher picks for it; the reparameterization
kernels in each launch role with its own flags and pointer dtypes. For each we report shared memory
against the architecture's limit, registers and stack (spill) bytes of the cubin Triton really built
(read with its bundled cuobjdump, so the ptxas options Triton uses are the ones measured), and whether
the PTX uses tensor cores (``mma.sync`` / ``wgmma``).

    python -m prefix_kernels.kernel_report [--arch 80 90] [--only reparam_] [--json out.json] [--jobs N]

Must run without TRITON_INTERPRET (the interpreter cannot compile); the tests call it in a subprocess.

The CUDA kernels of the built extension (prefix_kernels._C) are read back from the library itself:
``cuobjdump --dump-resource-usage`` gives each instantiation's registers, stack frame (where spills go)
and local memory for every architecture it was built for, joined with the dynamic shared memory and
tiles of ``_C.kernel_table()``. cuobjdump comes from CUDA_HOME/bin or the ``nvidia-cuda-cuobjdump``
wheel (requirements-test.txt).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from .ops.attention.features import FLOAT_SCALARS as FEATURE_FLOAT_SCALARS
from .ops.attention.features import KERNEL_FLAGS
from .ops.attention.features import POINTER_TYPES as FEATURE_POINTER_TYPES

# Largest dynamic shared memory one block may use (opt-in), in bytes.
SMEM_LIMIT = {80: 166912, 90: 232448}
PTXAS_ARCH = {80: "sm_80", 90: "sm_90a"}

KERNEL_FUNCTIONS = {
    "fwd": "_attn_fwd_kernel",
    "bwd_preprocess": "_attn_bwd_preprocess_kernel",
    "bwd_dkdv": "_attn_bwd_dkdv_kernel",
    "bwd_prefix_dkdv": "_attn_bwd_prefix_dkdv_kernel",
    "bwd_dq": "_attn_bwd_dq_kernel",
}
# Reparameterization rows are named "reparam_" + the launch role of ops.reparam.triton_impl.
REPARAM = "reparam_"
# Kernels without a matrix product (no tensor cores expected).
NO_DOT = {"bwd_preprocess", REPARAM + "bwd_dz", "bwd_sum_segments", "dropout_mask"}
POINTER_TYPES = {"KPM": "*u8", "KV_LO": "*i32", "KV_HI": "*i32", "LSE": "*fp32", "DELTA": "*fp32",
                 "DLSE": "*fp32", "DPK_PART": "*fp32", "DPV_PART": "*fp32", "ROWS": "*i32", "ITEM_PREFIX": "*i32",
                 "ITEM_LO": "*i32", "ITEM_HI": "*i32"} | FEATURE_POINTER_TYPES
FLOAT_SCALARS = ("sm_scale", "qk_scale", *FEATURE_FLOAT_SCALARS)
# Flag sets compiled for every tile (the tile classes of triton_impl.VARIANTS): the common path (causal decoder
# with padding); every optional feature of the record but attn_bias (its tiles serve ALiBi, dropout, window,
# softcap); and every feature at once, which holds the most state live (the tiles of calls with attn_bias).
_CORE_FLAGS = {"IS_CAUSAL": True, "HAS_KPM": True, "STORE_LSE": True}
VARIANTS = {
    "plain": _CORE_FLAGS | {"HAS_DLSE": False} | dict.fromkeys(KERNEL_FLAGS, False),
    "scores": _CORE_FLAGS | {"HAS_DLSE": True} | dict.fromkeys(KERNEL_FLAGS, True) | {"HAS_BIAS": False},
    "all": _CORE_FLAGS | {"HAS_DLSE": True} | dict.fromkeys(KERNEL_FLAGS, True),
}
# Small fixed-shape kernels of the attention family: (function, signature, constants, num_warps). No dots.
AUX_KERNELS = {
    "bwd_sum_segments": ("_sum_segments_kernel", {"PART": "*fp32", "SEG_OFF": "*i32", "OUT": "*fp32",
                                                   "n_elems": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}, 4),
    "dropout_mask": ("_dropout_mask_kernel", {"SEED": "*i64", "MASK": "*u8", "Lq": "i32", "n_cols": "i32",
                                              "dropout_p": "fp32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                     {"BLOCK_M": 32, "BLOCK_N": 32}, 4),
}


@dataclass
class Row:
    kernel: str
    arch: int
    dtype: str
    block_d: int
    decode: bool
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    variant: str = "plain"
    head_dim: int = 0  # 0: the head dim equals block_d
    block_k: int = 0  # reparam: the reduction step (0 for attention)
    compute: str = ""  # reparam: the compute dtype when it differs from the parameters' dtype (autocast)
    shared: int = -1
    smem_limit: int = 0
    registers: int = -1
    stack: int = -1  # bytes of stack frame per thread: register spills (the kernels use no local arrays)
    tensor_cores: str = ""
    compile_s: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and 0 <= self.shared <= self.smem_limit and self.stack == 0 and (
            self.kernel in NO_DOT or self.tensor_cores != "none"
        )


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _signature(fn, dtype: str, constexprs: dict):
    """Signature, constants and alignment attributes for ``fn`` as a typical launch specialises it."""
    params = fn.params
    first_stride = next(i for i, p in enumerate(params) if p.name.startswith("stride"))
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            consts[name] = constexprs[name]
        elif i < first_stride:
            sig[name] = POINTER_TYPES.get(name, "*" + dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("stride") and name.endswith("d"):
            sig[name] = "constexpr"  # the head dim is contiguous: Triton specialises a stride of 1
            consts[name] = 1
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _attention_source(row: Row):
    from .ops.attention import triton_kernels

    if row.kernel in AUX_KERNELS:
        name, sig, consts, _ = AUX_KERNELS[row.kernel]
        fn = getattr(triton_kernels, name)
        attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params) if sig[p.name].startswith("*")}
        return fn, dict(sig), dict(consts), attrs
    fn = getattr(triton_kernels, KERNEL_FUNCTIONS[row.kernel])
    constexprs = dict(VARIANTS[row.variant])
    constexprs.update(USE_LIBDEVICE=True, D=row.head_dim or row.block_d, BLOCK_M=row.block_m, BLOCK_N=row.block_n,
                      BLOCK_D=row.block_d, UPCAST=False, PRECISION="tf32x3" if row.dtype == "fp32" else "tf32")
    return fn, *_signature(fn, row.dtype, constexprs)


def _reparam_source(row: Row):
    """Signature of a reparameterization launch role: pointers typed per role, the integer arguments that
    are 1 in a launch as constants, the other integers 16-divisible (as at P-Tuning v2 sizes: P in
    {16, 64, 128}, token dim 768, hidden 512; other sizes compile to the same code without vector loads)."""
    from .ops.reparam import triton_impl, triton_kernels

    role = row.kernel[len(REPARAM):]
    dtypes = {v: k for k, v in triton_impl.SHORT.items()}
    param, compute = dtypes[row.dtype], dtypes[row.compute or row.dtype]
    name, pointers, flags, unit = triton_impl.compile_spec(role, param, compute)
    cfg = triton_impl.TileConfig(row.block_m, row.block_n, row.num_warps, row.num_stages, block_k=row.block_k)
    constexprs = flags | triton_impl.tile_constexprs(role, compute, cfg)
    fn = getattr(triton_kernels, name)
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", constexprs[p.name]
        elif p.name in pointers:
            sig[p.name] = "*" + pointers[p.name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name in unit:
            sig[p.name], consts[p.name] = "constexpr", 1
        else:  # sizes and strides: P-Tuning v2 shapes are multiples of 16, which Triton specialises on
            sig[p.name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return fn, sig, consts, attrs


def compile_row(row: Row) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, sig, consts, attrs = (_reparam_source if row.kernel.startswith(REPARAM) else _attention_source)(row)
    row.smem_limit = SMEM_LIMIT[row.arch]
    start = time.time()
    try:
        compiled = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", row.arch, 32),
                                  options={"num_warps": row.num_warps, "num_stages": row.num_stages})
    except Exception as e:  # a compile failure is a finding of the report, not a crash of it
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
        return row
    row.compile_s = round(time.time() - start, 2)
    ptx = compiled.asm["ptx"]
    row.shared = int(compiled.metadata.shared)
    row.tensor_cores = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True)
    usage = re.search(r"REG:(\d+) STACK:(\d+)", res.stdout)
    if res.returncode != 0 or usage is None:
        row.error = "cuobjdump failed: " + (res.stdout + res.stderr).strip()[-200:]
        return row
    row.registers, row.stack = int(usage.group(1)), int(usage.group(2))
    return row


def planned_rows(archs=(80, 90)) -> list[Row]:
    from .ops.attention.triton_impl import shipped_configs
    from .ops.reparam import triton_impl as reparam

    rows = []
    for kernel, arch, bd, dtype, decode, variant, cfg in shipped_configs():
        if arch in archs:
            rows.append(Row(kernel, arch, dtype, bd, decode, cfg.block_m, cfg.block_n, cfg.num_warps,
                            cfg.num_stages, variant))
    for name, (_, _, _, warps) in AUX_KERNELS.items():
        for arch in archs:
            rows.append(Row(name, arch, "fp32", 0, False, 0, 0, warps, 1))
    for role, arch, param, compute, cfg in reparam.shipped_configs():
        if arch in archs:
            rows.append(Row(REPARAM + role, arch, reparam.SHORT[param], 0, False, cfg.block_m, cfg.block_n,
                            cfg.num_warps, cfg.num_stages, block_k=cfg.block_k,
                            compute="" if compute == param else reparam.SHORT[compute]))
    return rows


def run(archs=(80, 90), jobs: int | None = None, progress: bool = True, only: str | None = None) -> list[Row]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("kernel_report compiles for real GPUs: unset TRITON_INTERPRET")
    rows = [r for r in planned_rows(archs) if only is None or r.kernel.startswith(only)]
    jobs = jobs or os.cpu_count() or 1
    done = []
    with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
        for i, row in enumerate(pool.map(compile_row, rows), 1):
            done.append(row)
            if progress:
                print(f"\r[{i}/{len(rows)}] compiled", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return done


def format_table(rows: list[Row]) -> str:
    head = (f"{'kernel':20} {'flags':6} {'arch':>4} {'dtype':9} {'D':>3} {'tile':>10} {'w':>2} {'s':>1} "
            f"{'smem KB':>8} {'regs':>4} {'stack':>5} {'tc':5} status")
    lines = [head, "-" * len(head)]
    for r in rows:
        name = r.kernel + ("/decode" if r.decode else "")
        status = "ok" if r.ok else ("ERROR " + r.error if r.error else "CHECK")
        dtype = r.dtype + (">" + r.compute if r.compute else "")
        tile = f"{r.block_m}x{r.block_n}" + (f"x{r.block_k}" if r.block_k else "")
        lines.append(
            f"{name:20} {r.variant:6} {r.arch:>4} {dtype:9} {r.block_d or '':>3} {tile:>10} {r.num_warps:>2} "
            f"{r.num_stages:>1} {r.shared / 1024:>8.1f} {r.registers:>4} {r.stack:>5} {r.tensor_cores:5} {status}"
        )
    bad = sum(not r.ok for r in rows)
    lines.append(f"{len(rows)} kernel configurations, {bad} with a problem (over shared memory, spills, no "
                 "tensor cores, or a compile error)")
    return "\n".join(lines)


@dataclass
class CudaRow:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    causal: bool
    block_m: int = 0
    block_n: int = 0
    threads: int = 0
    shared: int = -1  # dynamic shared memory per block, bytes
    smem_limit: int = 0
    registers: int = -1
    stack: int = -1  # stack frame bytes: spills land here
    local: int = -1
    error: str = ""

    @property
    def ok(self) -> bool:
        return (not self.error and 0 <= self.shared <= self.smem_limit and self.stack == 0 and self.local == 0
                and 0 < self.registers <= 255)


_CUDA_PASSES = {"FwdKernel": "fwd", "DqKernel": "bwd_dq", "PreprocessKernel": "bwd_preprocess",
                "PrefixReduceKernel": "bwd_prefix_reduce"}
_MANGLED = re.compile(r"attention_kernelINS_\d+(\w+?Kernel)INS_4(Fp16|Bf16)E(?:Li(\d+)E)?(?:Lb([01])E)?(?:Lb([01])E)?")


def find_cuobjdump() -> str | None:
    """A cuobjdump executable: on PATH, in CUDA_HOME/bin or /usr/local/cuda/bin, from the
    ``nvidia-cuda-cuobjdump`` wheel, or the one Triton ships in ``triton/backends/nvidia/bin`` (Triton 3.6 and
    newer do; a GPU machine without the wheel still has it)."""
    import importlib.util
    import shutil

    candidates = [shutil.which("cuobjdump")]
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", "cuobjdump"))
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13", "cu12", "cuda_cuobjdump"):
            candidates.append(os.path.join(base, sub, "bin", "cuobjdump"))
    if importlib.util.find_spec("triton") is not None:
        candidates.append(_cuobjdump())
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _parse_kernel_name(name: str) -> tuple[str, str, int, bool] | None:
    m = _MANGLED.search(name)
    if not m:
        return None
    cls, dtype, hd, flag1, flag2 = m.groups()
    if cls == "DkdvKernel":
        kernel = "bwd_prefix_dkdv" if flag2 == "1" else "bwd_dkdv"
    else:
        kernel = _CUDA_PASSES[cls]
    return kernel, dtype.lower(), int(hd or 0), flag1 == "1"


def cuda_rows() -> list[CudaRow]:
    """One row per (kernel instantiation, architecture) of the built extension."""
    from . import _ext

    module = _ext.load()
    if module is None:
        raise RuntimeError(f"the CUDA extension is not available: {_ext.error()}")
    tool = find_cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA_HOME/bin, PATH, or pip install nvidia-cuda-cuobjdump)")
    table = {(r["pass"], r["dtype"], r["head_dim"], r["causal"]): r for r in json.loads(module.kernel_table())}
    dump = subprocess.run([tool, "--dump-resource-usage", module.__file__], capture_output=True, text=True,
                          check=True).stdout
    rows, arch = [], 0
    for line in dump.splitlines():
        line = line.strip()
        if line.startswith("arch = sm_"):
            arch = int(line.split("sm_")[1])
        elif line.startswith("Function ") and "attention_kernel" in line:
            parsed = _parse_kernel_name(line)
            if parsed:
                row = CudaRow(parsed[0], arch, parsed[1], parsed[2], parsed[3])
            else:
                row = CudaRow("?", arch, "?", 0, False, error=f"unrecognised kernel {line}")
            rows.append(row)
        elif line.startswith("REG:") and rows:
            fields = dict(item.split(":", 1) for item in line.split())
            row = rows[-1]
            row.registers, row.stack, row.local = int(fields["REG"]), int(fields["STACK"]), int(fields["LOCAL"])
    for row in rows:
        entry = table.get((row.kernel, row.dtype, row.head_dim, row.causal))
        row.smem_limit = SMEM_LIMIT.get(row.arch, 0)
        if entry is None:
            row.error = row.error or "not in the kernel table"
            continue
        row.block_m, row.block_n, row.threads, row.shared = (entry["block_m"], entry["block_n"], entry["threads"],
                                                             entry["smem"])
    rows.sort(key=lambda r: (r.arch, r.kernel, r.dtype, r.head_dim, r.causal))
    return rows


def format_cuda_table(rows: list[CudaRow]) -> str:
    head = (f"{'cuda kernel':18} {'arch':>4} {'dtype':5} {'D':>3} {'causal':6} {'tile':>7} {'thr':>4} {'smem KB':>8} "
            f"{'regs':>4} {'stack':>5} {'local':>5} status")
    lines = [head, "-" * len(head)]
    for r in rows:
        status = "ok" if r.ok else ("ERROR " + r.error if r.error else "CHECK")
        tile = f"{r.block_m}x{r.block_n}" if r.block_m else "-"
        lines.append(f"{r.kernel:18} {r.arch:>4} {r.dtype:5} {r.head_dim:>3} {str(r.causal):6} {tile:>7} "
                     f"{r.threads:>4} {r.shared / 1024:>8.1f} {r.registers:>4} {r.stack:>5} {r.local:>5} {status}")
    bad = sum(not r.ok for r in rows)
    lines.append(f"{len(rows)} CUDA kernel instantiations, {bad} with a problem (over shared memory, a stack "
                 "frame or local memory, i.e. spills, or not in the kernel table)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    parser.add_argument(
        "--only",
        help="report one kind of kernel: 'cuda', 'triton', or the Triton kernels whose name starts with "
        "this (e.g. reparam_)",
    )
    args = parser.parse_args(argv)
    ok = True
    if args.only in (None, "cuda"):
        try:
            crows = cuda_rows()
        except RuntimeError as e:
            print(f"CUDA kernels: not reported ({e})")
            if args.only == "cuda":  # asked for the CUDA kernels alone: reporting nothing is a failure
                return 2
        else:
            print(format_cuda_table(crows) + "\n")
            ok &= bool(crows) and all(r.ok for r in crows)
    if args.only == "cuda":
        return 0 if ok else 1
    rows = run(tuple(args.arch), args.jobs, only=None if args.only in (None, "triton") else args.only)
    print(format_table(rows))
    if args.json:
        import triton

        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": [asdict(r) | {"ok": r.ok} for r in rows]}, f, indent=1)
    return 0 if ok and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

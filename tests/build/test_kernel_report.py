"""The static kernel report: every shipped Triton configuration compiles for sm80 and sm90, fits shared
memory, uses tensor cores and does not spill, for the plain path and with every optional feature on.
Runs in a subprocess without TRITON_INTERPRET."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


@pytest.fixture(scope="session")
def report(tmp_path_factory, request):
    """The report, compiled once per test session. Under pytest-xdist every worker would compute a module
    fixture of its own (the xdist_group mark does not keep a module on one worker with pytest 9.2 and xdist
    3.8: its group suffix is never applied), doubling the longest cold step of the suite; so the first worker
    compiles it into the session's shared temporary directory under a file lock, and the others read it."""
    from filelock import FileLock

    worker = getattr(request.config, "workerinput", None)
    root = tmp_path_factory.getbasetemp() if worker is None else tmp_path_factory.getbasetemp().parent
    out = root / "kernel_report.json"
    log = root / "kernel_report.log"
    with FileLock(str(out) + ".lock"):
        if not out.exists():
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            proc = subprocess.run([sys.executable, "-m", "prefix_kernels.kernel_report", "--json", str(out)],
                                  env=env, capture_output=True, text=True, timeout=1200)
            log.write_text(json.dumps({"returncode": proc.returncode, "stdout": proc.stdout,
                                       "stderr": proc.stderr}))
            assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(log.read_text())
    return Finished(result["returncode"], result["stdout"]), json.loads(out.read_text())


class Finished:
    """What the tests read of the report's process."""

    def __init__(self, returncode: int, stdout: str):
        self.returncode, self.stdout = returncode, stdout


def test_every_shipped_configuration_is_reported(report):
    from prefix_kernels.ops.attention.triton_impl import shipped_configs
    from prefix_kernels.ops.reparam import triton_impl as reparam

    _, data = report
    from prefix_kernels.kernel_report import AUX_KERNELS
    from prefix_kernels.ops.attention import triton_decode

    assert len(data["rows"]) == (len(shipped_configs()) + len(reparam.shipped_configs()) + 2 * len(AUX_KERNELS)
                                 + len(triton_decode.shipped_configs()))
    kinds = {(r["kernel"], r["arch"], r["dtype"], r["variant"]) for r in data["rows"]}
    for kernel in ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_prefix_dkdv", "bwd_dq", "decode_fwd"):
        for arch in (80, 90):
            for dtype in ("fp16", "bf16", "fp32"):
                for variant in ("plain", "all"):
                    assert (kernel, arch, dtype, variant) in kinds


def test_every_reparam_role_and_dtype_pair_is_reported(report):
    """Each launch role of the projection, for plain fp32/fp16/bf16 and for fp32 parameters under fp16 and
    bf16 autocast (rounded in registers), on both architectures."""
    from prefix_kernels.ops.reparam import triton_impl as reparam

    _, data = report
    kinds = {(r["kernel"], r["arch"], r["dtype"], r["compute"]) for r in data["rows"]
             if r["kernel"].startswith("reparam_")}
    for role in reparam.ROLES:
        for arch in (80, 90):
            for param, compute in reparam.DTYPE_PAIRS:
                if role == "bwd_dz" and param != compute:
                    continue  # its pointers are fp32 partials and the compute-dtype H: covered by the plain rows
                p, c = reparam.SHORT[param], reparam.SHORT[compute]
                assert (f"reparam_{role}", arch, p, "" if p == c else c) in kinds


def test_all_compile_fit_use_tensor_cores_and_do_not_spill(report):
    from prefix_kernels.kernel_report import NO_DOT

    proc, data = report
    bad = [r for r in data["rows"] if not r["ok"]]
    assert not bad, proc.stdout[-4000:]
    limits = {80: 166912, 90: 232448}
    for r in data["rows"]:
        assert not r["error"]
        assert 0 <= r["shared"] <= limits[r["arch"]]
        assert r["stack"] == 0, r  # no register spills
        assert 0 < r["registers"] <= 255
        if r["kernel"] not in NO_DOT:  # kernel_report's kernels without a matrix product (the decode merge too)
            assert r["tensor_cores"] in ("mma", "wgmma"), r
    assert proc.returncode == 0


def test_hopper_hot_paths_use_wgmma(report):
    """The large half-precision forward and dQ tiles on sm90 must use Hopper's warpgroup MMA."""
    _, data = report
    for r in data["rows"]:
        if r["arch"] == 90 and r["dtype"] in ("fp16", "bf16") and r["block_m"] >= 64 and r["block_d"] in (64, 128) \
                and r["kernel"] in ("fwd", "bwd_dq") and not r["decode"] and r["variant"] == "plain":
            assert r["tensor_cores"] == "wgmma", r


def test_hopper_reparam_half_precision_uses_wgmma(report):
    """Every half-precision projection GEMM on sm90 (W2 streaming included) runs on warpgroup MMA."""
    _, data = report
    for r in data["rows"]:
        if r["arch"] == 90 and r["kernel"].startswith("reparam_") and r["kernel"] != "reparam_bwd_dz" \
                and (r["compute"] or r["dtype"]) in ("fp16", "bf16"):
            assert r["tensor_cores"] == "wgmma", r


def test_report_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "prefix_kernels.kernel_report", "--arch", "80"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr

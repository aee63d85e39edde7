"""Static report of the CUDA kernels as built: every instantiation of the kernel table is in the
library for sm_80 and sm_90, fits shared memory, and spills nothing (no stack frame, no local memory)."""

import json
import re

import pytest

from prefix_kernels import _ext, kernel_report

pytestmark = pytest.mark.skipif(_ext.build_info().get("extension") != "built",
                                reason=f"extension not built: {_ext.build_info().get('extension')}")


def test_every_shipped_cuda_kernel_fits_and_does_not_spill():
    if kernel_report.find_cuobjdump() is None:
        pytest.fail("cuobjdump not found: install requirements-test.txt (nvidia-cuda-cuobjdump)")
    rows = kernel_report.cuda_rows()
    print("\n" + kernel_report.format_cuda_table(rows))
    bad = [r for r in rows if not r.ok]
    assert not bad, kernel_report.format_cuda_table(bad)
    archs = sorted({int(major + minor) for major, minor in re.findall(r"(\d+)\.(\d+)", _ext.build_info()["archs"])})
    table = json.loads(_ext.load().kernel_table())
    for arch in archs:
        built = {(r.kernel, r.dtype, r.head_dim, r.causal) for r in rows if r.arch == arch}
        wanted = {(t["pass"], t["dtype"], t["head_dim"], t["causal"]) for t in table}
        assert built == wanted, f"sm_{arch}: missing {wanted - built}, unexpected {built - wanted}"

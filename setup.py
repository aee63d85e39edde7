"""Build script. Metadata lives in pyproject.toml.

Install with ``pip install --no-build-isolation .`` (or ``-e .``): the build uses the torch already
installed. When torch is a CUDA build and nvcc is found, the CUDA kernels of csrc/ are compiled into
``prefix_kernels._C`` with torch.utils.cpp_extension and ninja. Switches (environment variables):

    PREFIX_KERNELS_SKIP_CUDA_BUILD=1   do not build the extension (the Triton and torch backends remain)
    TORCH_CUDA_ARCH_LIST="8.0;9.0"     GPU architectures to compile for (default "8.0;9.0"; sm_80+ only)
    MAX_JOBS=N                         parallel compile jobs (ninja; default: the CPU count)
    NVCC_THREADS=N                     nvcc --threads, architectures compiled in parallel per job (default 1)
    CUDA_HOME=/path                    the CUDA toolkit (default: /usr/local/cuda when it has bin/nvcc)

What the build saw and did is recorded in ``prefix_kernels/_build_info.json`` for
``python -m prefix_kernels info``.
"""

import glob
import json
import os
import platform
import re
import subprocess
import time

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"
DEFAULT_CUDA_HOME = "/usr/local/cuda"


def _nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release ([\d.]+)", out)
    return match.group(1) if match else out.strip().splitlines()[-1]


def plan_cuda_build() -> tuple[bool, dict]:
    """Whether to build the extension, and the facts for the build record."""
    record = {"python": platform.python_version()}
    try:
        import torch
    except ImportError:
        record.update(torch=None, extension="not built: torch is not installed at build time "
                                            "(install torch first, then pip install --no-build-isolation)")
        return False, record
    record.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    if os.environ.get("PREFIX_KERNELS_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        record["extension"] = "not built: PREFIX_KERNELS_SKIP_CUDA_BUILD is set"
        return False, record
    if torch.version.cuda is None:
        record["extension"] = f"not built: torch {torch.__version__} is not a CUDA build"
        return False, record
    # torch.utils.cpp_extension fixes CUDA_HOME when first imported, guessing from the nvcc on PATH; a
    # wrapper script there (as on our CI machines) would make it guess wrong. Prefer the standard root.
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists(
            os.path.join(DEFAULT_CUDA_HOME, "bin", "nvcc")):
        os.environ["CUDA_HOME"] = DEFAULT_CUDA_HOME
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = _nvcc_version(CUDA_HOME) if CUDA_HOME else None
    record.update(cuda_home=CUDA_HOME, nvcc=nvcc)
    if nvcc is None:
        record["extension"] = (f"not built: nvcc not found (CUDA_HOME={CUDA_HOME!r}); set CUDA_HOME to the CUDA "
                               "toolkit root")
        return False, record
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    record.update(archs=os.environ["TORCH_CUDA_ARCH_LIST"], max_jobs=os.environ.get("MAX_JOBS"),
                  nvcc_threads=os.environ.get("NVCC_THREADS", "1"), extension="built")
    return True, record


def cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    sources = sorted(glob.glob("csrc/launch/*.cu")) + ["csrc/api/register.cpp"]
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
                  f"--threads={os.environ.get('NVCC_THREADS', '1')}",
                  # A spill would show in the build log (the test suite's static report also forbids them).
                  "-Xptxas=--warn-on-spills"]
    return CUDAExtension("prefix_kernels._C", sources, extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                                                                        "nvcc": nvcc_flags})


def write_record(package_dir: str, record: dict) -> None:
    with open(os.path.join(package_dir, "_build_info.json"), "w") as f:
        json.dump(record, f, indent=1)


BUILD_CUDA, RECORD = plan_cuda_build()
RECORD["built_at"] = time.strftime("%Y-%m-%d %H:%M:%S")


class BuildPy(build_py):
    def run(self):
        super().run()
        write_record(os.path.join(self.build_lib, "prefix_kernels"), RECORD)


# Editable installs run from the source tree: record there too.
write_record(os.path.join(HERE, "prefix_kernels"), RECORD)
if BUILD_CUDA:
    from torch.utils.cpp_extension import BuildExtension

    setup(cmdclass={"build_py": BuildPy, "build_ext": BuildExtension}, ext_modules=[cuda_extension()])
else:
    setup(cmdclass={"build_py": BuildPy})

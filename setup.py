"""Build script. Metadata lives in pyproject.toml.

Install with ``pip install --no-build-isolation .`` (or ``-e .``): the build uses the torch already
installed. When torch is a CUDA build and nvcc is found, the CUDA kernels of csrc/ are compiled into
``prefix_kernels._C`` with torch.utils.cpp_extension and ninja. Switches (environment variables):

    PREFIX_KERNELS_SKIP_CUDA_BUILD=1   do not build the extension (the Triton and torch backends remain)
    PREFIX_KERNELS_CUDA_BUILD=if-gpu   build it only when a CUDA device is visible (``make demo`` on a CPU)
    TORCH_CUDA_ARCH_LIST="8.0;9.0"     GPU architectures to compile for (default "8.0;9.0"; sm_80+ only)
    MAX_JOBS=N                         parallel compile jobs (ninja; default: the CPU count)
    NVCC_THREADS=N                     nvcc --threads, architectures compiled in parallel per job (default 1)
    CUDA_HOME=/path                    the CUDA toolkit (default: /usr/local/cuda when it has bin/nvcc)

What the build saw and did is recorded in ``prefix_kernels/_build_info.json`` for
``python -m prefix_kernels info``, with a hash of everything the extension is compiled from (csrc/, the flags,
torch, nvcc, the architectures). The object files live in build/cuda-ext-<python>-torch<version>/ in the source
tree, an incremental ninja build kept across builds and re-installs: a changed file recompiles only what includes
it. An in-place build (``python setup.py build_ext --inplace``, what ``make`` runs, or ``pip install -e .``) whose
hash matches the record and whose library is in place compiles nothing.
"""

import glob
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import time
import warnings

from setuptools import setup
from setuptools.command.build_py import build_py

# pyproject.toml's license table is what the setuptools of a fresh Python 3.11 venv (65) accepts; the string form that
# newer setuptools asks for needs setuptools >= 77. Its deprecation notice would only bury the build's own messages.
warnings.filterwarnings("ignore", message=r"`project.license` as a TOML table is deprecated")

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
    record["inputs"] = inputs_hash(record)
    if os.environ.get("PREFIX_KERNELS_CUDA_BUILD") == "if-gpu" and not torch.cuda.is_available() and (
            up_to_date(record) is None):
        why = ("no CUDA device is visible, so its kernels could not run here, and the build was asked for only with "
               "a GPU (PREFIX_KERNELS_CUDA_BUILD=if-gpu, as `make demo` does). `make test` builds it, since the tests "
               "load it; PREFIX_KERNELS_CUDA_BUILD=1 make demo forces it")
        old = read_record(os.path.join(HERE, "prefix_kernels"))
        if old.get("extension") == "built" and os.path.exists(inplace_library()):
            # Keep the record of the library that is in place, and say that it is behind its sources.
            return False, {**old, "out_of_date": f"sources, flags or torch changed since; not rebuilt: {why}"}
        record["extension"] = f"not built: {why}"
        return False, record
    return True, record


def extension_sources() -> list[str]:
    return sorted(glob.glob("csrc/launch/*.cu")) + ["csrc/api/register.cpp"]


def inputs_hash(record: dict) -> str:
    """A hash of what the extension is compiled from: every file under csrc/, the extension's sources and flags, the
    Python ABI, torch, CUDA, nvcc and the architectures. Equal hashes: the library in place is current."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(HERE, "csrc", "**", "*"), recursive=True)):
        if os.path.isfile(path):
            h.update(os.path.relpath(path, HERE).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    for key in ("python", "torch", "torch_cuda", "cuda_home", "nvcc", "archs", "nvcc_threads"):
        h.update(f"{key}={record.get(key)}\0".encode())
    ext = cuda_extension()
    h.update(repr((ext.sources, ext.extra_compile_args, ext.include_dirs, ext.define_macros)).encode())
    h.update(str(sysconfig.get_config_var("EXT_SUFFIX")).encode())
    return h.hexdigest()[:16]


def inplace_library() -> str:
    return os.path.join(HERE, "prefix_kernels", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))


def read_record(package_dir: str) -> dict:
    try:
        with open(os.path.join(package_dir, "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def up_to_date(record: dict) -> dict | None:
    """The record of the in-place build when it is current (same inputs hash, library present), else None."""
    old = read_record(os.path.join(HERE, "prefix_kernels"))
    if old.get("extension") == "built" and old.get("inputs") == record.get("inputs") and os.path.exists(
            inplace_library()):
        return old
    return None


def build_dir(record: dict) -> str:
    """The persistent ninja build directory: one per Python ABI and torch version, under the ignored build/."""
    tag = f"{sys.implementation.cache_tag}-torch{record.get('torch')}"
    return os.path.join(HERE, "build", "cuda-ext-" + re.sub(r"[^A-Za-z0-9.+_-]", "_", tag))


def describe_plan(record: dict) -> str:
    """What is about to be compiled and why, said before the build starts."""
    import torch

    n_cu = len(glob.glob(os.path.join(HERE, "csrc", "launch", "*.cu")))
    jobs = os.environ.get("MAX_JOBS") or f"ninja's default for {os.cpu_count()} CPUs"
    where = build_dir(record)
    reuse = "reusing the object files there" if os.path.isdir(where) else "a first build: about 4 minutes on 2 cores"
    lines = [f"prefix_kernels: building the CUDA extension prefix_kernels._C: {n_cu} CUDA files and 1 C++ file for "
             f"TORCH_CUDA_ARCH_LIST={record['archs']!r} with nvcc {record['nvcc']} against torch {record['torch']} "
             f"(jobs: {jobs}), in {os.path.relpath(where, HERE)}/ ({reuse})."]
    if not torch.cuda.is_available():
        lines.append("prefix_kernels: no CUDA device is visible, so its kernels cannot run on this machine; it is "
                     "built because the test suite checks that it compiles, loads, registers its ops and answers "
                     "shape queries. PREFIX_KERNELS_SKIP_CUDA_BUILD=1 skips it (the triton and torch backends "
                     "remain; those tests then skip).")
    return "\n".join(lines)


def cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    sources = extension_sources()
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


class BuildPy(build_py):
    def run(self):
        super().run()
        write_record(os.path.join(self.build_lib, "prefix_kernels"), _final_record())


def _final_record() -> dict:
    """The record of this build: a current in-place build keeps its own (its time is when it was compiled)."""
    return (up_to_date(RECORD) if BUILD_CUDA else None) or {**RECORD, "built_at": time.strftime("%Y-%m-%d %H:%M:%S")}


if BUILD_CUDA:
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension):
        """torch's BuildExtension with a persistent ninja directory, that compiles nothing in place when current."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = build_dir(RECORD)

        def run(self):
            inplace = self.inplace or getattr(self, "editable_mode", False)
            current = up_to_date(RECORD) if inplace else None
            if current is not None:
                print(f"prefix_kernels: the CUDA extension is up to date (built {current.get('built_at')}; sources, "
                      f"flags and torch unchanged, inputs {RECORD['inputs']}): nothing to compile", file=sys.stderr)
                return
            print(describe_plan(RECORD), file=sys.stderr, flush=True)
            start = time.perf_counter()
            super().run()
            record = {**RECORD, "built_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "build_s": round(time.perf_counter() - start, 1)}
            if inplace:  # the library is in the source tree (an in-place build, an editable install): so is its record
                write_record(os.path.join(HERE, "prefix_kernels"), record)
            print(f"prefix_kernels: extension built in {record['build_s']:.0f} s", file=sys.stderr)

    setup(cmdclass={"build_py": BuildPy, "build_ext": BuildExt}, ext_modules=[cuda_extension()])
else:
    # Nothing to compile: record why (in the source tree too, for editable installs and in-place builds).
    if "out_of_date" in RECORD:
        write_record(os.path.join(HERE, "prefix_kernels"), RECORD)
        print(f"prefix_kernels: CUDA extension of {RECORD.get('built_at')} kept, {RECORD['out_of_date']}",
              file=sys.stderr)
    else:
        write_record(os.path.join(HERE, "prefix_kernels"), {**RECORD, "built_at": time.strftime("%Y-%m-%d %H:%M:%S")})
        print(f"prefix_kernels: CUDA extension {RECORD['extension']}", file=sys.stderr)
    setup(cmdclass={"build_py": BuildPy})

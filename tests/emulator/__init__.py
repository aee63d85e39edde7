"""The CUDA kernels of csrc/, compiled for the CPU against a fiber-based emulator of the GPU features
they use (see emu_runtime.h), behind the same op logic as the extension. Built once per session with
torch.utils.cpp_extension.load (g++ only; about a minute on two cores)."""

from __future__ import annotations

import functools
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@functools.cache
def load():
    from torch.utils.cpp_extension import load as load_ext

    build = os.path.join(ROOT, "build", "emulator")
    os.makedirs(build, exist_ok=True)
    return load_ext(
        name="prefix_kernels_emulator",
        sources=[os.path.join(HERE, "emu_ops.cpp")],
        extra_include_paths=[HERE],
        extra_cflags=["-O2", "-std=c++20", "-Wno-unused-function"],
        build_directory=build,
        verbose=False,
    )

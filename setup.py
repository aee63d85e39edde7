"""Build script. Metadata lives in pyproject.toml.

Install with ``pip install --no-build-isolation .`` (or ``-e .``): the build uses the torch already
installed. The CUDA extension (csrc/) is not part of this release yet; the build records what it
saw in ``prefix_kernels/_build_info.json`` for ``python -m prefix_kernels info``.
"""

import json
import os
import platform

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def build_record() -> dict:
    record = {"python": platform.python_version(), "extension": "not built: csrc/ has no kernels in this release"}
    try:
        import torch

        record.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    except ImportError:
        record["torch"] = None
    return record


def write_record(package_dir: str) -> None:
    with open(os.path.join(package_dir, "_build_info.json"), "w") as f:
        json.dump(build_record(), f, indent=1)


class BuildPy(build_py):
    def run(self):
        super().run()
        write_record(os.path.join(self.build_lib, "prefix_kernels"))


# Editable installs run from the source tree: record there too.
write_record(os.path.join(HERE, "prefix_kernels"))
setup(cmdclass={"build_py": BuildPy})

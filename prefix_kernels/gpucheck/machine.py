"""Stage "machine": what this run ran on (nvidia-smi, versions, compilers, ``python -m prefix_kernels info``)."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys

from .runner import stage_entry

PACKAGES = ("torch", "triton", "transformers", "peft", "accelerate", "numpy", "pytest", "pytest-xdist",
            "pytest-timeout", "matplotlib", "ruff", "ninja")


def _run(argv: list[str], timeout: float = 20) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not run: {e}"
    return (proc.stdout + proc.stderr).strip()


def _first_line(text: str) -> str:
    """The version line: the one naming a release (nvcc, ptxas), else the first."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if "release" in line), lines[0] if lines else "")


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def tools() -> dict:
    """Compilers and binary tools: where each is, and its version line (None when absent)."""
    cuda_home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc")
                                                else None)
    candidates = {
        "nvcc": [os.path.join(cuda_home, "bin", "nvcc")] if cuda_home else [],
        "cuobjdump": [],
        "ptxas": [],
    }
    try:
        import triton

        bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        candidates["cuobjdump"].append(os.path.join(bin_dir, "cuobjdump"))
        candidates["ptxas"].append(os.path.join(bin_dir, "ptxas"))
    except ImportError:
        pass
    out = {}
    for tool in ("nvcc", "cuobjdump", "ptxas", "gcc", "g++", "ninja", "nvidia-smi"):
        path = next((p for p in candidates.get(tool, []) if os.path.exists(p)), None) or shutil.which(tool)
        out[tool] = None if path is None else {"path": path, "version": _first_line(_run([path, "--version"]))}
    out["cuda_home"] = cuda_home
    return out


def main(argv=None) -> int:
    stage_entry("machine")
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    record = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
              "cpus": os.cpu_count(), "versions": versions(), "tools": tools()}
    record["nvidia_smi"] = (_run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                  "compute_cap", "--format=csv,noheader"]) if record["tools"]["nvidia-smi"] else None)
    import torch

    record["cuda"] = torch.cuda.is_available()
    if record["cuda"]:
        d = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(d)
        record.update(device=torch.cuda.get_device_name(d), capability=list(torch.cuda.get_device_capability(d)),
                      sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    else:
        record.update(device=f"CPU {platform.machine()} ({os.cpu_count()} cores)", capability=None)
    with open(args.json, "w") as f:  # written twice: a stage cut during `info` still says what it saw
        json.dump(record, f, indent=1)
    record["info"] = _run([sys.executable, "-m", "prefix_kernels", "info"], timeout=120)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: v for k, v in record.items() if k != "info"}, indent=1))
    print(record["info"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

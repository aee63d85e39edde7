"""Stage "build": the CUDA extension. Use a prebuilt one that loads; else build it with every core for this
device's architecture only; else say why the cuda backend is skipped (a missing compiler is a reason, not a crash).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from .runner import stage_entry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _loads() -> str | None:
    """None when prefix_kernels._C imports in a fresh interpreter, else the error's last line."""
    proc = subprocess.run([sys.executable, "-c", "import prefix_kernels._C"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"rc {proc.returncode}"


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def plan(dry_run: bool) -> tuple[str, str, list[str] | None, dict]:
    """(status, reason, command or None, environment additions)."""
    import torch

    from prefix_kernels import _ext

    error = _ext.error()  # this process has not imported it yet: the same as a fresh interpreter
    if error is None:
        return "prebuilt", "prefix_kernels._C loads (prebuilt)", None, {}
    why_not = f"prefix_kernels._C does not load ({error})"
    if not os.path.exists(os.path.join(ROOT, "setup.py")):
        return "skipped", f"{why_not}, and {ROOT} is not a source checkout: the cuda backend is skipped", None, {}
    if torch.version.cuda is None:
        return "skipped", f"{why_not}; torch {torch.__version__} is not a CUDA build: cuda backend skipped", None, {}
    nvcc = _nvcc()
    if nvcc is None:
        return "skipped", f"{why_not}; no nvcc (set CUDA_HOME): the cuda backend is skipped", None, {}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return "skipped", f"{why_not}; sm_{major}{minor} is below the kernels' sm_80", None, {}
        arch = f"{major}.{minor}"
    else:
        arch = "9.0"
    env = {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 1),
           "CUDA_HOME": os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))}
    command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    if dry_run:
        return "skipped", f"{why_not}; dry run: would build for sm_{arch.replace('.', '')}", command, env
    if not torch.cuda.is_available():
        return "skipped", f"{why_not}; no CUDA device to build for or to run on", None, {}
    return "build", why_not, command, env


def main(argv=None) -> int:
    stage_entry("build")
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    status, reason, command, env = plan(args.dry_run)
    record = {"status": status, "reason": reason, "command": command, "env": env}
    if status == "build":
        print(f"building: {' '.join(env_ + '=' + v for env_, v in env.items())} {' '.join(command)}", flush=True)
        start = time.monotonic()
        rc = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}).returncode
        record["build_seconds"] = round(time.monotonic() - start, 1)
        error = _loads() if rc == 0 else f"pip exited {rc}"
        record["status"] = "built" if error is None else "failed"
        record["reason"] = (f"built for sm_{env['TORCH_CUDA_ARCH_LIST'].replace('.', '')} in "
                            f"{record['build_seconds']} s" if error is None else f"build failed: {error}")
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    print(f"extension: {record['status']}: {record['reason']}")
    return 0 if record["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())

"""Build the CUDA extension prefix_kernels._C in place, incrementally (the build step of every make target).

    python tools/build_extension.py [--if-gpu]

Runs ``python setup.py build_ext --inplace``: setup.py says before it starts what it compiles and why (or that the
library in place is current and nothing is compiled), and keeps the object files in build/ for the next build.
ninja's compile commands (thousands of characters each) are shortened here to one line per file with the elapsed
time; the whole output goes to build/cuda-ext.log. With --if-gpu (``make demo``), a machine without a visible CUDA
device does not build it (its kernels could not run there), unless PREFIX_KERNELS_CUDA_BUILD=1 is set.
PREFIX_KERNELS_SKIP_CUDA_BUILD=1 skips the build everywhere.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")
SOURCE = re.compile(r"(?:^|\s)-c\s+(\S+\.(?:cu|cpp|cc))(?:\s|$)")
# setuptools' and torch's routine chatter, kept in the log only
QUIET = (re.compile(r"^(running |copying |creating |Emitting ninja build file|Compiling objects|Allowing ninja|"
                    r"g\+\+ .*-shared|x86_64-linux-gnu-g\+\+ .*-shared|/usr/bin/g\+\+ .*-shared|"
                    r"\S*c\+\+ .* -shared )"),
         # torch.utils.cpp_extension on a machine without a GPU: true, and said better by setup.py
         re.compile(r"^W\d{4} .*No CUDA runtime is found"))


def shorten(line: str, start: float) -> str | None:
    """The line to show for one line of the build's output (None: log only)."""
    step = NINJA_STEP.match(line)
    if step:
        source = SOURCE.search(step.group(3))
        what = os.path.relpath(source.group(1), ROOT) if source else step.group(3)[:100]
        elapsed = time.perf_counter() - start
        return f"  [{step.group(1)}/{step.group(2)}] {what}  ({elapsed // 60:.0f}:{elapsed % 60:04.1f} elapsed)"
    if any(p.match(line) for p in QUIET):
        return None
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--if-gpu", action="store_true",
                        help="build only when a CUDA device is visible (PREFIX_KERNELS_CUDA_BUILD=1 forces it)")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.if_gpu and env.get("PREFIX_KERNELS_CUDA_BUILD", "") in ("", "if-gpu"):
        env["PREFIX_KERNELS_CUDA_BUILD"] = "if-gpu"
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    log_path = os.path.join(ROOT, "build", "cuda-ext.log")
    start = time.perf_counter()
    command = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    with open(log_path, "w") as log, subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            log.write(line)
            shown = shorten(line.rstrip("\n"), start)
            if shown is not None:
                print(shown, flush=True)
    if proc.returncode != 0:
        print(f"prefix_kernels: the extension build failed (exit {proc.returncode}) after "
              f"{time.perf_counter() - start:.0f} s; its last lines are above, the whole output is in "
              f"{os.path.relpath(log_path, ROOT)}. PREFIX_KERNELS_SKIP_CUDA_BUILD=1 skips the build (the triton and "
              "torch backends remain).", file=sys.stderr)
        return proc.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())

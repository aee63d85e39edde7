"""Install only the pinned requirements that are missing (the install step of every make target).

    python tools/ensure_requirements.py requirements.txt [--exact] [--offline] [--dry-run] [--torch-cpu]

Compares what this Python has (importlib.metadata) with the pins of a requirements file (``name==version`` lines,
``-r other.txt`` includes, ``#`` comments) and passes only what is absent to pip, in one call, with pip's own
progress shown. A package installed at another version is kept and listed (the pins are what CI tests; the
package runs on torch >= 2.5): ``--exact`` (make EXACT=1) installs the pins over them. On a machine that has
everything, pip is not called at all. ``--offline`` (make OFFLINE=1, or PIP_NO_INDEX set) never calls pip: what is
missing is listed, and the make target goes on without it. ``--torch-cpu`` (make TORCH_CPU=1) takes torch from
PyTorch's CPU-only index (about 200 MB instead of the CUDA build's 3.2 GB of nvidia wheels; no CUDA extension then).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import re
import subprocess
import sys

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(==|>=)\s*([^\s;#]+)\s*$")
# What a newcomer should know before the big downloads start.
SIZES = {"torch": "torch's CUDA build brings about 3.2 GB of nvidia-* wheels (a venv of about 5.8 GB); "
                  "TORCH_CPU=1 takes the CPU build instead (about 200 MB)"}


def parse(path: str, seen: set[str] | None = None) -> list[tuple[str, str, str]]:
    """(name, operator, version) of every pin in ``path`` and the files it includes with ``-r``."""
    seen = set() if seen is None else seen
    path = os.path.abspath(path)
    if path in seen:
        return []
    seen.add(path)
    pins = []
    with open(path) as f:
        for number, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith(("-r ", "--requirement ")):
                pins += parse(os.path.join(os.path.dirname(path), line.split(None, 1)[1]), seen)
                continue
            match = LINE.match(line)
            if not match:
                raise SystemExit(f"{path}:{number}: cannot read {line!r} (expected name==version or name>=version)")
            pins.append((match.group(1), match.group(2), match.group(3)))
    return pins


def _release(version: str) -> tuple:
    """The numeric release of a version ("2.14.1+cu130" -> (2, 14, 1)), for comparisons."""
    public = version.split("+", 1)[0]
    return tuple(int(p) for p in re.findall(r"\d+", re.split(r"[a-zA-Z]", public, maxsplit=1)[0]))


def satisfied(installed: str, op: str, version: str) -> bool:
    """Whether an installed version meets a pin. A local label (+cu130, +cpu) does not matter: torch 2.14.1+cpu
    is torch==2.14.1 for these purposes."""
    public = installed.split("+", 1)[0]
    if op == "==":
        return public == version or (_release(public) == _release(version) and not re.search("[a-zA-Z]", public))
    return _release(public) >= _release(version)


def classify(pins, installed_version) -> tuple[list, list, list]:
    """Split the pins into (present, other_version, missing) with ``installed_version(name) -> str | None``."""
    present, other, missing = [], [], []
    for name, op, version in pins:
        have = installed_version(name)
        if have is None:
            missing.append((name, op, version, None))
        elif satisfied(have, op, version):
            present.append((name, op, version, have))
        else:
            other.append((name, op, version, have))
    return present, other, missing


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pip_command(to_install, torch_cpu: bool) -> list[str]:
    command = [sys.executable, "-m", "pip", "install"]
    if torch_cpu and any(name == "torch" for name, *_ in to_install):
        # The CPU wheels live on PyTorch's index; everything else still comes from the default one.
        command += ["--extra-index-url", TORCH_CPU_INDEX]
    specs = []
    for name, op, version, _ in to_install:
        specs.append(f"{name}{op}{version}{'+cpu' if torch_cpu and name == 'torch' and op == '==' else ''}")
    return command + specs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("requirements")
    parser.add_argument("--exact", action="store_true", help="also replace packages installed at other versions")
    parser.add_argument("--offline", action="store_true", help="never call pip; list what is missing")
    parser.add_argument("--dry-run", action="store_true", help="print the pip command instead of running it")
    parser.add_argument("--torch-cpu", action="store_true", help="torch's CPU build (no CUDA extension then)")
    args = parser.parse_args(argv)
    offline = args.offline or os.environ.get("PIP_NO_INDEX", "").lower() in ("1", "true", "yes")
    pins = parse(args.requirements)
    present, other, missing = classify(pins, installed_version)
    label = os.path.relpath(args.requirements)
    for name, op, version, have in other:
        print(f"requirements: {name} {have} is installed ({label} pins {op}{version}): "
              f"{'replacing it (--exact)' if args.exact else 'kept (EXACT=1 installs the pin)'}")
    to_install = missing + (other if args.exact else [])
    if not to_install:
        print(f"requirements: all {len(pins)} of {label} present "
              f"({len(present)} at the pinned version{'' if not other else f', {len(other)} at another'}); "
              "pip not called")
        return 0
    names = ", ".join(f"{n}{op}{v}" for n, op, v, _ in to_install)
    if offline:
        print(f"requirements: offline, pip not called; missing, going on without them: {names}", file=sys.stderr)
        return 0
    print(f"requirements: {len(present)} of {len(pins)} present; installing {names}")
    for name, *_ in to_install:
        if name in SIZES and not (name == "torch" and args.torch_cpu):
            print(f"requirements: {SIZES[name]}")
    command = pip_command(to_install, args.torch_cpu)
    print("requirements: " + " ".join(command), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())

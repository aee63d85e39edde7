"""Every Python snippet of README.md runs as written, on the CPU, in order, in one interpreter (the snippets of
the getting-started section build on each other, as a reader would paste them)."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_snippets():
    assert len(python_blocks(README.read_text())) >= 3


def test_readme_python_snippets_run_as_written(tmp_path):
    blocks = python_blocks(README.read_text())
    script = tmp_path / "readme_snippets.py"
    parts = []
    for i, block in enumerate(blocks):
        parts.append(f"print('--- README snippet {i + 1} of {len(blocks)}', flush=True)\n{block}")
    script.write_text("\n".join(parts) + "\nprint('--- all README snippets ran')\n")
    # As a reader on a CPU-only machine: no Triton interpreter, no GPU.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PREFIX_KERNELS_BACKEND")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join([str(README.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "--- all README snippets ran" in proc.stdout

"""The make targets' install and build steps (tools/): pip is called only for what is missing, never offline, and
the build's output is shortened to one line per compiled file. Nothing is installed or compiled here."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


req = _load("ensure_requirements")
build = _load("build_extension")

# The GPU machine's software (DESIGN.md): other versions of the pinned packages, no ruff, no cuobjdump wheel.
GPU_MACHINE = {"torch": "2.11.0+cu130", "numpy": "2.5.2", "ninja": "1.13.0", "transformers": "5.17.0",
               "setuptools": "80.9.0", "pytest": "9.0.1", "pytest-xdist": "3.8.0", "matplotlib": "3.10.0",
               "peft": "0.21.2"}


def test_the_pinned_files_parse_and_include_each_other():
    demo = req.parse(os.path.join(ROOT, "requirements.txt"))
    test = req.parse(os.path.join(ROOT, "requirements-test.txt"))
    assert ("torch", "==", "2.14.1") in demo
    assert set(demo) < set(test) and ("ruff", "==", "0.17.6") in test


def test_parse_rejects_what_it_cannot_read(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text("torch==2.14.1\nsomething weird\n")
    with pytest.raises(SystemExit, match=r"r.txt:2: cannot read 'something weird'"):
        req.parse(str(path))


@pytest.mark.parametrize(("installed", "op", "pin", "ok"), [
    ("2.14.1", "==", "2.14.1", True), ("2.14.1+cu130", "==", "2.14.1", True), ("2.14.1+cpu", "==", "2.14.1", True),
    ("2.14.0", "==", "2.14.1", False), ("2.14.1rc1", "==", "2.14.1", False), ("80.9.0", ">=", "64", True),
    ("63.2", ">=", "64", False)])
def test_satisfied(installed, op, pin, ok):
    assert req.satisfied(installed, op, pin) is ok


def _main(monkeypatch, installed, argv):
    """main() against a fake environment; returns the pip commands it ran."""
    calls = []
    monkeypatch.setattr(req, "installed_version", installed.get)
    monkeypatch.setattr(req.subprocess, "call", lambda command: calls.append(command) or 0)
    assert req.main(argv) == 0
    return calls


def test_nothing_missing_calls_no_pip(monkeypatch, capsys):
    pins = req.parse(os.path.join(ROOT, "requirements-test.txt"))
    assert _main(monkeypatch, {n: v for n, _, v in pins}, [os.path.join(ROOT, "requirements-test.txt")]) == []
    assert "pip not called" in capsys.readouterr().out


def test_other_versions_are_kept_and_only_the_absent_installed(monkeypatch, capsys):
    calls = _main(monkeypatch, GPU_MACHINE, [os.path.join(ROOT, "requirements-test.txt")])
    assert len(calls) == 1 and sorted(calls[0][4:]) == ["nvidia-cuda-cuobjdump==13.2.86", "ruff==0.17.6"]
    out = capsys.readouterr().out
    assert "torch 2.11.0+cu130 is installed" in out and "kept" in out


def test_the_gpu_machine_calls_no_pip_for_the_demo(monkeypatch):
    assert _main(monkeypatch, GPU_MACHINE, [os.path.join(ROOT, "requirements.txt")]) == []


def test_offline_never_calls_pip(monkeypatch, capsys):
    assert _main(monkeypatch, GPU_MACHINE, [os.path.join(ROOT, "requirements-test.txt"), "--offline"]) == []
    assert "ruff==0.17.6" in capsys.readouterr().err
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert _main(monkeypatch, GPU_MACHINE, [os.path.join(ROOT, "requirements-test.txt")]) == []


def test_exact_replaces_other_versions(monkeypatch):
    calls = _main(monkeypatch, GPU_MACHINE, [os.path.join(ROOT, "requirements.txt"), "--exact"])
    assert "torch==2.14.1" in calls[0] and "transformers==5.24.0" in calls[0]
    assert "setuptools>=64" not in calls[0]  # 80.9 meets it


def test_a_fresh_machine_gets_everything_in_one_pip_call_with_progress(monkeypatch, capsys):
    calls = _main(monkeypatch, {}, [os.path.join(ROOT, "requirements.txt")])
    assert len(calls) == 1 and "-q" not in calls[0] and "torch==2.14.1" in calls[0]
    assert "3.2 GB" in capsys.readouterr().out  # the size is said before the download starts
    calls = _main(monkeypatch, {}, [os.path.join(ROOT, "requirements.txt"), "--torch-cpu"])
    assert "torch==2.14.1+cpu" in calls[0] and req.TORCH_CPU_INDEX in calls[0]


def test_build_output_is_one_line_per_compiled_file():
    nvcc = (f"[3/6] /usr/local/cuda/bin/nvcc --generate-dependencies-with-compile -I/x -c {ROOT}/csrc/launch/fwd.cu "
            "-o /b/fwd.o -O3 --threads=1")
    line = build.shorten(nvcc, start=0.0)
    assert line.startswith("  [3/6] csrc/launch/fwd.cu  (") and "elapsed" in line
    assert build.shorten("running build_ext", 0.0) is None
    assert build.shorten("W1201 21:12:46.929000 12966 cpp_extension.py:183] No CUDA runtime is found", 0.0) is None
    warning = "ptxas warning : Registers are spilled to local memory in function 'kernel'"
    assert build.shorten(warning, 0.0) == warning  # everything else is shown as it is

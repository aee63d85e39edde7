"""The static report's tool lookup and exit codes (no compile needed)."""

import os

from prefix_kernels import _ext, kernel_report


def test_cuobjdump_found_in_tritons_own_bin_when_nothing_else_is(monkeypatch, tmp_path):
    # A GPU machine with no CUDA toolkit on PATH and no nvidia-cuda-cuobjdump wheel still has Triton's copy.
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(os.path, "isfile", lambda p, real=os.path.isfile: real(p) and "/nvidia/cu" not in p
                        and not p.startswith("/usr/local/cuda"))
    found = kernel_report.find_cuobjdump()
    assert found == kernel_report._cuobjdump(), found
    assert os.sep.join(("backends", "nvidia", "bin")) in found


def test_report_only_cuda_fails_when_it_reports_nothing(monkeypatch, capsys):
    monkeypatch.setattr(_ext, "load", lambda: None)
    monkeypatch.setattr(_ext, "error", lambda: "deliberately unavailable")
    assert kernel_report.main(["--only", "cuda"]) != 0
    assert "not reported" in capsys.readouterr().out

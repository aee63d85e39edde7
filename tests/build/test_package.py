"""The package imports and explains itself with or without Triton and the compiled extension."""

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_info_command_lists_backends():
    out = subprocess.run([sys.executable, "-m", "prefix_kernels", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert "backends (preference order)" in out
    assert "triton" in out and "torch" in out
    assert "extension prefix_kernels._C:" in out


def test_works_without_triton():
    """With triton unimportable the package still imports, says why, and serves through torch."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, prefix_kernels as pk\n"
        "from prefix_kernels import backends\n"
        "q = torch.randn(1, 2, 3, 16)\n"
        "print(pk.select_backend(q, q, q))\n"
        "print(backends.get('triton').device_reasons(torch.device('cpu')))\n"
        "print(pk.prefix_attention(q, q, q).shape)\n"
        "print(pk.PrefixEncoder(3, 2, 2, 16, prefix_projection=True)().shape)\n"
    )
    out = _run(code).splitlines()
    assert out[0] == "torch"
    assert "triton is not importable" in out[1]
    assert out[2] == "torch.Size([1, 2, 3, 16])"
    assert out[3] == "torch.Size([2, 2, 2, 3, 16])"


def test_public_api():
    import prefix_kernels

    assert set(prefix_kernels.__all__) >= {"prefix_attention", "prefix_attention_ref", "select_backend",
                                           "BackendUnavailableError", "PrefixEncoder", "__version__"}


def test_help_is_plain_text():
    out = subprocess.run([sys.executable, "-m", "prefix_kernels", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "``" not in out and ":func:" not in out
    for cmd in ("info", "demo", "bench", "report"):
        assert cmd in out


@pytest.mark.parametrize("extension", ["loaded", "not built"])
def test_info_says_what_is_true_of_the_machine(monkeypatch, capsys, extension):
    """Given no tensors, info speaks of the machine and the extension, not of "tensors on 'cpu'"; Triton's
    'available' on a CPU says it is the interpreter, and who set it."""
    import torch

    from prefix_kernels import __main__ as cli
    from prefix_kernels import _ext

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if extension == "not built":
        why = "not built: no CUDA device is visible (as make demo asks)"
        monkeypatch.setattr(_ext, "load", lambda: None)
        monkeypatch.setattr(_ext, "error", lambda: "ModuleNotFoundError: No module named 'prefix_kernels._C'")
        monkeypatch.setattr(_ext, "build_info", lambda: {"extension": why})
    else:
        monkeypatch.setattr(_ext, "load", lambda: object())
        monkeypatch.setattr(_ext, "error", lambda: None)
        monkeypatch.setattr(_ext, "build_info", lambda: {"extension": "built", "archs": "8.0;9.0"})
    cli.cmd_info(interpret_set_by="the demo, for the parity check")
    out = capsys.readouterr().out
    lines = out.splitlines()
    cuda_line = lines[lines.index(next(line for line in lines if line.startswith("  cuda "))) + 1]
    assert "tensors are on" not in cuda_line
    if extension == "loaded":
        assert cuda_line.endswith("unavailable: no CUDA device on this machine (the extension prefix_kernels._C is "
                                  "loaded, but its kernels need a CUDA GPU)")
    else:
        assert cuda_line.endswith(f"unavailable: no CUDA device on this machine, and the extension "
                                  f"prefix_kernels._C is {why}")
        assert f"extension prefix_kernels._C: not available, {why}" in out
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    assert ("available in the CPU interpreter (TRITON_INTERPRET=1, set by the demo, for the parity check)"
            in out)


def test_info_without_the_interpreter_says_triton_needs_it(monkeypatch, capsys):
    import torch

    from prefix_kernels import __main__ as cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cli.cmd_info()
    out = capsys.readouterr().out
    assert "tensors are on" not in out
    if "triton: not importable" not in out:
        assert "no CUDA device on this machine: Triton kernels run on a CPU only in the interpreter" in out


def _comparison(ours, base):
    from prefix_kernels._timing import Comparison

    return Comparison({"ours": ours, "sdpa": base}, "test")


def test_bench_table_warns_on_noisy_ratios_only(capsys):
    """The table of bench and the demo's kernel timing, from injected timings: a noisy ratio is marked and
    counted, a tight one is not; the CPU memory column is filled."""
    import torch

    from prefix_kernels import __main__ as cli
    from prefix_kernels.perf import Shape

    shape = Shape(4, 12, 12, 64, 16, 64, False)
    tight = _comparison([1.0, 1.01, 0.99, 1.0, 1.0], [2.0, 2.0, 2.0, 2.02, 1.98])
    noisy = _comparison([1.0, 5.0, 0.5, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0])
    rows = [(shape, "prefix_attention[torch]", tight, tight, {"ours": 0.8, "sdpa": 2.6})]
    assert cli._print_timing(torch.device("cpu"), torch.float32, rows) == 0
    out = capsys.readouterr().out
    assert "WARNING" not in out and "NOISY" not in out
    assert "forward 0.50x (0.50-0.51)" in out and " 0.8" in out and "n/a" not in out
    rows = [(shape, "prefix_attention[torch]", noisy, tight, {"ours": 0.8, "sdpa": 2.6})]
    assert cli._print_timing(torch.device("cpu"), torch.float32, rows) == 1
    out = capsys.readouterr().out
    assert "NOISY: forward not readable" in out
    assert "WARNING: 1 of 2 ratios are too noisy to read" in out


def test_bench_rows_measure_memory_on_a_cpu():
    """On a CPU the memory column is the MiB a forward holds for its backward, for both providers."""
    import torch

    from prefix_kernels import __main__ as cli

    dtype, rows = cli._timing_rows(torch.device("cpu"), [(1, 2, 2, 8, 4, 16, True)], time_cap_s=0.05)
    (_, _, fwd, full, memory), = rows
    assert fwd.rounds >= 3 and full.rounds >= 3  # the cap ends the rounds, but not before 3
    assert memory["ours"] > 0 and memory["sdpa"] > 0

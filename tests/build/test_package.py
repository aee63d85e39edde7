"""The package imports and explains itself with or without Triton and the compiled extension."""

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_info_command_lists_backends():
    out = subprocess.run([sys.executable, "-m", "prefix_kernels", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert "backends (preference order):" in out
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

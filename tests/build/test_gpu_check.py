"""gpu-check: the dry run of the whole pipeline on the CPU, a hung stage cut inside the budget, and the measured
tile table that the tuning stage writes and the launchers load."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import triton

from prefix_kernels.ops.attention import tile_overrides, triton_impl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPECTED = {"SUMMARY.md", "gpu_check.log", "results.json", "junit.xml", "tiles.json", "attention.csv", "e2e.csv"}


def _gpu_check(out, *args, env_extra=None, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "prefix_kernels", "gpu-check", "--dry-run", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    return proc, time.monotonic() - start


def test_dry_run_writes_summary_and_every_file(tmp_path):
    out = tmp_path / "out"
    proc, seconds = _gpu_check(out, "--budget-s", "600")
    files = set(os.listdir(out))
    log = (out / "gpu_check.log").read_text() if "gpu_check.log" in files else ""
    assert EXPECTED <= files and len(files) <= 8, (files, log[-3000:])
    assert seconds < 600
    results = json.loads((out / "results.json").read_text())
    status = {s["name"]: s["status"] for s in results["stages"]}
    assert list(status) == ["machine", "tune", "build", "tests", "parity", "bench_attention", "bench_e2e"]
    assert all(s == "ok" for s in status.values()), (status, log[-3000:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    # every stage left its evidence: the machine, the skipped gpu tests, parity rows, a loadable tile table, rows
    assert results["machine"]["versions"]["torch"] and results["build"]["status"] in ("prebuilt", "skipped")
    assert results["tests"]["tests"] > 0 and results["tests"]["skipped"] == results["tests"]["tests"]
    ran = [r for r in results["parity"] if "ratio" in r]
    assert ran and all(r["status"] == "ok" and r["ratio"] <= 1 for r in ran)
    table = tile_overrides.load(str(out / "tiles.json"))
    assert table.entries and {k[0] for k in table.entries} == {"fwd", "bwd_dkdv"}
    assert results["goals"]["attention"] and results["goals"]["e2e"]
    summary = (out / "SUMMARY.md").read_text()
    for heading in ("## Stages", "## Tests", "## Parity", "## Tuned tiles", "## Goals"):
        assert heading in summary
    assert "(in progress)" not in summary


def test_a_hung_stage_is_cut_and_the_rest_still_runs(tmp_path):
    out = tmp_path / "out"
    budget = 100
    proc, seconds = _gpu_check(out, "--budget-s", str(budget), "--skip", "machine", "build", "tests",
                               "bench_attention", "bench_e2e", env_extra={"PREFIX_KERNELS_GPU_CHECK_HANG": "tune"},
                               timeout=300)
    assert seconds < budget + 15  # the budget, and the interpreter's start-up
    results = json.loads((out / "results.json").read_text())
    status = {s["name"]: s for s in results["stages"]}
    assert status["tune"]["status"].startswith("timeout"), status
    assert status["tune"]["seconds"] <= status["tune"]["limit_s"] + 10
    assert not status["parity"]["status"].startswith("skipped") and status["parity"]["seconds"] > 0, status
    assert proc.returncode == 1
    assert "| tune | timeout" in (out / "SUMMARY.md").read_text()


def _doc(**changes):
    doc = {"format": 1, "device": "NVIDIA H200", "arch": 90, "triton": triton.__version__,
           "entries": [{"kernel": "fwd", "block_d": 64, "elem_bytes": 2, "featured": False,
                        "config": {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3}}]}
    doc.update(changes)
    return doc


@pytest.mark.parametrize("change, field", [
    ({"format": 2}, "format"), ({"arch": 75}, "arch"), ({"device": ""}, "device"),
    ({"entries": [{"kernel": "fwd_x", "block_d": 64, "elem_bytes": 2, "config": {}}]}, "kernel"),
    ({"entries": [{"kernel": "fwd", "block_d": 48, "elem_bytes": 2, "config": {}}]}, "block_d"),
    ({"entries": [{"kernel": "fwd", "block_d": 64, "elem_bytes": 2,
                   "config": {"block_m": 64, "block_n": 24, "num_warps": 4, "num_stages": 2}}]}, "config"),
])
def test_a_malformed_tile_table_names_its_field(change, field):
    with pytest.raises(ValueError, match=field):
        tile_overrides.parse(_doc(**change), "t.json")


@pytest.fixture
def fake_h200(monkeypatch):
    """A process that believes it runs on an H200 (for the lookup only: no kernel is launched)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    tile_overrides.from_environment.cache_clear()
    yield
    tile_overrides.from_environment.cache_clear()


def test_a_measured_table_applies_on_its_device_and_triton_only(tmp_path, monkeypatch, fake_h200):
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps(_doc()))
    monkeypatch.setenv(tile_overrides.ENV_VAR, str(path))
    monkeypatch.setattr(triton_impl, "is_interpreting", lambda: False)
    assert triton_impl.tile_config("fwd", 64, 2, arch=90) == triton_impl.TileConfig(64, 32, 4, 3)
    assert triton_impl.tile_config("fwd", 40, 2, arch=90) == triton_impl.TileConfig(64, 32, 4, 3)  # BLOCK_D 64
    assert tile_overrides.lookup("fwd", 64, 4, False, 90, False) is None  # fp32: no entry, the built-in tile
    assert tile_overrides.lookup("fwd", 64, 2, False, 80, False) is None  # another architecture
    assert tile_overrides.lookup("fwd", 64, 2, True, 90, False) is None  # featured kernels keep their tiles
    assert tile_overrides.lookup("fwd", 64, 2, False, 90, True) is None  # the interpreter keeps 32 x 32
    assert tile_overrides.lookup("fwd_decode", 64, 2, False, 90, False) is None
    assert "measured on NVIDIA H200" in tile_overrides.describe()

    for change, why in (({"device": "NVIDIA H100 80GB HBM3"}, "measured on NVIDIA H100"),
                        ({"triton": "0.0.1"}, "Triton 0.0.1")):
        path.write_text(json.dumps(_doc(**change)))
        tile_overrides.from_environment.cache_clear()
        with pytest.warns(UserWarning, match=why):
            assert tile_overrides.lookup("fwd", 64, 2, False, 90, False) is None
        assert why in tile_overrides.describe()

    # unset: the table shipped for the device, by its name
    monkeypatch.delenv(tile_overrides.ENV_VAR)
    monkeypatch.setattr(tile_overrides, "SHIPPED_DIR", str(tmp_path))
    (tmp_path / "nvidia-h200.json").write_text(json.dumps(_doc()))
    tile_overrides.from_environment.cache_clear()
    assert tile_overrides.lookup("fwd", 64, 2, False, 90, False) == (64, 32, 4, 3)
    monkeypatch.setenv(tile_overrides.ENV_VAR, "none")
    tile_overrides.from_environment.cache_clear()
    assert tile_overrides.lookup("fwd", 64, 2, False, 90, False) is None


def test_tuner_overrides_reach_the_kernels_in_the_interpreter():
    from prefix_kernels.testing import assert_parity, check_backend, make_inputs

    assert triton_impl.is_interpreting()
    entries = {tile_overrides.key("fwd", 32, 4): (16, 16, 1, 1), tile_overrides.key("bwd_dq", 32, 4): (16, 16, 1, 1)}
    with tile_overrides.overrides(entries):
        assert triton_impl.tile_config("fwd", 32, 4) == triton_impl.TileConfig(16, 16, 1, 1)
        assert triton_impl.tile_config("bwd_dkdv", 32, 4) == triton_impl.TileConfig(32, 32, 1, 1)
        assert_parity(check_backend(make_inputs(1, 2, 1, 19, 19, 5, 32), "triton", causal=True))
    assert triton_impl.tile_config("fwd", 32, 4) == triton_impl.TileConfig(32, 32, 1, 1)

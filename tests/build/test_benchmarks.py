"""Smoke tests of the benchmark harnesses: they run (--quick) and write their CSV rows and plots."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_attention_quick_writes_rows_and_plots(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_attention.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    csvs = [f for f in os.listdir(tmp_path) if f.endswith(".csv")]
    pngs = sorted(f for f in os.listdir(tmp_path) if f.endswith(".png"))
    assert len(csvs) == 1 and len(pngs) == 3
    with open(tmp_path / csvs[0]) as f:
        rows = list(csv.DictReader(f))
    providers = {r["provider"] for r in rows}
    # the baseline is "concat+sdpa" on a CPU and "concat+sdpa[flash]" (and its siblings) on CUDA: match the family
    assert "prefix_kernels[torch]" in providers and any(p.startswith("concat+sdpa") for p in providers), providers
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(rows) > 0
    for r in ok:
        assert float(r["median_ms"]) > 0 and float(r["tflops"]) > 0
        assert r["device"] and r["torch"] and r["commit"]
    for png in pngs:
        assert (tmp_path / png).stat().st_size > 10_000


def test_bench_e2e_quick_writes_rows_and_plot(tmp_path):
    """The end-to-end harness runs (tiny models, torch backend, PEFT or its stand-in) and writes its JSON, CSV and
    PNG. Only that it runs: the numbers of a shared CPU say nothing."""
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_e2e.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert [f.rsplit(".", 1)[1] for f in files] == ["csv", "json", "png"], files
    stem = files[0].rsplit(".", 1)[0]
    assert stem.startswith("e2e_")
    with open(tmp_path / f"{stem}.json") as f:
        run = json.load(f)
    with open(tmp_path / f"{stem}.csv") as f:
        assert len(list(csv.DictReader(f))) == len(run["rows"])
    assert {"device", "torch", "transformers", "commit"} <= set(run["meta"])
    workloads = {r["workload"] for r in run["rows"]}
    assert {r["workload"] for r in run["rows"] if r["path"] == "prefix_kernels"} == workloads
    # a workload that raises becomes an "error: ..." row rather than a crash: on this CPU every one must run
    failed = [(r["workload"], r["path"], r["status"]) for r in run["rows"] if r["status"] != "ok"]
    assert not failed, failed
    assert (tmp_path / f"{stem}.png").stat().st_size > 10_000


def test_bench_bank_quick_writes_rows(tmp_path):
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # The harness only (one repetition, K of 1 and 4): the numbers of a shared CPU say nothing.
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_bank.py"), "--quick", "--no-plot", "--reps", "1",
               "--threads", "1", "--ks", "1", "4", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".csv")]
    with open(tmp_path / name) as f:
        rows = list(csv.DictReader(f))
    assert {(r["workload"], r["K"], r["path"]) for r in rows} == {
        (w, k, p) for w in ("serve-encoder", "decode", "train-step") for k in ("1", "4")
        for p in ("one batch (bank)", "K separate batches")}
    assert all(float(r["tokens_per_s"]) > 0 and r["commit"] and r["device"] for r in rows)


def test_bench_attention_filters_shapes_and_providers_and_writes_as_it_goes(tmp_path):
    """--shapes and --only narrow the grid; the CSV and JSON hold the rows (written as they are measured)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_attention.py"), "--quick", "--no-plot",
               "--threads", "1", "--shapes", "L=64", "Hkv=4", "causal=0", "--only", "torch]", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".csv")]
    with open(tmp_path / name) as f:
        rows = list(csv.DictReader(f))
    assert {(r["provider"], r["seq"], r["heads_kv"], r["causal"], r["mode"]) for r in rows} == {
        ("prefix_kernels[torch]", "64", "4", "False", m) for m in ("fwd", "bwd", "full")}
    with open(tmp_path / name.replace(".csv", ".json")) as f:
        assert len(json.load(f)["rows"]) == 3
    bad = subprocess.run(command[:-2] + ["--shapes", "Q=1", "--out", str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert bad.returncode == 2 and "unknown key 'Q'" in bad.stderr


def test_bench_attention_decode_dry_run(tmp_path):
    """--decode on the CPU under the interpreter (the GPU grid's code path at one small shape): the Triton decode
    kernel, the tiled forward it replaces, the torch backend, SDPA over a cache holding the prefix and
    concatenation + SDPA each write an ok row, the decode kernel's with its split count."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_attention.py"), "--decode", "--quick",
               "--no-plot", "--threads", "1", "--shapes", "L=64", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".csv")]
    assert name.startswith("attention_decode_")
    with open(tmp_path / name) as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"prefix_kernels[triton-decode]", "prefix_kernels[triton-tiled]",
                                             "prefix_kernels[torch]", "sdpa[cache with prefix]", "concat+sdpa"}
    assert all(r["status"] == "ok" and r["mode"] == "decode" and float(r["gbps"]) > 0 for r in rows), rows
    (decode,) = [r for r in rows if r["provider"] == "prefix_kernels[triton-decode]"]
    assert int(decode["splits"]) >= 1


def test_score_materialising_providers_are_skipped_where_they_would_not_fit(monkeypatch):
    from prefix_kernels import perf

    monkeypatch.setattr(perf, "free_bytes", lambda device: 80 * 2**30)
    long = perf.Shape(2, 32, 8, 8192, 256, 128, True)  # one fp32 score tensor: 17.7 GB
    reason = perf.memory_reason("prefix_kernels[torch]", long, torch.device("cuda"))
    assert reason and "66.0 GiB" in reason and "[2, 32, 8192, 8448]" in reason
    assert perf.memory_reason("concat+sdpa[flash]", long, torch.device("cuda")) is None
    assert perf.memory_reason("prefix_kernels[torch]", perf.Shape(8, 32, 8, 2048, 64, 128, True),
                              torch.device("cuda")) is None


def test_e2e_only_runs_workloads_in_the_order_asked():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_e2e
    finally:
        sys.path.pop(0)
    chosen = bench_e2e.select(bench_e2e.grid("quick"), ["Llama generate", "BERT train P=16"], {})
    assert [w.name for w in chosen] == ["prefix tiny Llama generate 16 P=16", "P-Tuning v2 tiny BERT train P=16"]
    assert [w.prefix for w in bench_e2e.select(bench_e2e.grid("quick"), None, {"prefix": {"64"}})] == [64]

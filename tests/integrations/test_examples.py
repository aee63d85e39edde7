"""The tutorial workflows in examples/ run end to end on tiny random models (a few steps): the evaluation loss goes
down, the saved directory is adapter-sized, and pk.from_pretrained gives back the same predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, tmp_path, *extra):
    result = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it; here it would run the kernels in numpy
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--tiny", "--steps", "12", "--output-dir",
                           str(tmp_path / "out"), "--result", str(result), *extra], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(result) as f:
        return json.load(f)


def test_ptuning_v2_classification(tmp_path):
    r = _run("ptuning_v2_classification.py", tmp_path)
    assert r["eval_loss_after"] < r["eval_loss_before"], r
    assert r["reload_max_diff"] == 0.0 and r["same_predictions"], r
    assert r["adapter_bytes"] < 200_000, r  # the prefix with its MLP and the head, not the model


def test_bloom_generative_qa_with_bitfit(tmp_path):
    r = _run("bloom_prefix_qa.py", tmp_path, "--bitfit")
    assert r["eval_loss_after"] < r["eval_loss_before"], r
    assert r["reload_max_diff"] == 0.0 and r["same_generations"], r
    assert r["bitfit"] and r["adapter_bytes"] < 50_000, r

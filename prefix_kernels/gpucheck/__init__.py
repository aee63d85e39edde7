"""``python -m prefix_kernels gpu-check --out DIR [--budget-s 480] [--dry-run]``: validate and measure everything
on one GPU in one command, offline, inside a time budget.

Stages, each a subprocess with its own time limit (a hung kernel is cut, the rest still runs):

    machine          nvidia-smi, versions, compilers, ``python -m prefix_kernels info``
    build            the CUDA extension: prebuilt, else built for this device's arch with every core, else why not
                     (in the background, beside tune, which needs only Triton)
    tune             candidate tiles timed at the benchmark shapes; the fastest that passes -> tiles.json
    tests            the gpu-marked tests, in parallel (pytest-xdist), JUnit XML
    parity           the kernels at the shipped tiles in bf16/fp16 against the fp32 reference (tolerance rule)
    bench_attention  the goal grid, ours against concat + SDPA(flash), rows appended as measured
    bench_e2e        the P-Tuning v2 train step and generation against PEFT

DIR receives at most 8 files: SUMMARY.md, gpu_check.log, results.json, junit.xml, tiles.json, attention.csv,
e2e.csv and goals.png (when matplotlib is there). SUMMARY.md is rewritten after every stage. ``--dry-run`` runs the
same pipeline on the CPU (Triton interpreter, tiny shapes) to prove the script works.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

from . import summary
from .runner import StageResult, read_jsonl, run_stage, start_stage, wait_stage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ("machine", "build", "tune", "tests", "parity", "bench_attention", "bench_e2e")  # build runs beside tune
SHARE = {"machine": 0.08, "build": 0.45, "tests": 0.22, "parity": 0.12, "tune": 0.25, "bench_attention": 0.2,
         "bench_e2e": 1.0}  # the most of the budget each may take; later stages keep a floor of the rest
FLOOR = 0.04
RESERVE_S = 8.0  # for the summary after the last stage
GOAL_E2E = ["BERT-base train P=64", "Llama-3.2-1B generate", "BERT-base train P=16", "Bloom-560m generate",
            "BERT-base train P=128", "Llama-3.2-1B train", "Bloom-560m train"]


def gpu_test_files() -> list[str]:
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for f in sorted(files):
            if f.startswith("test_") and f.endswith(".py"):
                path = os.path.join(folder, f)
                with open(path) as fh:
                    if "mark.gpu" in fh.read():
                        found.append(os.path.relpath(path, ROOT))
    return sorted(found)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


class Check:
    def __init__(self, out: str, budget_s: float, dry_run: bool, skip=()):
        self.out, self.budget, self.dry, self.skip = out, budget_s, dry_run, set(skip)
        self.start = time.monotonic()
        self.scratch = tempfile.mkdtemp(prefix="gpu-check-")
        self.results: list[StageResult] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
        if dry_run:
            self.env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
        self.env.pop("PREFIX_KERNELS_BACKEND", None)

    def path(self, name: str) -> str:
        return os.path.join(self.scratch, name)

    def remaining(self) -> float:
        return self.budget - RESERVE_S - (time.monotonic() - self.start)

    def limit(self, stage: str) -> float:
        later = STAGES[STAGES.index(stage) + 1:]
        floor = sum(FLOOR * self.budget for s in later if s not in self.skip)
        return max(0.0, min(SHARE[stage] * self.budget, self.remaining() - floor))

    def py(self, *args) -> list[str]:
        return [sys.executable, *args]

    def argv(self, stage: str, limit: float):
        """(argv, environment) of a stage."""
        dry = ["--dry-run"] if self.dry else []
        shipped = {**self.env, "PREFIX_KERNELS_TILES": "none"}
        if stage == "machine":
            return self.py("-m", "prefix_kernels.gpucheck.machine", "--json", self.path("machine.json")), self.env
        if stage == "build":
            return self.py("-m", "prefix_kernels.gpucheck.build", "--json", self.path("build.json"), *dry), self.env
        if stage == "tests":
            workers = 0 if self.dry else min(8, os.cpu_count() or 1)  # a dry run: one process (2 shared cores)
            argv = self.py("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-p",
                           "prefix_kernels.gpucheck.pytest_deadline", f"--junitxml={self.path('junit.xml')}")
            if _has("xdist"):
                argv += ["-n", str(workers)]
            per_test = max(20, int(limit / 5))  # a hung test fails alone (pytest-timeout, where installed)
            if _has("pytest_timeout"):
                argv += [f"--timeout={per_test}"]
            # no test starts after this, so the last ones end and the XML is written inside the limit
            env = {**shipped, "GPU_CHECK_TEST_DEADLINE": str(time.time() + max(1.0, limit - per_test - 10))}
            return argv + gpu_test_files(), env
        if stage == "parity":
            return self.py("-m", "prefix_kernels.gpucheck.parity", "--jsonl", self.path("parity.jsonl"), *dry), shipped
        if stage == "tune":
            return self.py("-m", "prefix_kernels.gpucheck.tune", "--jsonl", self.path("tune.jsonl"), *dry), shipped
        tiles = os.path.join(self.out, "tiles.json")
        env = {**self.env, "PREFIX_KERNELS_TILES": tiles if os.path.exists(tiles) else "none"}
        deadline = ["--deadline-s", str(max(1, int(limit - 25)))]
        if stage == "bench_attention":
            script = os.path.join(ROOT, "benchmarks", "bench_attention.py")
            extra = ["--quick", "--shapes", "L=64"] if self.dry else [
                "--grid", "goals", "--only", "prefix_kernels[triton]", "prefix_kernels[cuda]", "concat+sdpa[flash]"]
            return self.py(script, "--out", self.path("attention"), "--no-plot", *deadline, *extra), env
        script = os.path.join(ROOT, "benchmarks", "bench_e2e.py")
        extra = ["--quick", "--reps", "1", "--only", "tiny BERT train P=16"] if self.dry else \
            ["--reps", "5", "--only", *GOAL_E2E]
        return self.py(script, "--out", self.path("e2e"), "--no-plot", *deadline, *extra), env

    def run(self) -> int:
        os.makedirs(self.out, exist_ok=True)
        for name in summary.OUTPUTS:
            if os.path.exists(os.path.join(self.out, name)):
                os.remove(os.path.join(self.out, name))
        with open(os.path.join(self.out, "gpu_check.log"), "w") as log:
            log.write(f"gpu-check: budget {self.budget:.0f} s, dry run {self.dry}, root {ROOT}\n")
            background = None
            for stage in STAGES:
                if stage in self.skip:
                    self.results.append(StageResult(stage, "skipped: --skip", 0.0, 0.0))
                elif stage.startswith("bench") and not os.path.exists(os.path.join(ROOT, "benchmarks")):
                    self.results.append(StageResult(stage, "skipped: no benchmarks/ folder (not a checkout)", 0, 0))
                elif stage == "build":  # its output goes to its own log, copied in when it ends
                    limit = self.limit(stage)
                    argv, env = self.argv(stage, limit)
                    build_log = open(self.path("build.log"), "w")  # noqa: SIM115 (closed when the build ends)
                    background = start_stage(stage, argv, limit, build_log, env=env, cwd=ROOT)
                    continue
                else:
                    limit = self.limit(stage)
                    argv, env = self.argv(stage, limit)
                    self.results.append(run_stage(stage, argv, limit, log, env=env, cwd=ROOT))
                seen = (self.state()["machine"] or {}).get("cuda", shutil.which("nvidia-smi") is not None)
                if stage == "machine" and not self.dry and not seen:
                    log.write("no CUDA device visible: the rest runs as --dry-run (interpreter, tiny shapes)\n")
                    self.dry = True
                    self.env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
                if background is not None and stage == "tune":
                    self.results.append(wait_stage(background))
                    background.log.close()
                    with open(self.path("build.log")) as f:
                        log.write(f.read())
                    background = None
                self.collect()
            log.write(f"\ngpu-check finished in {time.monotonic() - self.start:.1f} s\n")
        self.collect(final=True)
        shutil.rmtree(self.scratch, ignore_errors=True)
        return 0 if summary.all_ok(self.state()) else 1

    def state(self) -> dict:
        def load(name):
            try:
                with open(self.path(name)) as f:
                    return json.load(f)
            except (OSError, json.JSONDecodeError):
                return None

        return {"dry_run": self.dry, "budget_s": self.budget, "elapsed_s": round(time.monotonic() - self.start, 1),
                "stages": [r.as_dict() for r in self.results], "machine": load("machine.json"),
                "build": load("build.json"), "parity": read_jsonl(self.path("parity.jsonl")),
                "tune": read_jsonl(self.path("tune.jsonl"))}

    def collect(self, final: bool = False) -> None:
        """Copy what the stages wrote into DIR and rewrite results.json and SUMMARY.md (after every stage)."""
        for src, dst in (("junit.xml", "junit.xml"),):
            if os.path.exists(self.path(src)):
                shutil.copyfile(self.path(src), os.path.join(self.out, dst))
        for folder, dst in (("attention", "attention.csv"), ("e2e", "e2e.csv")):
            csvs = [f for f in os.listdir(self.path(folder)) if f.endswith(".csv")] if os.path.isdir(
                self.path(folder)) else []
            if csvs:
                shutil.copyfile(os.path.join(self.path(folder), csvs[0]), os.path.join(self.out, dst))
        state = self.state()
        if state["tune"] and state["machine"]:
            from .tune import table

            doc = table(state["tune"], state["machine"])
            if doc["entries"]:
                with open(os.path.join(self.out, "tiles.json"), "w") as f:
                    json.dump(doc, f, indent=1)
        summary.write(self.out, state, final=final)


def main(args) -> int:
    return Check(args.out, args.budget_s, args.dry_run, args.skip or ()).run()


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="folder for the (at most 8) files this writes")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds the whole check may take (480)")
    parser.add_argument("--dry-run", action="store_true", help="the same pipeline on the CPU: interpreter, tiny "
                                                                 "shapes (proves the script works)")
    parser.add_argument("--skip", nargs="*", choices=STAGES, help="stages to leave out")

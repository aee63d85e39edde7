"""Stages as subprocesses with their own time limits, so a hung kernel is cut and the rest still runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

HANG_ENV = "PREFIX_KERNELS_GPU_CHECK_HANG"  # a stage name: that stage sleeps (tests prove it is cut)


@dataclass
class StageResult:
    name: str
    status: str  # ok | failed (rc N) | timeout after N s | skipped: why
    seconds: float
    limit_s: float
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 1),
                "limit_s": round(self.limit_s, 1), **self.detail}


@dataclass
class Running:
    name: str
    proc: subprocess.Popen | None
    start: float
    limit_s: float
    log: object
    early: StageResult | None = None  # set when the stage could not start


def start_stage(name: str, argv: list[str], limit_s: float, log, env: dict | None = None,
                cwd: str | None = None) -> Running:
    """Start ``argv`` in a new process group, its output appended to ``log`` (an open text file)."""
    log.write(f"\n===== stage {name}: {' '.join(argv)} (limit {limit_s:.0f} s) =====\n")
    log.flush()
    start = time.monotonic()
    if limit_s < 1:
        return Running(name, None, start, limit_s, log, StageResult(name, "skipped: no time left in the budget", 0.0,
                                                                     limit_s))
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
    except OSError as e:
        log.write(f"could not start: {e}\n")
        return Running(name, None, start, limit_s, log, StageResult(name, f"failed: could not start ({e})", 0.0,
                                                                     limit_s))
    return Running(name, proc, start, limit_s, log)


def wait_stage(run: Running) -> StageResult:
    """Wait for a started stage until its limit (counted from its start), then kill it and its children."""
    if run.early is not None:
        return run.early
    try:
        rc = run.proc.wait(timeout=max(0.0, run.start + run.limit_s - time.monotonic()))
        status = "ok" if rc == 0 else f"failed (rc {rc})"
    except subprocess.TimeoutExpired:
        _kill_group(run.proc)
        status = f"timeout after {run.limit_s:.0f} s (cut)"
    seconds = time.monotonic() - run.start
    run.log.write(f"===== stage {run.name}: {status} in {seconds:.1f} s =====\n")
    run.log.flush()
    return StageResult(run.name, status, seconds, run.limit_s)


def run_stage(name: str, argv: list[str], limit_s: float, log, env: dict | None = None,
              cwd: str | None = None) -> StageResult:
    """Run a stage to its end or its limit."""
    return wait_stage(start_stage(name, argv, limit_s, log, env, cwd))


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 2), (signal.SIGKILL, 2)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def stage_entry(name: str) -> None:
    """Called first by every stage module: sleep when the hang switch names this stage."""
    if os.environ.get(HANG_ENV) == name:
        print(f"{HANG_ENV}={name}: sleeping (to be cut)", flush=True)
        time.sleep(3600)


def append_jsonl(path: str, row: dict) -> None:
    """One result as one line, written as soon as it is measured (a cut stage leaves what it had)."""
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut in the middle by a kill
                continue
    return rows


def python() -> str:
    return sys.executable

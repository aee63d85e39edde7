"""Shared plumbing of the benchmark scripts: run metadata, CSV appending, progress, plots."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import re
import subprocess
import sys

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.machine()} ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    """A device name as it appears in result file names: "CPU x86_64 (2 cores)" -> "cpu-x86-64-2-cores"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_commit() -> str:
    """The checkout's commit, with "-dirty" when tracked files differ from it; "unknown" outside git."""
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return ""


def run_metadata(device: torch.device) -> dict:
    """Device, library versions, git commit and time: carried by every row."""
    return {
        "time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "tiles": tile_table(),
    }


def tile_table() -> str:
    """Which Triton tile table the kernels use in this run (built-in, or a measured one and where from)."""
    try:
        from prefix_kernels.ops.attention import tile_overrides
    except ImportError as e:
        return f"unknown ({e})"
    return tile_overrides.describe()


def set_cpu_threads(device: torch.device, requested: int | None, small: bool) -> int:
    """torch's intra-op threads for a CPU run: ``requested``, else 1 for ``small`` grids, whose ops take microseconds
    (more threads only add synchronisation, and on a shared machine each sync can wait a scheduler quantum), else
    torch's default. Returns the count, for the run's metadata."""
    if device.type == "cpu" and (requested or small):
        torch.set_num_threads(requested or 1)
    return torch.get_num_threads()


THREADS_HELP = "torch intra-op threads on a CPU (default: 1 for the small CPU grids, torch's default otherwise)"


def write_json(path: str, meta: dict, rows: list[dict], **extra) -> None:
    """This run's rows and metadata as one JSON document (the CSV beside it accumulates runs)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, **extra, "rows": rows}, f, indent=1)
        f.write("\n")


def append_csv(path: str, rows: list[dict]) -> None:
    """Append rows (dicts with the same keys) to a CSV, writing the header when the file is new. When the file's
    columns differ (a script gained one), it is rewritten with the union of both, old rows blank in new columns."""
    if not rows:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fields = list(rows[0].keys())
    old: list[dict] = []
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != fields:
                old = list(reader)
                fields = list(dict.fromkeys([*reader.fieldnames, *fields]))
            else:
                fields = None  # same columns: plain append
    if fields is None:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=list(rows[0].keys())).writerows(rows)
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(old + rows)


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0

    def step(self, what: str = "") -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        print(f"\r{self.label} [{bar}] {self.done}/{self.total} {what[:60]:60}", end="", file=sys.stderr, flush=True)
        if self.done == self.total:
            print(file=sys.stderr)


def line_plot(path: str, panels: dict, xlabel: str, ylabel: str, title: str, logx: bool = True) -> None:
    """panels: {panel title: {series name: [(x, y), ...]}} -> one PNG with a row of subplots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(panels), 1)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels.items(), strict=False):
        for label, points in sorted(series.items()):
            points = sorted(points)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_plot(path: str, groups: dict, ylabel: str, title: str, reference_lines: dict | None = None) -> None:
    """groups: {x label: {series name: value}} -> one PNG of grouped bars; ``reference_lines``: {label: y} drawn
    as dashed horizontal lines (say, parity at 1.0 and a target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(dict.fromkeys(name for values in groups.values() for name in values))  # first-seen order
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.2))
    for i, name in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ys = [values.get(name, float("nan")) for values in groups.values()]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    for label, y in (reference_lines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="grey")
        ax.annotate(label, (-0.45, y), fontsize=7, ha="left", va="bottom", color="grey")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SHAPES_HELP = ("keep only the shapes matching every KEY=V1,V2 filter (say: L=512,2048 D=64 causal=1); keys: "
               "the grid's fields and their short names")


def shape_filter(tokens: list[str] | None, aliases: dict[str, str]) -> dict[str, set[str]]:
    """``["L=512,2048", "causal=1"]`` -> ``{"seq": {"512", "2048"}, "causal": {"True"}}`` (names through ``aliases``:
    short name -> field); a ValueError names a malformed token or an unknown key."""
    known = set(aliases.values())
    out: dict[str, set[str]] = {}
    for token in tokens or []:
        key, sep, values = token.partition("=")
        field = aliases.get(key, key)
        if not sep or not values:
            raise ValueError(f"--shapes: {token!r} is not KEY=V1,V2")
        if field not in known:
            raise ValueError(f"--shapes: unknown key {key!r} (known: {', '.join(sorted(aliases))})")
        out[field] = {_canonical(v) for v in values.split(",")}
    return out


def _canonical(value) -> str:
    """Values compared as text, with booleans spelled any of 1/0, true/false, True/False."""
    text = str(value)
    return {"1": "True", "true": "True", "0": "False", "false": "False"}.get(text.lower(), text)


def matches(filters: dict[str, set[str]], values: dict) -> bool:
    """Whether ``values`` (field -> value) passes every filter."""
    return all(_canonical(values[f]) in allowed for f, allowed in filters.items())


class Deadline:
    """``--deadline-s``: a run starts no new measurement after this many seconds and writes what it has."""

    def __init__(self, seconds: float | None):
        import time

        self._clock = time.monotonic
        self.end = None if seconds is None else self._clock() + seconds

    def passed(self) -> bool:
        return self.end is not None and self._clock() > self.end


DEADLINE_HELP = "start no new measurement after this many seconds (the rows so far are already written)"


class RowSink:
    """Rows appended to ``stem.csv`` as they are measured, and ``stem.json`` (this run) rewritten with them, so a run
    cut by a time limit leaves what it measured."""

    def __init__(self, stem: str, meta: dict, **extra):
        self.stem, self.meta, self.extra, self.rows = stem, meta, extra, []

    def add(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.rows += rows
        append_csv(self.stem + ".csv", rows)
        self.write()

    def write(self) -> None:
        """Rewrite this run's JSON (say, once the metadata gained the run's duration)."""
        write_json(self.stem + ".json", self.meta, self.rows, **self.extra)

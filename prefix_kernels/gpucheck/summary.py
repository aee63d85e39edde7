"""SUMMARY.md, results.json and goals.png of gpu-check: stage outcomes, test counts, the worst parity errors against
the tolerance rule, the tuned tiles and the goal ratios. Written after every stage, so a cut run still has one."""

from __future__ import annotations

import csv
import json
import os
import xml.etree.ElementTree as ET

OUTPUTS = ("SUMMARY.md", "gpu_check.log", "results.json", "junit.xml", "tiles.json", "attention.csv", "e2e.csv",
           "goals.png")
GOALS = ("fused forward >= 1.0x concat + SDPA(flash) at every shape, >= 1.2x at L <= 512; backward >= 1.0x; "
         "P-Tuning v2 BERT-base train step (B 64, L 86) >= 1.3x PEFT tokens/s at <= 0.8x its memory; generation "
         "with a prefix within 5% of without")


def junit_counts(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": str(e)}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts["failed_tests"] = failed[:20]
    return counts


def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _baseline(providers: dict) -> tuple[str, float] | None:
    """concat + SDPA(flash) where measured, else any concat+sdpa provider (the CPU's unpinned one)."""
    for name in ("concat+sdpa[flash]", *sorted(p for p in providers if p.startswith("concat+sdpa"))):
        if name in providers:
            return name, providers[name]
    return None


def attention_goals(rows: list[dict]) -> list[dict]:
    """Per shape and mode (fwd, bwd): speedup = baseline ms / our best ms, and whether the goal holds."""
    by_key: dict = {}
    for r in rows:
        if r.get("status") != "ok" or r.get("mode") not in ("fwd", "bwd"):
            continue
        key = (r["batch"], r["heads_q"], r["heads_kv"], r["seq"], r["prefix"], r["head_dim"], r["causal"], r["mode"])
        by_key.setdefault(key, {})[r["provider"]] = float(r["median_ms"])
    out = []
    for key, providers in by_key.items():
        ours = {p: t for p, t in providers.items() if p.startswith("prefix_kernels")}
        base = _baseline(providers)
        if not ours or base is None:
            continue
        best = min(ours, key=ours.get)
        B, H, Hkv, L, P, D, causal, mode = key
        speedup = base[1] / ours[best]
        target = 1.2 if mode == "fwd" and int(L) <= 512 else 1.0
        out.append({"shape": f"B{B} H{H}/{Hkv} L{L} P{P} D{D} {'causal' if causal == 'True' else 'full'}",
                    "mode": mode, "ours": best, "baseline": base[0], "speedup": round(speedup, 3),
                    "target": target, "met": speedup >= target})
    return out


def e2e_goals(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r.get("path") != "prefix_kernels" or r.get("status") != "ok":
            continue
        if r["task"] == "train" and r["family"] == "bert":
            speed = float(r["speed_vs_baseline"]) if r["speed_vs_baseline"] else None
            memory = float(r["memory_vs_baseline"]) if r["memory_vs_baseline"] else None
            met = speed is not None and speed >= 1.3 and (memory is None or memory <= 0.8)
            out.append({"workload": r["workload"], "baseline": r["baseline"], "speed": speed, "memory": memory,
                        "goal": "speed >= 1.3, memory <= 0.8", "met": met})
        elif r["task"] == "generate" and r["time_vs_no_prefix"]:
            ratio = float(r["time_vs_no_prefix"])
            out.append({"workload": r["workload"], "time_vs_no_prefix": ratio, "goal": "time <= 1.05x without",
                        "met": ratio <= 1.05, "speed": float(r["speed_vs_baseline"] or "nan")})
    return out


def all_ok(state: dict) -> bool:
    return all(s["status"] == "ok" or s["status"].startswith("skipped") for s in state["stages"]) and not any(
        r.get("status") == "FAIL" for r in state["parity"])


def _parity_lines(parity: list[dict]) -> list[str]:
    ran = [r for r in parity if "ratio" in r or r.get("status", "").startswith(("error", "FAIL"))]
    counts = {s: sum(r.get("status", "").startswith(s) for r in parity) for s in ("ok", "FAIL", "error",
                                                                                 "unsupported", "skipped")}
    lines = [f"{counts['ok']} ok, {counts['FAIL']} failed, {counts['error']} errors, {counts['unsupported']} "
             f"unsupported, {counts['skipped']} backends skipped "
             "(tolerance rule: |out - ref| <= 2x |torch same dtype - ref|, 3x for gradients)", ""]
    for r in parity:
        if r.get("status", "").startswith("skipped"):
            lines.append(f"- {r['backend']}: {r['status']}")
    worst = sorted((r for r in ran if "ratio" in r), key=lambda r: -r["ratio"])[:6]
    if worst:
        lines += ["", "| backend | dtype | case | closest to its bound | error / bound |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['backend']} | {r['dtype']} | {r['case']} | {r['worst']}: {r['error']:.2e} <= "
                  f"{r['bound']:.2e} | {r['ratio']:.2f} |" for r in worst]
    lines += [f"- {r['backend']} {r['dtype']} {r['case']}: {r['status']} {r.get('failed', '')}" for r in ran
              if r.get("status") != "ok"]
    return lines


def markdown(state: dict, attention: list[dict], e2e: list[dict], tests: dict | None, final: bool) -> str:
    m = state.get("machine") or {}
    versions = m.get("versions", {})
    lines = [f"# gpu-check{' (dry run on the CPU)' if state['dry_run'] else ''}{'' if final else ' (in progress)'}",
             "", f"- device: {m.get('device', '?')}; torch {versions.get('torch')}, triton {versions.get('triton')}, "
             f"transformers {versions.get('transformers')}, peft {versions.get('peft')}, numpy {versions.get('numpy')}",
             f"- budget {state['budget_s']:.0f} s, elapsed {state['elapsed_s']:.0f} s",
             f"- extension: {(state.get('build') or {}).get('status', '?')}: "
             f"{(state.get('build') or {}).get('reason', 'the build stage wrote nothing')}",
             "", "## Stages", "", "| stage | status | seconds | limit s |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['limit_s']} |" for s in state["stages"]]
    lines += ["", "## Tests (gpu-marked)", ""]
    if tests is None:
        lines.append("no JUnit XML (the stage did not finish)")
    elif "error" in tests:
        lines.append(f"JUnit XML unreadable: {tests['error']}")
    else:
        lines.append(f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped of {tests['tests']}")
        lines += [f"- FAILED {t}" for t in tests["failed_tests"]]
    lines += ["", "## Parity at the shipped tiles", "", *_parity_lines(state["parity"])]
    lines += ["", "## Tuned tiles (bf16; fp16 shares them)", "",
              "| kernel | D | shipped | chosen | speedup | status |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['kernel']} | {r['block_d']} | {r['shipped']} | {r.get('chosen', '')} | "
              f"{r.get('speedup_vs_shipped', '')} | {r['status']} |" for r in state["tune"]]
    lines += ["", "## Goals", "", GOALS, ""]
    if attention:
        met = sum(g["met"] for g in attention)
        lines += [f"attention: {met} of {len(attention)} (shape, mode) goals met", "",
                  "| shape | mode | ours | baseline | speedup | target |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {g['shape']} | {g['mode']} | {g['ours']} | {g['baseline']} | {g['speedup']:.2f}x | "
                  f"{g['target']}{'' if g['met'] else ' MISSED'} |" for g in attention]
    else:
        lines.append("attention: no measured pair of ours and the baseline")
    lines.append("")
    for g in e2e:
        detail = (f"speed {g['speed']}x, memory {g['memory']}x" if "memory" in g else
                  f"{g['time_vs_no_prefix']}x the time without a prefix")
        lines.append(f"- {g['workload']}: {detail} ({g['goal']}: {'met' if g['met'] else 'MISSED'})")
    if not e2e:
        lines.append("end to end: no measured workload")
    return "\n".join(lines) + "\n"


def plot(path: str, attention: list[dict]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    shapes = list(dict.fromkeys(g["shape"] for g in attention))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(shapes) + 2), 4.2))
    for i, mode in enumerate(("fwd", "bwd")):
        values = {g["shape"]: g["speedup"] for g in attention if g["mode"] == mode}
        ax.bar([j + (i - 0.5) * 0.4 for j in range(len(shapes))], [values.get(s, float("nan")) for s in shapes],
               0.4, label=mode)
    for y in (1.0, 1.2):
        ax.axhline(y, linestyle="--", linewidth=1, color="grey")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("speedup over concat + SDPA")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write(out: str, state: dict, final: bool) -> None:
    attention = attention_goals(_rows(os.path.join(out, "attention.csv")))
    e2e = e2e_goals(_rows(os.path.join(out, "e2e.csv")))
    tests = junit_counts(os.path.join(out, "junit.xml"))
    state = {**state, "tests": tests, "goals": {"attention": attention, "e2e": e2e}}
    if final and attention:
        state["plot"] = plot(os.path.join(out, "goals.png"), attention)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(state, f, indent=1, default=str)
    with open(os.path.join(out, "SUMMARY.md"), "w") as f:
        f.write(markdown(state, attention, e2e, tests, final))

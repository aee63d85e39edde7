"""Benchmark of the reparameterization MLP: PrefixEncoder (fused Triton kernels, and its torch backend) against
the same MLP in eager PyTorch once per step, and against PEFT's per-batch-row computation.

P-Tuning v2 shapes (BERT-base): 12 layers, hidden 768 (12 heads x 64), encoder_hidden 512,
P in {16, 64, 128}, batch 64. Measured: forward, forward + backward (backward = the difference), the
memory a forward holds for its backward (outputs and saved activations, parameters excluded; measured
with saved-tensor hooks, on any device), and the peak memory of forward + backward (CUDA only).
On a GPU the full grid runs in fp32 and under bf16 autocast; on a CPU only the torch paths are timed
(the Triton interpreter is not a speed measurement), and ``--quick`` runs a small grid in seconds.

    python benchmarks/bench_reparam.py [--quick] [--out benchmarks/results] [--shapes P=16,64] [--deadline-s S]

Writes ``reparam_<device>.json`` (this run, with device, versions and git commit) and appends to
``reparam_<device>.csv`` under ``--out``, each row as soon as it is measured.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import DEADLINE_HELP, SHAPES_HELP, Deadline, device_name, git_commit, matches, shape_filter, slug  # noqa: E402

from prefix_kernels import PrefixEncoder  # noqa: E402
from prefix_kernels._timing import held_mib, measure  # noqa: E402
from prefix_kernels.ops.reparam import project_prefix_ref  # noqa: E402


@dataclass(frozen=True)
class Shape:
    P: int
    batch: int
    L: int = 12
    Hkv: int = 12
    D: int = 64
    hidden: int = 512


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="bench_reparam", file=sys.stderr)
    except ImportError:
        class Plain:
            n = 0

            def update(self, k=1):
                self.n += k
                print(f"\r  [{self.n}/{total}] measurements", end="", file=sys.stderr, flush=True)

            def close(self):
                print(file=sys.stderr)

        return Plain()


def _peft_encoder(shape: Shape, device):
    """PEFT's own prefix encoder when peft is installed, else a faithful copy of it (same modules, same
    forward: Embedding -> Linear -> Tanh -> Linear on every token of every batch row)."""
    try:
        from peft import PrefixEncoder as PeftPrefixEncoder
        from peft import PrefixTuningConfig

        cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=shape.P, token_dim=shape.Hkv * shape.D,
                                 num_attention_heads=shape.Hkv, num_layers=shape.L, prefix_projection=True,
                                 encoder_hidden_size=shape.hidden)
        return PeftPrefixEncoder(cfg).to(device), "peft"
    except ImportError:
        mirror = PrefixEncoder(shape.P, shape.L, shape.Hkv, shape.D, prefix_projection=True,
                               encoder_hidden_size=shape.hidden, device=device)

        def forward(tokens):
            return mirror.transform(mirror.embedding(tokens))

        mirror.forward = forward
        return mirror, "peft-mirror (peft not installed)"


def _providers(shape: Shape, device, fused: bool):
    """{name: (forward fn returning tensors, parameters)}; every provider holds the same weights."""
    peft_enc, peft_name = _peft_encoder(shape, device)
    state = peft_enc.state_dict()
    sizes = {"num_layers": shape.L, "num_kv_heads": shape.Hkv, "head_dim": shape.D}

    def encoder(backend):
        enc = PrefixEncoder(shape.P, shape.L, shape.Hkv, shape.D, prefix_projection=True,
                            encoder_hidden_size=shape.hidden, backend=backend, device=device)
        enc.load_state_dict(state)
        return enc

    out = {}
    if fused:
        enc = encoder("triton")
        out["PrefixEncoder[triton]"] = (lambda enc=enc: [enc()], list(enc.parameters()))
    enc = encoder("torch")
    out["PrefixEncoder[torch]"] = (lambda enc=enc: [enc()], list(enc.parameters()))
    ref = [t.detach().requires_grad_() for t in state.values()]
    out["eager once per step"] = (lambda: [project_prefix_ref(*ref, **sizes)], ref)
    tokens = torch.arange(shape.P, device=device).unsqueeze(0).expand(shape.batch, -1)

    def peft_per_batch():
        # PeftModel.get_prompt: the encoder on every row, then view / permute / split into layers.
        flat = peft_enc(tokens)
        view = flat.view(shape.batch, shape.P, shape.L * 2, shape.Hkv, shape.D).permute([2, 0, 3, 1, 4])
        return list(view.split(2))

    out[f"{peft_name} per batch row"] = (peft_per_batch, list(peft_enc.parameters()))
    frozen = encoder("triton" if fused else "torch").eval().requires_grad_(False)
    out["PrefixEncoder frozen (cached)"] = (lambda: [frozen()], [])
    return out


def _autocast(device, dtype):
    if dtype is None:
        import contextlib

        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def run(quick: bool, device: torch.device, on_row=None, filters=None, deadline=None):
    """The rows of the grid; each is also handed to ``on_row`` as soon as it is measured."""
    fused = device.type == "cuda"
    if quick or device.type == "cpu":
        shapes = [Shape(P=16, batch=8), Shape(P=64, batch=8)] if quick else [Shape(P, 64) for P in (16, 64, 128)]
        precisions = [None]
    else:
        shapes = [Shape(P, 64) for P in (16, 64, 128)]
        precisions = [None, torch.bfloat16]
    shapes = [s for s in shapes if matches(filters or {}, {f: getattr(s, f) for f in s.__dataclass_fields__})]
    reps = 3 if quick or not fused else 20
    rows = []
    bar = _progress(len(shapes) * len(precisions) * 5)
    for shape in shapes:
        for autocast in precisions:
            if deadline is not None and deadline.passed():
                print("\n--deadline-s reached", file=sys.stderr)
                bar.close()
                return rows
            torch.manual_seed(0)
            for name, (fn, params) in _providers(shape, device, fused).items():
                with _autocast(device, autocast):
                    fwd = measure(lambda fn=fn: fn(), device, warmup=1, reps=reps)
                    full = held = None
                    if params:
                        held = held_mib(fn, params, count_outputs=True)
                        grads = [torch.randn_like(t) for t in fn()]
                        full = measure(lambda fn=fn, params=params, grads=grads: torch.autograd.grad(
                            fn(), params, grads), device, warmup=1, reps=reps)
                rows.append({
                    "P": shape.P, "batch": shape.batch, "layers": shape.L, "kv_heads": shape.Hkv,
                    "head_dim": shape.D, "encoder_hidden": shape.hidden,
                    "precision": "fp32" if autocast is None else f"autocast-{str(autocast)[6:]}",
                    "provider": name,
                    "fwd_ms": round(fwd.median_ms, 4),
                    "fwd_bwd_ms": None if full is None else round(full.median_ms, 4),
                    "bwd_ms": None if full is None else round(full.median_ms - fwd.median_ms, 4),
                    "held_mib": None if held is None else round(held, 2),
                    "peak_mib_fwd_bwd": None if full is None or full.peak_mib is None else round(full.peak_mib, 2),
                })
                if on_row is not None:
                    on_row(rows[-1])
                bar.update()
    bar.close()
    return rows


def _print(rows, meta):
    print(f"device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}")
    if meta["note"]:
        print(meta["note"])
    print(f"{'P':>4} {'B':>3} {'precision':17} {'provider':36} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd':>9} "
          f"{'held MiB':>9} {'peak MiB':>9}")
    for r in rows:
        def f(v, spec=".3f"):
            return f"{v:{spec}}" if v is not None else "n/a"

        print(f"{r['P']:>4} {r['batch']:>3} {r['precision']:17} {r['provider']:36} {f(r['fwd_ms']):>9} "
              f"{f(r['bwd_ms']):>9} {f(r['fwd_bwd_ms']):>9} {f(r['held_mib'], '.1f'):>9} "
              f"{f(r['peak_mib_fwd_bwd'], '.1f'):>9}")


ALIASES = {"B": "batch", "P": "P", "batch": "batch", "L": "L", "D": "D", "Hkv": "Hkv", "hidden": "hidden"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small grid (seconds on a CPU)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the CSV/JSON")
    parser.add_argument("--shapes", nargs="*", help=SHAPES_HELP + " (P, B, L layers, Hkv, D, hidden)")
    parser.add_argument("--deadline-s", type=float, help=DEADLINE_HELP)
    args = parser.parse_args(argv)
    try:
        filters = shape_filter(args.shapes, ALIASES)
    except ValueError as e:
        parser.error(str(e))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    start = time.time()
    meta = {
        "device": device_name(device), "torch": torch.__version__, "triton": triton_version,
        "commit": git_commit(), "quick": args.quick, "seconds": None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": "" if device.type == "cuda" else
        "CPU: the fused Triton path is not timed (the interpreter is not a speed measurement); peak memory is "
        "measured on CUDA only",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = slug(meta["device"])
    json_path, csv_path = out / f"reparam_{name}.json", out / f"reparam_{name}.csv"
    measured: list[dict] = []

    def write_json():
        json_path.write_text(json.dumps({"meta": meta, "rows": measured}, indent=1) + "\n")

    def on_row(row: dict) -> None:  # appended as measured: a run cut by a time limit keeps its rows
        measured.append(row)
        fields = ["date", "device", "torch", "triton", "commit", *row.keys()]
        new = not csv_path.exists()
        with csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerow({k: meta[k] for k in ("date", "device", "torch", "triton", "commit")} | row)
        write_json()

    rows = run(args.quick, device, on_row, filters, Deadline(args.deadline_s))
    meta["seconds"] = round(time.time() - start, 1)
    write_json()
    _print(rows, meta)
    print(f"wrote {json_path} and appended to {csv_path} as measured ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

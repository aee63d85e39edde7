"""Many prefixes in one batch: K tasks served (or trained) in one batch through a prefix bank, against K separate
batches of one task each (the same model and rows, one prefix per batch).

Workloads (random-weight models from configs; nothing is downloaded):

- ``serve-encoder``: forward inference of a P-Tuning v2 classifier shaped like BERT-base (12 layers, hidden 768,
  12 heads, P = 16 per task), ``rows`` rows of ``seq`` tokens per task; throughput in tokens/s.
- ``decode``: greedy ``generate()`` of a small Llama-shaped decoder (GQA), ``rows`` left-padded prompts per task;
  throughput in generated tokens/s.
- ``train-step``: one optimizer step (forward, backward, AdamW) of the classifier on a batch mixing K tasks,
  against K per-task steps over the same rows; throughput in tokens/s.

The "K separate batches" path runs a single-prefix copy of the model (what serving one adapter per batch costs:
one prefix computed per step, not the bank) on each task's rows in turn; "one batch" runs the bank of K prefixes
on all rows at once, each row choosing its task's prefix. K in {1, 4, 16}. Rows are appended to
``results/bank_<device>.csv``, this run goes to ``bank_<device>.json``, and ``bank_<device>.png`` plots tokens/s
against K (matplotlib, unless ``--no-plot``). On a CPU the torch backend runs (the Triton interpreter is not a
speed measurement) in fp32; on a GPU "auto" (Triton: the cuda backend declines banks) in bf16.

    python benchmarks/bench_bank.py            # the full sizes (a GPU)
    python benchmarks/bench_bank.py --quick    # small models: the CPU smoke run (< 2 minutes)
    python benchmarks/bench_bank.py --only decode --ks 4 16 --deadline-s 120

Rows are appended to the CSV (and the JSON rewritten) as each is measured: a run cut by a time limit keeps them.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (  # noqa: E402
    DEADLINE_HELP,
    RESULTS,
    Deadline,
    Progress,
    RowSink,
    line_plot,
    run_metadata,
    set_cpu_threads,
    slug,
)

import prefix_kernels as pk  # noqa: E402
from prefix_kernels._timing import measure  # noqa: E402

PATHS = ("one batch (bank)", "K separate batches")


def sizes(quick: bool) -> dict:
    if quick:
        return {"ks": (1, 4, 16), "P": 8, "encoder": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                           intermediate_size=512),
                "decoder": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                intermediate_size=512),
                "rows": 4, "seq": 64, "prompt": 32, "new": 8, "reps": 3}
    return {"ks": (1, 4, 16), "P": 16, "encoder": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                        intermediate_size=3072),
            "decoder": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                            intermediate_size=2816),
            "rows": 8, "seq": 128, "prompt": 64, "new": 32, "reps": 10}


def _models(s: dict, device, dtype):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        encoder = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=8192, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            **s["encoder"])).to(device, dtype).eval()
        decoder = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=8192, **s["decoder"]))
        decoder = decoder.to(device, dtype).eval()
    decoder.generation_config.eos_token_id = None  # exactly max_new_tokens
    decoder.generation_config.pad_token_id = 0
    return encoder, decoder


def _batch(rows: int, length: int, device, left_pad: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 8192, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    for r in range(rows):  # a quarter of the rows padded by up to a quarter of the length
        if r % 4 == 3:
            pad = length // 4
            if left_pad:
                mask[r, :pad] = 0
            else:
                mask[r, length - pad:] = 0
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def _runner(model, handle, s: dict, kind: str, ids, mask, labels):
    """run(rows, selection): one call of the workload on ``rows`` of the batch."""
    if kind == "decode":
        def run(rows, sel):
            with handle.use_prefix(sel), torch.no_grad():
                model.generate(input_ids=ids[rows], attention_mask=mask[rows], max_new_tokens=s["new"],
                               do_sample=False)
    elif kind == "train-step":
        optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-3)

        def run(rows, sel):
            with handle.use_prefix(sel):
                loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        def run(rows, sel):
            with handle.use_prefix(sel), torch.no_grad():
                model(input_ids=ids[rows], attention_mask=mask[rows])
    return run


def _workloads(model, k: int, s: dict, device, kind: str, config):
    """{path: (fn, tokens per call)} for K tasks of ``s['rows']`` rows each, and the handles to remove after."""
    n = s["rows"]
    if kind == "decode":
        ids, mask = _batch(k * n, s["prompt"], device, True, seed=k)
        tokens = k * n * s["new"]
    else:
        ids, mask = _batch(k * n, s["seq"], device, False, seed=k)
        tokens = int(mask.sum())
    labels = torch.arange(k * n, device=device) % 3
    single_model = copy.deepcopy(model)
    bank = pk.apply_prefix_tuning(model, config, num_prefixes=k)
    single = pk.apply_prefix_tuning(single_model, config)
    for handle in (bank, single):
        if kind != "train-step":
            handle.prefix_encoder.requires_grad_(False)
    run_bank = _runner(model, bank, s, kind, ids, mask, labels)
    run_single = _runner(single_model, single, s, kind, ids, mask, labels)
    index = [t for t in range(k) for _ in range(n)]

    def one_batch():
        run_bank(slice(None), index)

    def separate():
        for t in range(k):
            run_single(slice(t * n, (t + 1) * n), None)

    return {PATHS[0]: (one_batch, tokens), PATHS[1]: (separate, tokens)}, (bank, single)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models (the CPU smoke run)")
    parser.add_argument("--out", default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--reps", type=int, help="timed repetitions per measurement (default: 3 quick, 10 full)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads on a CPU (default: torch's)")
    parser.add_argument("--ks", type=int, nargs="+", help="numbers of tasks K (default: 1 4 16)")
    parser.add_argument("--only", nargs="*", choices=("serve-encoder", "decode", "train-step"),
                        help="workloads to run (default: all three)")
    parser.add_argument("--deadline-s", type=float, help=DEADLINE_HELP)
    args = parser.parse_args(argv)
    deadline = Deadline(args.deadline_s)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "auto" if device.type == "cuda" else "torch"  # the Triton interpreter is not a speed measurement
    s = sizes(args.quick)
    if args.reps:
        s["reps"] = args.reps
    if args.ks:
        s["ks"] = tuple(args.ks)
    meta = {**run_metadata(device), "cpu_threads": set_cpu_threads(device, args.threads, False)}
    encoder, decoder = _models(s, device, dtype)
    kinds = tuple((kind, model) for kind, model in (("serve-encoder", encoder), ("decode", decoder),
                                                    ("train-step", encoder)) if not args.only or kind in args.only)
    progress = Progress(len(kinds) * len(s["ks"]) * len(PATHS), "bench_bank")
    start = time.time()
    stem = os.path.join(args.out, f"bank_{slug(meta['device'])}")
    run_meta = {**meta, "quick": args.quick, "seconds": None, "sizes": dict(s)}
    sink = RowSink(stem, run_meta)
    rows = sink.rows
    for kind, model in kinds:
        for k in s["ks"]:
            if deadline.passed():
                break
            config = pk.PrefixConfig(num_virtual_tokens=s["P"], prefix_projection=kind == "train-step",
                                     encoder_hidden_size=256 if args.quick else 512, backend=backend)
            paths, handles = _workloads(model, k, s, device, kind, config)
            try:
                for path, (fn, tokens) in paths.items():
                    progress.step(f"{kind} K={k} {path}")
                    t = measure(fn, device, warmup=1, reps=s["reps"])
                    sink.add([{**meta, "workload": kind, "K": k, "rows_per_task": s["rows"], "P": s["P"],
                                 "seq": s["prompt"] if kind == "decode" else s["seq"],
                                 "new_tokens": s["new"] if kind == "decode" else "",
                                 "dtype": str(dtype).replace("torch.", ""), "backend": backend, "path": path,
                                 "median_ms": round(t.median_ms, 3), "tokens": tokens,
                                 "tokens_per_s": round(tokens / t.median_ms * 1e3, 1),
                                 "peak_mib": "" if t.peak_mib is None else round(t.peak_mib, 1)}])
            finally:
                for handle in handles:
                    handle.remove()

    run_meta["seconds"] = round(time.time() - start, 1)
    sink.write()
    print(f"wrote {len(rows)} rows to {stem}.csv and {stem}.json (appended as measured)")
    if not args.no_plot and rows:
        panels: dict = {}
        for r in rows:
            panels.setdefault(r["workload"], {}).setdefault(r["path"], []).append((r["K"], r["tokens_per_s"]))
        line_plot(stem + ".png", panels, "K (tasks)", "tokens/s",
                  f"K tasks in one batch vs K batches, {meta['device']}, {rows[0]['dtype']}, commit {meta['commit']}")
        print(f"wrote {stem}.png")
    print(f"{'workload':14} {'K':>3}  {'one batch tok/s':>16} {'K batches tok/s':>16} {'speedup':>8}")
    for kind, _ in kinds:
        for k in s["ks"]:
            pair = {r["path"]: r for r in rows if r["workload"] == kind and r["K"] == k}
            if len(pair) < len(PATHS):
                continue
            a, b = pair[PATHS[0]]["tokens_per_s"], pair[PATHS[1]]["tokens_per_s"]
            print(f"{kind:14} {k:>3}  {a:>16.1f} {b:>16.1f} {a / b:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

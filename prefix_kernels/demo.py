"""``python -m prefix_kernels demo``: prefix tuning end to end on this machine, in well under a minute on a CPU.

From embedded configs (random weights, nothing downloaded) it builds a small P-Tuning v2 BERT classifier and a
small prefix-tuned Llama-style decoder (GQA), then for each: checks outputs and prefix gradients against the eager
PEFT-style reference (the prefix in a DynamicCache, B copies, ones prepended to the mask, eager attention), trains a
few steps, and for the decoder generates greedily with a dynamic and a static cache against the reference. Last, it
times a training step and generation on our path beside the eager PEFT-style path, with memory.
"""

from __future__ import annotations

import copy
import platform
import sys
import time

import torch

BERT = {"vocab_size": 2048, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 512, "max_position_embeddings": 256, "num_labels": 3, "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1}
LLAMA = {"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 512}
PREFIX_LEN = 16
ANSWER = 42  # the token the decoder's prefix learns to emit


def _progress(label: str, step: int, total: int, loss: float, width: int = 24) -> None:
    """A progress bar redrawn in place on a terminal; elsewhere (a log, a pipe) only its last state."""
    if step < total and not sys.stdout.isatty():
        return
    done = width * step // total
    end = "\n" if step == total else ""
    print(f"\r    {label} [{'#' * done}{'.' * (width - done)}] {step:>3}/{total}  loss {loss:.3f}", end=end, flush=True)


def _verdict(results) -> tuple[bool, str]:
    ok = all(r.ok for r in results)
    worst = max(results, key=lambda r: r.error / max(r.bound, 1e-30))
    return ok, f"{'ok' if ok else 'FAIL'} ({len(results)} quantities; closest to its bound: {worst})"


def _train(model, handle, batches, steps: int, lr: float, label: str) -> list[float]:
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batches(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        _progress(label, step + 1, steps, loss.item())
    model.eval()
    return losses


def _classifier(device, backend) -> bool:
    from transformers import BertConfig, BertForSequenceClassification

    import prefix_kernels as pk
    from prefix_kernels.integrations.hf.reference import compare_with_reference

    print(f"\n1. P-Tuning v2 classifier: BERT, {BERT['num_hidden_layers']} layers, hidden {BERT['hidden_size']}, "
          f"{BERT['num_attention_heads']} heads; P = {PREFIX_LEN} through a 128-wide MLP; classifier head trained")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**BERT)).to(device).eval()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    handle = pk.apply_prefix_tuning(model, pk.PrefixConfig(num_virtual_tokens=PREFIX_LEN, prefix_projection=True,
                                                           encoder_hidden_size=128, backend=backend))
    trainable = sum(p.numel() for p in handle.trainable_parameters())
    total = sum(p.numel() for p in model.parameters())
    print(f"    trainable: {trainable:,} of {total:,} parameters (prefix encoder + classifier head)")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, BERT["vocab_size"], (4, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = mask[3, 9:] = 0  # right padding
    ok, text = _verdict(compare_with_reference(model, reference, handle, ids.to(device), mask.to(device)))
    print(f"    parity with the eager reference, logits and all 5 prefix gradients: {text}")
    texts = torch.randint(3, BERT["vocab_size"], (32, 32), generator=g).to(device)
    labels = torch.randint(0, BERT["num_labels"], (32,), generator=g).to(device)

    def batches(step):  # two batches of 16, in turn
        rows = slice(16 * (step % 2), 16 * (step % 2) + 16)
        return {"input_ids": texts[rows], "labels": labels[rows]}

    losses = _train(model, handle, batches, 30, 1e-2, "training: fit 32 labelled random texts")
    print(f"    loss {sum(losses[:5]) / 5:.3f} -> {sum(losses[-5:]) / 5:.3f} (mean of the first / last 5 steps)")
    return ok, model, reference, handle


def _decoder(device, backend) -> bool:
    from transformers import LlamaConfig, LlamaForCausalLM

    import prefix_kernels as pk
    from prefix_kernels.integrations.hf.reference import compare_with_reference, eager_greedy

    print(f"\n2. Prefix-tuned decoder: Llama-style, {LLAMA['num_hidden_layers']} layers, hidden "
          f"{LLAMA['hidden_size']}, GQA {LLAMA['num_attention_heads']}/{LLAMA['num_key_value_heads']} heads; "
          f"P = {PREFIX_LEN} learned directly")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).to(device).eval()
    model.generation_config.eos_token_id = None
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    handle = pk.apply_prefix_tuning(model, pk.PrefixConfig(num_virtual_tokens=PREFIX_LEN, backend=backend))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, LLAMA["vocab_size"], (4, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = mask[3, :11] = 0  # left padding
    ids, mask = ids.masked_fill(mask == 0, 0).to(device), mask.to(device)
    ok, text = _verdict(compare_with_reference(model, reference, handle, ids, mask))
    print(f"    parity with the eager reference, logits and the prefix gradient: {text}")

    def batches(_step):
        x = torch.randint(3, LLAMA["vocab_size"], (8, 32), generator=g).to(device)
        return {"input_ids": x, "labels": torch.full_like(x, ANSWER)}

    losses = _train(model, handle, batches, 20, 0.1, f"training: the prefix alone learns to answer {ANSWER}")
    print(f"    loss {sum(losses[:5]) / 5:.3f} -> {sum(losses[-5:]) / 5:.3f} (mean of the first / last 5 steps)")
    with torch.no_grad():
        expected = eager_greedy(reference, handle.prefix(), ids, mask, 8)
    for cache in ("dynamic", "static"):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             cache_implementation=cache, pad_token_id=0)
        same = torch.equal(out, expected)
        ok &= same
        print(f"    greedy generate(), left-padded batch, {cache} cache: "
              f"{'same tokens as the eager reference' if same else 'DIFFERENT tokens from the eager reference'}")
    print(f"    row 3 generated: {out[3, ids.shape[1]:].tolist()}")
    return ok, model, reference, handle


# Each comparison: at least 5 rounds of both paths in turn, until their ratio's p20-p80 range is within 10% of its
# median or this many seconds have passed.
TIME_CAP_S = 6.0
EAGER = "eager PEFT-style"


def _print_pair(name, cmp, paths, memory):
    """Two rows (ours, the eager path), then the ratio with its spread and a warning when it cannot be read."""
    for path, label in paths:
        mib = memory.get(path)
        print(f"    {name:34} {label:40} {cmp.timing(path).text():>22} {'' if mib is None else f'{mib:.1f}':>17}")
    ratio = cmp.ratio(paths[0][0], paths[1][0])
    print(f"      prefix_kernels / eager: {ratio.text()} the time ({cmp.stopped})")
    if ratio.warning():
        print(f"      {ratio.warning()}")
    return ratio


def _train_step(device, name, model, reference, handle, batch, length, padding):
    """Time a training step (forward + backward) of both paths in turn, and their memory."""
    from ._timing import compare, held_mib
    from .integrations.hf.reference import eager_forward, peft_style_prefix

    ids = torch.randint(3, model.config.vocab_size, (batch, length), device=device)
    mask = torch.ones_like(ids)  # half the rows padded by a quarter
    mask[batch // 2:, slice(-(length // 4), None) if padding == "right" else slice(0, length // 4)] = 0
    encoder = handle.prefix_encoder

    def ours():
        encoder.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()

    def peft_style():
        encoder.zero_grad(set_to_none=True)
        prefix = peft_style_prefix(encoder, batch)
        eager_forward(reference, prefix, ids, mask).logits.float().sum().backward()

    model.train()
    reference.train()
    cmp = compare({"ours": ours, "eager": peft_style}, device, time_cap_s=TIME_CAP_S, memory=device.type == "cuda")
    memory = cmp.peaks if device.type == "cuda" else {"ours": held_mib(ours), "eager": held_mib(peft_style)}
    ratio = _print_pair(name, cmp, (("ours", "prefix_kernels"), ("eager", f"{EAGER} (prefix per row, cache)")),
                        memory)
    model.eval()
    reference.eval()
    return ratio, memory["ours"] / memory["eager"]


def _speed(device, bert, llama) -> list[str]:
    """Time both workloads beside the eager PEFT-style path; returns the summary lines."""
    from ._timing import TARGET_SPREAD, compare
    from .integrations.hf.reference import eager_greedy

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"\n3. Speed and memory on {where}, float32. Both paths run in turn, round after round, until the ratio "
          f"of their times settles (p20-p80 within {TARGET_SPREAD:.0%} of its median) or {TIME_CAP_S:g} s pass; "
          "ms: median (p20-p80)")
    memory = "peak MiB" if device.type == "cuda" else "held for bwd MiB"
    print(f"    {'workload':34} {'path':40} {'ms':>22} {memory:>17}")
    summary = []
    for label, parts, padding in (("BERT classifier, train step", bert, "right"),
                                  ("decoder, train step", llama, "left")):
        ratio, mem = _train_step(device, label, *parts, 8, 128, padding)
        summary.append(f"{label}: {ratio.text()} the time, {mem:.2f}x the memory"
                       + ("" if ratio.readable else " (too noisy to read: see the warning above)"))
    model, reference, handle = llama
    ids = torch.randint(3, model.config.vocab_size, (8, 64), device=device)
    mask = torch.ones_like(ids)
    new = 32
    prefix = handle.prefix().detach()
    with torch.no_grad():
        cmp = compare({"ours": lambda: eager_greedy(model, None, ids, mask, new),
                       "eager": lambda: eager_greedy(reference, prefix, ids, mask, new)}, device,
                      time_cap_s=TIME_CAP_S)
    label = f"decoder, greedy 8 x (64 + {new} new)"
    ratio = _print_pair(label, cmp, (("ours", "prefix_kernels"), ("eager", f"{EAGER} (prefix in the cache)")), {})
    rates = {p: 8 * new / cmp.timing(p).median_ms * 1e3 for p in ("ours", "eager")}
    print(f"      tokens/s: prefix_kernels {rates['ours']:.0f}, eager {rates['eager']:.0f}")
    summary.append(f"{label}: {ratio.text()} the time ({1 / ratio.median:.2f}x the tokens/s)"
                   + ("" if ratio.readable else " (too noisy to read: see the warning above)"))
    if device.type == "cpu":
        print("    (decoding on the CPU: the torch backend concatenates the prefix with the whole cache at every "
              "step; the GPU kernels read both in place)")
    return summary


def run(device: torch.device, summary: list[str] | None = None) -> bool:
    """The model-level demo; returns whether every parity check passed. Appends the timing summary (prefix_kernels
    against the eager PEFT-style path, each ratio with its spread) to ``summary``."""
    try:
        import transformers
    except ImportError as e:
        print(f"\n(the model demo needs transformers: {e}; `make demo` installs it)")
        return True
    backend = "auto" if device.type == "cuda" else "torch"  # the Triton interpreter is far too slow for models
    print(f"\nprefix tuning of Hugging Face models (transformers {transformers.__version__}; attention backend "
          f"{backend!r}{'' if device.type == 'cuda' else ': on the CPU the torch backend serves'})")
    start = time.perf_counter()
    ok_bert, *bert = _classifier(device, backend)
    ok_llama, *llama = _decoder(device, backend)
    lines = _speed(device, bert, llama)
    if summary is not None:
        summary.extend(lines)
    print(f"    (model demo: {time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return ok_bert and ok_llama

"""End to end: a training step and generate() of prefix-tuned Hugging Face models, prefix_kernels against PEFT.

Workloads (random weights from configs; nothing is downloaded):

- (a) P-Tuning v2 on a BERT-base-shaped classifier (12 layers, hidden 768, 12 heads; the shape of
  hfl/chinese-roberta-wwm-ext on ChnSentiCorp: batch 64, max_length 86, right-padded rows), P in {16, 64, 128},
  prefix through PEFT's MLP (encoder hidden 512), classifier head trained, dropout 0.1 as configured;
- (b) a Llama-3.2-1B-shaped decoder (16 layers, hidden 2048, GQA 32/8 heads of 64), batch 8, seq 512, P = 64;
- (c) a Bloom-560m-shaped decoder (24 layers, hidden 1024, 16 heads, ALiBi), batch 8, seq 512, P = 64;
- (d) generate() of 128 greedy new tokens after a 512-token prompt, batch 8, on (b) and (c): with our prefix,
  without any prefix (the same model, ``handle.disabled()``), and with PEFT's prefix;
- (e) summarization on a BART-base-shaped (6 + 6 layers, d_model 768, 12 heads) and a T5-base-shaped (12 + 12
  layers, d_model 768, 12 heads of 64, relative bias) encoder-decoder: a training step on batch 8, 512 source and
  128 target tokens (right-padded rows, labels -100 past each row's end), P = 64, and generate() of 64 greedy
  tokens after the 512-token source. Ours in ``prefix_sites="peft"`` mode (decoder self-attention only) against
  PEFT's SEQ_2_SEQ_LM prefix tuning with the same weights; ours in "paper" mode (encoder, decoder and
  cross-attention prefixes) reported alongside, row "prefix_kernels paper", with its ratios to PEFT too (it does
  more: three prefixed attentions per decoder layer and one per encoder layer).
- (f) with --quick, a held-out-style Llama step (4 layers, hidden 256, GQA 8/2, batch 8, seq 128, P = 32 through
  the MLP) also against the same model without a prefix (its step: forward and a backward through every layer to
  the input embeddings, no optimizer).

A training step is forward, backward and AdamW on the trainable parameters (the prefix, and the head PEFT trains).
The baseline is PEFT itself wherever PEFT's path runs with the installed transformers; where it raises (PEFT 0.21.2
with transformers 5.24 refuses BERT classification: "Model does not support past key values") the baseline is the
same thing done by hand, as PEFT would: the prefix computed per batch row, put in a DynamicCache, ones prepended to
the mask, the model's own attention ("eager-cache"); the row says why. The paths of a workload are timed together,
one call of each per round in rotating order (a loaded machine slows them alike), until the ratios settle or the
rounds run out. Reported per path: median ms with 20/80%
quantiles, tokens/s (training: B x L positions, padding included; generation: B x new tokens), memory and, on our
rows, the ratios to the baseline (tokens/s and memory) and, for generation, to the model without a prefix.

Memory: on a GPU the peak CUDA memory allocated during one step above what was resident before it (weights,
optimizer state); on a CPU, which keeps no allocator statistics, the tensors autograd holds for the backward of one
training step (parameters excluded), and nothing for generation.

Precision: on a GPU training runs under bf16 autocast with fp32 weights (what transformers' Trainer does with
bf16=True) and generation in bf16 weights; on a CPU everything is fp32 and our attention runs its torch backend.

    python benchmarks/bench_e2e.py            # the full grid, on a GPU (not yet run on one)
    python benchmarks/bench_e2e.py --quick    # tiny models of the same families: the CPU run (about 25 s here)
    python benchmarks/bench_e2e.py --only "BERT-base train P=64" generate --reps 5 --deadline-s 200
    python benchmarks/bench_e2e.py --quick --cpu-time  # CPU time of this process: steadier on a shared machine

Writes ``e2e_<device>.json`` (this run) and appends to ``e2e_<device>.csv`` under ``--out`` as each workload is
measured (a run cut by a time limit keeps what it measured); ``e2e_<device>.png`` plots our ratios to the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # common.py, and this checkout's prefix_kernels before an installed one
from common import (  # noqa: E402
    DEADLINE_HELP,
    RESULTS,
    SHAPES_HELP,
    THREADS_HELP,
    Deadline,
    Progress,
    RowSink,
    bar_plot,
    matches,
    run_metadata,
    set_cpu_threads,
    shape_filter,
    slug,
)

import prefix_kernels as pk  # noqa: E402
from prefix_kernels._timing import TARGET_SPREAD, compare, held_mib, wall_timer  # noqa: E402
from prefix_kernels.integrations.hf.reference import eager_forward, eager_greedy, peft_style_prefix  # noqa: E402

# The shapes of the models users run (configs only: the weights are random).
BERT_BASE = {"vocab_size": 21128, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 512, "num_labels": 2}  # chinese-roberta-wwm-ext
LLAMA_1B = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rope_theta": 500000.0,
            "max_position_embeddings": 4096, "tie_word_embeddings": True}  # Llama-3.2-1B
BLOOM_560M = {"vocab_size": 250880, "hidden_size": 1024, "n_layer": 24, "n_head": 16}  # bigscience/bloom-560m
# The same families, tiny, for a CPU.
# The held-out-style Llama of the CPU grid (issue 16).
LLAMA_HELD_OUT = {"vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                  "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 512}
TINY = {"bert": {"vocab_size": 1000, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "intermediate_size": 256, "max_position_embeddings": 256, "num_labels": 2},
        "llama": {"vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512},
        "bloom": {"vocab_size": 1000, "hidden_size": 128, "n_layer": 2, "n_head": 4}}
CLASSES = {"bert": ("BertConfig", "BertForSequenceClassification", "SEQ_CLS"),
           "llama": ("LlamaConfig", "LlamaForCausalLM", "CAUSAL_LM"),
           "bloom": ("BloomConfig", "BloomForCausalLM", "CAUSAL_LM")}
# Encoder-decoder summarization (e): configs only, as above.
BART_BASE = {"vocab_size": 50265, "d_model": 768, "encoder_layers": 6, "decoder_layers": 6,
             "encoder_attention_heads": 12, "decoder_attention_heads": 12, "encoder_ffn_dim": 3072,
             "decoder_ffn_dim": 3072, "max_position_embeddings": 1024}  # facebook/bart-base
T5_BASE = {"vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_decoder_layers": 12,
           "num_heads": 12, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}  # google-t5/t5-base
TINY_SEQ2SEQ = {"bart": {"vocab_size": 1000, "d_model": 128, "encoder_layers": 2, "decoder_layers": 2,
                         "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 256,
                         "decoder_ffn_dim": 256, "max_position_embeddings": 256},
                "t5": {"vocab_size": 1000, "d_model": 128, "d_kv": 32, "d_ff": 256, "num_layers": 2,
                       "num_decoder_layers": 2, "num_heads": 4, "pad_token_id": 0, "eos_token_id": 1,
                       "decoder_start_token_id": 0}}
CLASSES.update({"bart": ("BartConfig", "BartForConditionalGeneration", "SEQ_2_SEQ_LM"),
                "t5": ("T5Config", "T5ForConditionalGeneration", "SEQ_2_SEQ_LM")})
TARGETS = ("targets on a GPU: P-Tuning v2 step >= 1.3x PEFT tokens/s at <= 0.8x its memory; "
           "a prefix costs <= 5% in decoding")


@dataclass(frozen=True)
class Workload:
    name: str
    family: str  # bert | llama | bloom
    task: str  # train | generate
    config: dict
    batch: int
    seq: int  # tokens per row (the prompt, for generate)
    prefix: int
    projection: int = 0  # the hidden size of the P-Tuning v2 MLP; 0 = a prefix table (prefix tuning of LMs)
    new_tokens: int = 0
    no_prefix: bool = False  # training: also time the same model without a prefix

    def tokens(self) -> int:
        return self.batch * (self.new_tokens if self.task == "generate" else self.seq)

    def shape(self) -> dict:
        c = self.config
        layers = c.get("num_hidden_layers", c.get("n_layer"))
        heads = c.get("num_attention_heads", c.get("n_head"))
        return {"layers": layers, "hidden": c["hidden_size"], "heads": heads,
                "kv_heads": c.get("num_key_value_heads", heads)}


def grid(size: str) -> list[Workload]:
    if size == "full":
        models = {"bert": BERT_BASE, "llama": LLAMA_1B, "bloom": BLOOM_560M}
        cls_batch, cls_len, cls_prefixes, mlp = 64, 86, (16, 64, 128), 512
        dec_batch, dec_len, dec_prefix, new = 8, 512, 64, 128
        names = {"bert": "BERT-base", "llama": "Llama-3.2-1B", "bloom": "Bloom-560m"}
    else:
        models = TINY
        cls_batch, cls_len, cls_prefixes, mlp = 16, 64, (16, 64, 128), 64
        dec_batch, dec_len, dec_prefix, new = 4, 64, 16, 16
        names = {"bert": "tiny BERT", "llama": "tiny Llama", "bloom": "tiny Bloom"}
    work = [Workload(f"P-Tuning v2 {names['bert']} train P={p}", "bert", "train", models["bert"], cls_batch, cls_len,
                     p, projection=mlp) for p in cls_prefixes]
    for family in ("llama", "bloom"):
        work.append(Workload(f"prefix {names[family]} train P={dec_prefix}", family, "train", models[family],
                             dec_batch, dec_len, dec_prefix))
    for family in ("llama", "bloom"):
        work.append(Workload(f"prefix {names[family]} generate {new} P={dec_prefix}", family, "generate",
                             models[family], dec_batch, dec_len, dec_prefix, new_tokens=new))
    if size != "full":
        work.append(Workload("prefix Llama 4x256 GQA 8/2 train P=32 MLP", "llama", "train", LLAMA_HELD_OUT, 8, 128,
                             32, projection=64, no_prefix=True))
    return work + seq2seq_grid(size)


def build(w: Workload, device: torch.device, dtype: torch.dtype):
    import transformers

    config_cls, model_cls, _ = CLASSES[w.family]
    config = getattr(transformers, config_cls)(**w.config)
    torch.manual_seed(0)
    with warnings.catch_warnings(), torch.device(device):
        warnings.simplefilter("ignore")
        model = getattr(transformers, model_cls)(config)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None  # greedy decoding runs for exactly new_tokens
    return model.to(dtype=dtype)


def inputs(w: Workload, device: torch.device) -> dict:
    """Random ids; classifier rows right-padded to lengths drawn in [L/3, L] (the first row full); labels."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, w.config["vocab_size"], (w.batch, w.seq), generator=g)
    mask = torch.ones_like(ids)
    if w.family == "bert":
        lengths = torch.randint(w.seq // 3, w.seq + 1, (w.batch,), generator=g)
        lengths[0] = w.seq
        mask = (torch.arange(w.seq) < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
        labels = torch.randint(0, w.config["num_labels"], (w.batch,), generator=g)
    else:
        labels = ids.clone()
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


@contextlib.contextmanager
def backends_used():
    """The names of the attention backends prefix_attention picks inside the block."""
    from prefix_kernels.ops.attention import backends

    seen: set[str] = set()
    original = backends.select

    def select(spec, requested="auto"):
        chosen = original(spec, requested)
        seen.add(chosen.name)
        return chosen

    backends.select = select
    try:
        yield seen
    finally:
        backends.select = original


def reason_of(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:160]


class Bench:
    """Runs the workloads of one size on one device and collects rows."""

    def __init__(self, device: torch.device, size: str, meta: dict):
        self.device, self.size, self.meta = device, size, meta
        self.gpu = device.type == "cuda"
        self.backend = "auto" if self.gpu else "torch"  # the Triton interpreter is not a speed measurement
        self.reps = (2, 10) if size == "full" else (1, 5)  # (warm-up, timed rounds)
        self.timer = wall_timer(device)
        self._base_key, self._base = None, None

    # -- models -------------------------------------------------------------------------------------------------
    def dtype(self, w: Workload) -> torch.dtype:
        return torch.bfloat16 if self.gpu and w.task == "generate" else torch.float32

    def autocast(self, w: Workload):
        if self.gpu and w.task == "train":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def precision(self, w: Workload) -> str:
        if not self.gpu:
            return "fp32"
        return "bf16 autocast, fp32 weights" if w.task == "train" else "bf16"

    def base(self, w: Workload):
        key = (w.family, tuple(sorted(w.config.items())), self.dtype(w))
        if key != self._base_key:
            self._base_key = self._base = None
            self.free()
            self._base, self._base_key = build(w, self.device, self.dtype(w)), key
        return self._base

    def free(self) -> None:
        gc.collect()
        if self.gpu:
            torch.cuda.empty_cache()

    def ours(self, w: Workload):
        model = copy.deepcopy(self.base(w))
        config = pk.PrefixConfig(num_virtual_tokens=w.prefix, prefix_projection=bool(w.projection),
                                 encoder_hidden_size=w.projection or None, backend=self.backend)
        return model, pk.apply_prefix_tuning(model, config)

    def peft(self, w: Workload, encoder_state: dict):
        import peft

        options = {"prefix_projection": True, "encoder_hidden_size": w.projection} if w.projection else {}
        config = peft.PrefixTuningConfig(task_type=CLASSES[w.family][2], num_virtual_tokens=w.prefix, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(copy.deepcopy(self.base(w)), config).to(self.device)
        model.prompt_encoder["default"].load_state_dict(encoder_state)
        return model

    def eager_cache(self, w: Workload, handle):
        """The model and a copy of our encoder, for the prefix put in the cache by hand, PEFT's way."""
        model = copy.deepcopy(self.base(w)).requires_grad_(False)
        encoder = copy.deepcopy(handle.prefix_encoder)
        for name in handle.modules_to_save:  # PEFT trains the classifier head beside the prefix
            model.get_submodule(name).requires_grad_(True)
        return model, encoder

    # -- measurement --------------------------------------------------------------------------------------------
    def timed(self, w: Workload, fns: dict, memory_fns: dict | None = None) -> dict[str, dict]:
        """Time the paths ``fns`` (name -> callable) together, in rotating rounds; memory: each one's CUDA peak on
        a GPU, else ``memory_fns[name]()`` (MiB held for the backward)."""
        warmup, reps = self.reps
        cmp = compare(fns, self.device, warmup=warmup, min_rounds=reps, max_rounds=6 * reps, time_cap_s=10.0,
                      target_spread=TARGET_SPREAD, rounds_at_cap=reps, memory=self.gpu, timer=self.timer)
        rows = {}
        for name in fns:
            t = cmp.timing(name)
            memory_fn = (memory_fns or {}).get(name)
            if self.gpu:
                memory, kind = t.peak_mib, "peak CUDA MiB above resident"
            elif memory_fn is not None:
                memory, kind = memory_fn(), "MiB held for backward (CPU)"
            else:
                memory, kind = None, "not measured (CPU)"
            rows[name] = {"median_ms": round(t.median_ms, 3), "p20_ms": round(t.p20_ms, 3),
                          "p80_ms": round(t.p80_ms, 3), "tokens_per_s": round(w.tokens() / t.median_ms * 1e3, 1),
                          "memory_mib": None if memory is None else round(memory, 2), "memory_kind": kind}
        return rows

    def train_step(self, w: Workload, loss_fn, params):
        optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

        def step():
            with self.autocast(w):
                loss = loss_fn()
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return step

    def held(self, w: Workload, model, loss_fn):
        weights = list(model.parameters())

        def held():
            with self.autocast(w):
                return held_mib(loss_fn, weights)

        return held

    # -- workloads ----------------------------------------------------------------------------------------------
    def train(self, w: Workload) -> list[dict]:
        batch = inputs(w, self.device)
        model, handle = self.ours(w)
        model.train()

        def ours_loss():
            return model(**batch).loss

        with backends_used() as seen, self.autocast(w):
            ours_loss()
        fns = {"prefix_kernels": self.train_step(w, ours_loss, handle.trainable_parameters())}
        held = {"prefix_kernels": self.held(w, model, ours_loss)}
        attention = {"prefix_kernels": "+".join(sorted(seen))}
        state = {k: v.detach().clone() for k, v in handle.prefix_encoder.state_dict().items()}
        try:
            twin = self.peft(w, state).train()
            params = [p for p in twin.parameters() if p.requires_grad]

            def loss_fn():
                return twin(**batch).loss

            with self.autocast(w):
                loss_fn()  # PEFT's path raises here where it is broken
            baseline, model_b = "peft", twin
            attention["peft"] = twin.base_model.config._attn_implementation
        except Exception as e:  # PEFT's path is broken for this model with this transformers: say why, use ours
            baseline = f"eager-cache (peft: {reason_of(e)})"
            twin = None
            self.free()
            reference, encoder = self.eager_cache(w, handle)
            reference.train()
            encoder.train()

            def loss_fn():
                return eager_forward(reference, peft_style_prefix(encoder, w.batch), **batch).loss

            params = list(encoder.parameters()) + [p for p in reference.parameters() if p.requires_grad]
            model_b = reference
            attention["eager-cache"] = reference.config._attn_implementation
        name = baseline.split(" ")[0]
        fns[name] = self.train_step(w, loss_fn, params)
        held[name] = self.held(w, model_b, loss_fn)
        if w.no_prefix:  # the same model without a prefix: a backward through every layer to the input embeddings
            plain = copy.deepcopy(self.base(w)).train().requires_grad_(False)
            embed = plain.get_input_embeddings()

            def plain_loss():
                embeds = embed(batch["input_ids"]).detach().requires_grad_()
                return plain(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

            fns["no prefix"] = self.train_step(w, plain_loss, [])
            held["no prefix"] = self.held(w, plain, plain_loss)
            attention["no prefix"] = plain.config._attn_implementation
        timed = self.timed(w, fns, held)
        handle.remove()
        return [{"path": p, "attention": attention[p], **timed[p], "baseline": baseline} for p in fns]

    def generate(self, w: Workload) -> list[dict]:
        batch = inputs(w, self.device)
        prompt = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        options = {"max_new_tokens": w.new_tokens, "do_sample": False, "pad_token_id": 0}
        model, handle = self.ours(w)
        model.eval()

        def check(out):
            if out.shape != (w.batch, w.seq + w.new_tokens):
                raise RuntimeError(f"generated {tuple(out.shape)}, expected {(w.batch, w.seq + w.new_tokens)}")

        def without_prefix():
            with handle.disabled():
                return model.generate(**prompt, **options)

        with torch.no_grad():
            with backends_used() as seen:
                check(model.generate(**prompt, **options))
            fns = {"prefix_kernels": lambda: model.generate(**prompt, **options), "no prefix": without_prefix}
            in_cache = not handle.state.generate_reasons  # (on a CPU: the prefix held in the KV cache)
            with handle.disabled():
                previous = model.config._attn_implementation
            ours = f"{previous}, prefix in the cache" if in_cache else ""
            attention = {"prefix_kernels": "+".join(sorted(seen | ({ours} if ours else set()))),
                         "no prefix": previous}
            prefix = handle.prefix().detach()
            state = {k: v.detach().clone() for k, v in handle.prefix_encoder.state_dict().items()}
            try:
                twin = self.peft(w, state).eval()
                check(twin.generate(**prompt, **options))
                baseline = "peft"
                fns["peft"] = lambda: twin.generate(**prompt, **options)
                attention["peft"] = twin.base_model.config._attn_implementation
            except Exception as e:  # as for training: record why, and time the prefix-in-cache loop instead
                twin = None
                self.free()
                baseline = f"eager-cache (peft: {reason_of(e)})"
                reference = copy.deepcopy(self.base(w)).eval()
                fns["eager-cache"] = lambda: eager_greedy(reference, prefix, prompt["input_ids"],
                                                          prompt["attention_mask"], w.new_tokens)
                attention["eager-cache"] = reference.config._attn_implementation
            timed = self.timed(w, fns)
        handle.remove()
        return [{"path": p, "attention": attention[p], **timed[p], "baseline": baseline} for p in fns]

    def run(self, w: Workload) -> list[dict]:
        common = {**self.meta, "workload": w.name, "family": w.family, "task": w.task, **w.shape(),
                  "batch": w.batch, "seq": w.seq, "prefix": w.prefix, "encoder_hidden": w.projection or "",
                  "new_tokens": w.new_tokens or "", "precision": self.precision(w)}
        try:
            if isinstance(w, Seq2SeqWorkload):
                rows = seq2seq_train(self, w) if w.task == "train" else seq2seq_generate(self, w)
            else:
                rows = self.train(w) if w.task == "train" else self.generate(w)
            rows = [{**r, "status": "ok"} for r in rows]
            self.free()  # the models of the workload are gone with its frame
        except Exception as e:  # a workload that cannot run here (say, out of memory) is a row, not a crash
            self.free()
            rows = [{"path": "prefix_kernels", "attention": "", "baseline": "", "status": f"error: {reason_of(e)}"}]
        return [with_ratios({**common, **r}, rows) for r in rows]


# -- encoder-decoder summarization (e) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Seq2SeqWorkload(Workload):
    """A summarization workload: ``seq`` source tokens per row, ``target`` target tokens (training)."""

    target: int = 0

    def tokens(self) -> int:
        return self.batch * (self.new_tokens if self.task == "generate" else self.seq + self.target)

    def shape(self) -> dict:
        c = self.config
        layers = (f"{c['encoder_layers']}+{c['decoder_layers']}" if "encoder_layers" in c
                  else f"{c['num_layers']}+{c['num_decoder_layers']}")
        heads = c.get("num_heads", c.get("encoder_attention_heads"))
        return {"layers": layers, "hidden": c["d_model"], "heads": heads, "kv_heads": heads}


def seq2seq_grid(size: str) -> list[Seq2SeqWorkload]:
    if size == "full":
        models, names = {"bart": BART_BASE, "t5": T5_BASE}, {"bart": "BART-base", "t5": "T5-base"}
        batch, source, target, prefix, new = 8, 512, 128, 64, 64
    else:
        models, names = TINY_SEQ2SEQ, {"bart": "tiny BART", "t5": "tiny T5"}
        batch, source, target, prefix, new = 4, 64, 16, 16, 16
    work = [Seq2SeqWorkload(f"prefix {names[f]} summarization train P={prefix}", f, "train", models[f], batch, source,
                            prefix, target=target) for f in ("bart", "t5")]
    work += [Seq2SeqWorkload(f"prefix {names[f]} summarization generate {new} P={prefix}", f, "generate", models[f],
                             batch, source, prefix, new_tokens=new) for f in ("bart", "t5")]
    return work


def seq2seq_inputs(w: Seq2SeqWorkload, device: torch.device) -> dict:
    """Random source ids right-padded to lengths in [L/2, L] (the first row full); labels of ``target`` tokens,
    -100 past lengths in [T/2, T] (the first row full). Pad id 1 (BART's; T5's is 0, and ids start at 3)."""
    g = torch.Generator().manual_seed(0)
    pad = 0 if w.family == "t5" else 1
    ids = torch.randint(3, w.config["vocab_size"], (w.batch, w.seq), generator=g)
    lengths = torch.randint(w.seq // 2, w.seq + 1, (w.batch,), generator=g)
    lengths[0] = w.seq
    mask = (torch.arange(w.seq) < lengths[:, None]).long()
    batch = {"input_ids": ids.masked_fill(mask == 0, pad).to(device), "attention_mask": mask.to(device)}
    if w.target:
        labels = torch.randint(3, w.config["vocab_size"], (w.batch, w.target), generator=g)
        ends = torch.randint(w.target // 2, w.target + 1, (w.batch,), generator=g)
        ends[0] = w.target
        batch["labels"] = labels.masked_fill(torch.arange(w.target) >= ends[:, None], -100).to(device)
    return batch


def _time_one(bench: Bench, w: Seq2SeqWorkload, fn) -> dict:
    """One path timed alone (the seq2seq rows build each model in turn, freeing the last: two base-sized
    encoder-decoders need not fit side by side)."""
    return bench.timed(w, {"path": fn})["path"]


def _train_one(bench: Bench, w: Seq2SeqWorkload, model, loss_fn, params) -> dict:
    return bench.timed(w, {"path": bench.train_step(w, loss_fn, params)},
                       {"path": bench.held(w, model, loss_fn)})["path"]


def seq2seq_ours(bench: Bench, w: Seq2SeqWorkload, sites: str):
    model = copy.deepcopy(bench.base(w))
    config = pk.PrefixConfig(num_virtual_tokens=w.prefix, prefix_sites=sites, backend=bench.backend)
    return model, pk.apply_prefix_tuning(model, config)


def _paper_ratios(row: dict, peft_row: dict | None) -> dict:
    """The paper-mode row's ratios to PEFT (with_ratios fills them on the "prefix_kernels" row only)."""
    if peft_row is None:
        return row
    row = {**row, "speed_vs_baseline": round(row["tokens_per_s"] / peft_row["tokens_per_s"], 3)}
    if row.get("memory_mib") and peft_row.get("memory_mib"):
        row["memory_vs_baseline"] = round(row["memory_mib"] / peft_row["memory_mib"], 3)
    return row


def seq2seq_train(bench: Bench, w: Seq2SeqWorkload) -> list[dict]:
    """Ours in "peft" mode, PEFT (the same prefix weights), ours in "paper" mode: one training step each."""
    batch = seq2seq_inputs(w, bench.device)
    rows = []
    model, handle = seq2seq_ours(bench, w, "peft")
    model.train()
    with backends_used() as seen:
        ours = _train_one(bench, w, model, lambda: model(**batch).loss, handle.trainable_parameters())
    rows.append({"path": "prefix_kernels", "attention": "+".join(sorted(seen)), **ours})
    state = {k: v.detach().clone() for k, v in handle.prefix_encoder.state_dict().items()}
    handle.remove()
    model = None
    bench.free()
    peft_row, baseline = None, "peft"
    try:
        twin = bench.peft(w, state).train()
        params = [p for p in twin.parameters() if p.requires_grad]
        peft_row = {"path": "peft", "attention": twin.base_model.config._attn_implementation,
                    **_train_one(bench, w, twin, lambda: twin(**batch).loss, params)}
        rows.append(peft_row)
        twin = None
    except Exception as e:  # PEFT's path broken with this transformers: no baseline, say why
        baseline = f"none (peft: {reason_of(e)})"
    bench.free()
    model, handle = seq2seq_ours(bench, w, "paper")
    model.train()
    with backends_used() as seen:
        paper = _train_one(bench, w, model, lambda: model(**batch).loss, handle.trainable_parameters())
    rows.append(_paper_ratios({"path": "prefix_kernels paper", "attention": "+".join(sorted(seen)), **paper},
                              peft_row))
    handle.remove()
    return [{**r, "baseline": baseline} for r in rows]


def seq2seq_generate(bench: Bench, w: Seq2SeqWorkload) -> list[dict]:
    """generate() of ``new_tokens`` greedy tokens: ours ("peft" mode), no prefix, PEFT, ours ("paper" mode)."""
    batch = seq2seq_inputs(w, bench.device)
    options = {"max_new_tokens": w.new_tokens, "do_sample": False}
    expected = (w.batch, w.new_tokens + 1)  # the decoder start token, then the new tokens

    def check(out):
        if tuple(out.shape) != expected:
            raise RuntimeError(f"generated {tuple(out.shape)}, expected {expected}")

    rows, peft_row, baseline = [], None, "peft"
    model, handle = seq2seq_ours(bench, w, "peft")
    model.eval()
    with torch.no_grad():
        with backends_used() as seen:
            check(model.generate(**batch, **options))
        ours = _time_one(bench, w, lambda: model.generate(**batch, **options))
        rows.append({"path": "prefix_kernels", "attention": "+".join(sorted(seen)), **ours})
        with handle.disabled():
            plain = _time_one(bench, w, lambda: model.generate(**batch, **options))
            plain_tokens = model.generate(**batch, **options)
        rows.append({"path": "no prefix", "attention": model.config._attn_implementation, **plain})
        ours_tokens = model.generate(**batch, **options)
        state = {k: v.detach().clone() for k, v in handle.prefix_encoder.state_dict().items()}
        handle.remove()
        model = None
        bench.free()
        try:
            twin = bench.peft(w, state).eval()
            their_tokens = twin.generate(**batch, **options)
            check(their_tokens)
            if torch.equal(their_tokens, plain_tokens) and not torch.equal(ours_tokens, plain_tokens):
                # PEFT 0.21.2 with transformers 5.24: the prompt goes under past_key_values, generate's own cache wins
                baseline = "peft (its generate() dropped the prefix: the unprefixed tokens, timed as it runs)"
            attention = twin.base_model.config._attn_implementation
            if baseline != "peft":
                attention += "; generate() dropped its prefix"
            peft_row = {"path": "peft", "attention": attention,
                        **_time_one(bench, w, lambda: twin.generate(**batch, **options))}
            rows.append(peft_row)
            twin = None
        except Exception as e:
            baseline = f"none (peft: {reason_of(e)})"
        bench.free()
        model, handle = seq2seq_ours(bench, w, "paper")
        model.eval()
        with backends_used() as seen:
            check(model.generate(**batch, **options))
        paper = _time_one(bench, w, lambda: model.generate(**batch, **options))
        row = _paper_ratios({"path": "prefix_kernels paper", "attention": "+".join(sorted(seen)), **paper}, peft_row)
        row["time_vs_no_prefix"] = round(paper["median_ms"] / plain["median_ms"], 3)
        rows.append(row)
        handle.remove()
    return [{**r, "baseline": baseline} for r in rows]


FIELDS = ("path", "attention", "baseline", "median_ms", "p20_ms", "p80_ms", "tokens_per_s", "memory_mib",
          "memory_kind", "speed_vs_baseline", "memory_vs_baseline", "time_vs_no_prefix", "status")


def cpu_time_timer(fn) -> float:
    """ms of this process's CPU time spent in ``fn()``."""
    t0 = time.process_time()
    fn()
    return (time.process_time() - t0) * 1e3


def with_ratios(row: dict, rows: list[dict]) -> dict:
    """Fill every field (CSV rows share one header); on our row, the ratios to the baseline and to no prefix."""
    row = {**row, **{f: row.get(f, "") for f in FIELDS}}
    row = {k: ("" if v is None else v) for k, v in row.items()}
    if row["path"] != "prefix_kernels" or row["status"] != "ok":
        return row
    others = {r["path"]: r for r in rows if r["path"] != "prefix_kernels"}
    base = next((r for p, r in others.items() if p != "no prefix"), None)
    if base:
        row["speed_vs_baseline"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
        if row["memory_mib"] != "" and base.get("memory_mib"):
            row["memory_vs_baseline"] = round(row["memory_mib"] / base["memory_mib"], 3)
    if "no prefix" in others:
        row["time_vs_no_prefix"] = round(row["median_ms"] / others["no prefix"]["median_ms"], 3)
    return row


def plot(path: str, rows: list[dict], meta: dict) -> None:
    groups = {}
    for r in rows:
        if r["path"] != "prefix_kernels" or r["status"] != "ok":
            continue
        values = {"tokens/s, ours / baseline": r["speed_vs_baseline"]}
        if r["memory_vs_baseline"] != "":
            values["memory, ours / baseline"] = r["memory_vs_baseline"]
        if r["time_vs_no_prefix"] != "":
            values["time, with our prefix / without"] = r["time_vs_no_prefix"]
        groups[r["workload"]] = {k: v for k, v in values.items() if v != ""}
    baselines = "/".join(sorted({r["baseline"].split(" ")[0] for r in rows if r["baseline"]}))
    title = f"prefix_kernels against {baselines}: {meta['device']}, commit {meta['commit']}\n({TARGETS})"
    bar_plot(path, groups, "ratio", title, {"parity": 1.0})


def markdown(rows: list[dict]) -> str:
    """The run as a Markdown table (the README's results section), PEFT's errors as notes below it."""
    lines = ["| workload | path | attention | ms (p20-p80) | tokens/s | memory MiB | ours / baseline: speed, memory "
             "| with / without prefix |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    notes: list[str] = []
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['workload']} | {r['path']} | | {r['status']} | | | | |")
            continue
        ratios = "" if r["speed_vs_baseline"] == "" else f"{r['speed_vs_baseline']:.2f}x"
        if r["memory_vs_baseline"] != "":
            ratios += f", {r['memory_vs_baseline']:.2f}x"
        overhead = "" if r["time_vs_no_prefix"] == "" else f"{r['time_vs_no_prefix']:.2f}x"
        memory = "-" if r["memory_mib"] == "" else r["memory_mib"]
        path = r["path"]
        if path == "eager-cache":
            note = r["baseline"].split("(peft: ", 1)[1][:-1]
            if note not in notes:
                notes.append(note)
            path += "*" * (notes.index(note) + 1)
        lines.append(f"| {r['workload']} | {path} | {r['attention']} | {r['median_ms']:.1f} ({r['p20_ms']:.1f}-"
                     f"{r['p80_ms']:.1f}) | {r['tokens_per_s']:,.0f} | {memory} | {ratios} | {overhead} |")
    lines += [f"\n{'*' * (i + 1)} PEFT's own path raised `{note}`; the baseline is the prefix put in the cache by "
              "hand, PEFT's way" for i, note in enumerate(notes)]
    return "\n".join(lines)


ALIASES = {"B": "batch", "L": "seq", "P": "prefix", **{f: f for f in ("batch", "seq", "prefix", "family", "task")}}


def select(workloads: list[Workload], only: list[str] | None, filters: dict) -> list[Workload]:
    """The workloads matching ``filters`` and, with ``only``, a substring of their name, in the order of the first
    substring each matches (so the workloads that matter most run first)."""
    kept = [w for w in workloads if matches(filters, {f: getattr(w, f) for f in ("batch", "seq", "prefix", "family",
                                                                                  "task")})]
    if not only:
        return kept
    ranked = [(min((i for i, s in enumerate(only) if s in w.name), default=None), w) for w in kept]
    return [w for _, w in sorted(((r, w) for r, w in ranked if r is not None), key=lambda rw: rw[0])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models of the same families (the CPU run)")
    parser.add_argument("--out", default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--only", nargs="*", help="substrings selecting workloads by name, run in the order of the "
                                                   "first substring each matches")
    parser.add_argument("--shapes", nargs="*", help=SHAPES_HELP)
    parser.add_argument("--reps", type=int, help="timed calls per measurement (default 10, 3 with --quick)")
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    parser.add_argument("--cpu-time", action="store_true", help="on a CPU, time by this process's CPU time instead "
                        "of the wall clock (steadier when other jobs share the cores; with one intra-op thread)")
    parser.add_argument("--deadline-s", type=float, help=DEADLINE_HELP)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    deadline = Deadline(args.deadline_s)
    try:
        filters = shape_filter(args.shapes, ALIASES)
    except ValueError as e:
        parser.error(str(e))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = "quick" if args.quick or device.type != "cuda" else "full"
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT's use of `past_key_values` (transformers 5.24)
    if chosen == "quick" and not args.quick:
        print("no GPU: running the --quick grid (tiny models; the full grid is for a GPU)", file=sys.stderr)
    start = time.perf_counter()
    meta = {**run_metadata(device), "size": chosen, "cpu_threads": set_cpu_threads(device, args.threads, True)}
    workloads = select(grid(chosen), args.only, filters)
    bench = Bench(device, chosen, meta)
    if args.reps:
        bench.reps = (1, args.reps)
    if args.cpu_time and device.type == "cpu":
        bench.timer = cpu_time_timer
        meta["clock"] = "process CPU time"
    progress = Progress(len(workloads), "bench_e2e")
    stem = os.path.join(args.out, f"e2e_{slug(meta['device'])}")
    sink = RowSink(stem, meta, targets=TARGETS)
    for w in workloads:
        if deadline.passed():
            print(f"\n--deadline-s {args.deadline_s:g} reached before {w.name}", file=sys.stderr)
            break
        progress.step(w.name)
        sink.add(bench.run(w))
    rows = sink.rows
    meta["seconds"] = round(time.perf_counter() - start, 1)
    sink.write()
    if not args.no_plot and rows:
        plot(stem + ".png", rows, meta)
    print(f"{meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}, "
          f"commit {meta['commit']}; {chosen} grid in {meta['seconds']} s")
    print(markdown(rows))
    print(f"wrote {stem}.json, {stem}.csv{'' if args.no_plot else f', {stem}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

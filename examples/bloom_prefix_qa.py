"""Generative question answering with a prefix-tuned Bloom, transformers' Trainer and DataCollatorForSeq2Seq,
optionally with BitFit (the base model's biases trained beside the prefix): train, save, reload, generate.

The workflow of PEFT's Bloom prefix-tuning tutorial, with prefix_kernels in place of ``get_peft_model``:

    handle = pk.apply_prefix_tuning(model, pk.PrefixConfig(num_virtual_tokens=10))

Instruction data: "question: ... answer:" prompts whose labels are -100 (only the answer is learned), padded by
``DataCollatorForSeq2Seq`` (labels with -100). ``--bitfit`` also trains every bias of the base model; the
checkpoint then holds them too, and ``pk.from_pretrained`` puts them back.

By default it runs on a tiny random-weight Bloom and a generated word-level task (nothing downloaded; well under a
minute on a CPU). ``--model path/or/name`` runs it on a real checkpoint (with its tokenizer).

    python examples/bloom_prefix_qa.py --steps 60 --bitfit
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import warnings

import torch
import transformers

import prefix_kernels as pk

THINGS = ["sky", "grass", "snow", "sun", "night", "blood", "sea", "coal"]
COLOURS = ["blue", "green", "white", "yellow", "black", "red", "blue", "black"]
WORDS = ["question", ":", "what", "colour", "is", "the", "answer", "?"]


def word_tokenizer():
    """A word-level fast tokenizer over the task's words, built here (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", *WORDS, *THINGS, *sorted(set(COLOURS))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>", padding_side="left")


def prompt(thing: str) -> str:
    return f"question : what colour is the {thing} ? answer :"


def examples(tokenizer, n: int, seed: int):
    """Prompt + answer + eos, labels -100 on the prompt (variable lengths: the collator pads)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i = rng.randrange(len(THINGS))
        lead = " ".join(rng.choices(["the", "is", "what"], k=rng.randint(0, 3)))
        p = tokenizer((lead + " " + prompt(THINGS[i])).strip(), add_special_tokens=False)["input_ids"]
        a = tokenizer(COLOURS[i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": p + a, "attention_mask": [1] * (len(p) + len(a)), "labels": [-100] * len(p) + a})
    return rows


def tiny_base(directory: str, tokenizer):
    """A tiny random Bloom, saved as a base checkpoint (as a real one would be on disk)."""
    config = transformers.BloomConfig(vocab_size=len(tokenizer), hidden_size=64, n_layer=2, n_head=4,
                                      hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    transformers.BloomForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def generate(model, tokenizer, things):
    enc = tokenizer([prompt(t) for t in things], add_special_tokens=False, padding=True, return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:].cpu()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a real checkpoint (default: a tiny random Bloom)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-2, help="a tiny random model needs a large one")
    parser.add_argument("--num-virtual-tokens", type=int, default=10)
    parser.add_argument("--bitfit", action="store_true", help="also train the base model's biases (BitFit)")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--result", default=None, help="write a JSON summary here")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random Bloom and generated data (the default without --model; what CI runs)")
    args = parser.parse_args(argv)
    if args.tiny and args.model:
        parser.error("--tiny and --model exclude each other")
    out = args.output_dir or tempfile.mkdtemp(prefix="bloom_qa_")
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(min(4, torch.get_num_threads()))

    if args.model:
        base_path, tokenizer = args.model, transformers.AutoTokenizer.from_pretrained(args.model)
    else:
        tokenizer = word_tokenizer()
        base_path = tiny_base(os.path.join(out, "base"), tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_path)
    torch.manual_seed(0)
    handle = pk.apply_prefix_tuning(model, pk.PrefixConfig(num_virtual_tokens=args.num_virtual_tokens))
    if args.bitfit:
        for name, p in model.named_parameters():
            if name.endswith(".bias") and not name.startswith("prefix_encoder."):
                p.requires_grad_(True)
    model.print_trainable_parameters()

    collator = transformers.DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, padding=True)
    training_args = transformers.TrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32, learning_rate=args.lr, logging_steps=1, save_strategy="steps",
        save_steps=max(1, args.steps // 2), report_to=[], disable_tqdm=True, seed=0, remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available())
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=examples(tokenizer, 256, 1),
                                   eval_dataset=examples(tokenizer, 64, 2), data_collator=collator)
    initial = trainer.evaluate()
    trainer.train()
    metrics = trainer.evaluate()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    adapter = os.path.join(out, "adapter")
    trainer.save_model(adapter)  # the prefix and, with --bitfit, the biases: not the base model
    size = os.path.getsize(os.path.join(adapter, "model.safetensors"))
    model.eval()
    answers = generate(model, tokenizer, THINGS)
    correct = sum(tokenizer.decode(a[:1]).strip() == c for a, c in zip(answers, COLOURS, strict=True))
    probe = tokenizer([prompt(t) for t in THINGS], add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**{k: v.to(model.device) for k, v in probe.items()}).logits.cpu()
    handle.remove()

    reloaded = pk.from_pretrained(transformers.AutoModelForCausalLM, adapter).model.eval()
    again = generate(reloaded, tokenizer, THINGS)
    with torch.no_grad():
        logits_again = reloaded(**{k: v.to(reloaded.device) for k, v in probe.items()}).logits.cpu()
    result = {"first_loss": losses[0], "last_loss": losses[-1], "eval_loss_before": initial["eval_loss"],
              "eval_loss_after": metrics["eval_loss"], "correct_answers": f"{correct}/{len(THINGS)}",
              "adapter_bytes": size, "bitfit": args.bitfit,
              "reload_max_diff": float((logits - logits_again).abs().max()),
              "same_generations": bool(torch.equal(answers, again)),
              "answers": [tokenizer.decode(a[:1]).strip() for a in answers]}
    print(json.dumps(result))
    if args.result:
        with open(args.result, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()

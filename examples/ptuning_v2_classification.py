"""P-Tuning v2 on a RoBERTa-shaped sequence classifier with transformers' Trainer: train, evaluate, save, reload,
predict.

The workflow of PEFT's P-Tuning v2 tutorial (chinese-roberta-wwm-ext, batch 64, max_length 86, lr 3e-4), with
prefix_kernels in place of ``get_peft_model``: the one-line switch is

    handle = pk.apply_prefix_tuning(model, pk.PrefixConfig(num_virtual_tokens=20, prefix_projection=True))

(instead of ``model = get_peft_model(model, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20,
prefix_projection=True))``); the model stays a transformers model, and Trainer trains it as it is.

By default it runs on a tiny random-weight RoBERTa and a generated word-level task (nothing downloaded; well under
a minute on a CPU), with the tutorial's settings scaled down. ``--model path/or/name`` runs the same on a real
checkpoint (its tokenizer too); ``--steps``, ``--batch-size``, ``--max-length``, ``--lr`` set the rest.

    python examples/ptuning_v2_classification.py --steps 60
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

POSITIVE = ["good", "great", "fine", "happy", "bright", "warm"]
NEGATIVE = ["bad", "awful", "poor", "sad", "dark", "cold"]
FILLER = ["the", "a", "day", "film", "food", "was", "and", "very", "it", "so", "place", "we", "saw", "ate"]


def word_tokenizer():
    """A word-level fast tokenizer over the task's words, built here (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", *POSITIVE, *NEGATIVE, *FILLER]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def sentences(n: int, seed: int):
    """Labelled sentences: 1 with positive words in it, 0 with negative ones."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.choices(FILLER, k=rng.randint(3, 8)) + rng.choices(POSITIVE if label else NEGATIVE, k=2)
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def encode(tokenizer, data, max_length: int):
    texts, labels = zip(*data, strict=True)
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
            for i in range(len(labels))]


def tiny_base(directory: str, tokenizer):
    """A tiny random RoBERTa classifier, saved as a base checkpoint (as a real one would be on disk)."""
    config = transformers.RobertaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=130,
                                        pad_token_id=tokenizer.pad_token_id, num_labels=2)
    torch.manual_seed(0)
    transformers.RobertaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def accuracy(prediction):
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a real checkpoint (default: a tiny random RoBERTa)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16, help="the tutorial: 64")
    parser.add_argument("--max-length", type=int, default=24, help="the tutorial: 86")
    parser.add_argument("--lr", type=float, default=1e-2, help="the tutorial: 3e-4 (a tiny random model needs more)")
    parser.add_argument("--num-virtual-tokens", type=int, default=8)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--result", default=None, help="write a JSON summary here")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random RoBERTa and generated data (the default without --model; what CI runs)")
    args = parser.parse_args(argv)
    if args.tiny and args.model:
        parser.error("--tiny and --model exclude each other")
    out = args.output_dir or tempfile.mkdtemp(prefix="ptuning_v2_")
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(min(4, torch.get_num_threads()))

    if args.model:
        base_path, tokenizer = args.model, transformers.AutoTokenizer.from_pretrained(args.model)
    else:
        tokenizer = word_tokenizer()
        base_path = tiny_base(os.path.join(out, "base"), tokenizer)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    torch.manual_seed(0)
    handle = pk.apply_prefix_tuning(model, pk.PrefixConfig(num_virtual_tokens=args.num_virtual_tokens,
                                                           prefix_projection=True))
    model.print_trainable_parameters()

    train = encode(tokenizer, sentences(512, seed=1), args.max_length)
    test = encode(tokenizer, sentences(128, seed=2), args.max_length)
    training_args = transformers.TrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, learning_rate=args.lr, warmup_steps=0, logging_steps=1,
        eval_strategy="steps", eval_steps=max(1, args.steps // 2), save_strategy="steps",
        save_steps=max(1, args.steps // 2), load_best_model_at_end=True, metric_for_best_model="accuracy",
        report_to=[], disable_tqdm=True, seed=0, use_cpu=not torch.cuda.is_available())
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                                   compute_metrics=accuracy)
    initial = trainer.evaluate()
    trainer.train()
    metrics = trainer.evaluate()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    adapter = os.path.join(out, "adapter")
    trainer.save_model(adapter)  # the trained state only: the prefix with its MLP and the classifier
    size = os.path.getsize(os.path.join(adapter, "model.safetensors"))

    ids = torch.stack([row["input_ids"] for row in test[:32]])
    mask = torch.stack([row["attention_mask"] for row in test[:32]])
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.cpu()
    handle.remove()

    reloaded = pk.from_pretrained(transformers.AutoModelForSequenceClassification, adapter).model.eval()
    with torch.no_grad():
        after = reloaded(input_ids=ids.to(reloaded.device), attention_mask=mask.to(reloaded.device)).logits.cpu()
    result = {"first_loss": losses[0], "last_loss": losses[-1], "eval_loss_before": initial["eval_loss"],
              "eval_loss_after": metrics["eval_loss"], "accuracy": metrics["eval_accuracy"],
              "adapter_bytes": size, "reload_max_diff": float((before - after).abs().max()),
              "same_predictions": bool(torch.equal(before.argmax(-1), after.argmax(-1)))}
    print(json.dumps(result))
    if args.result:
        with open(args.result, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()

"""Topic classification of financial tweets (twitter-financial-news-topic, 20 labels) with GPT-2.

    python examples/classify_news.py --output-dir runs/classify
    python examples/classify_news.py --data-files train=topic_train.jsonl validation=topic_valid.jsonl

Rows of the report: no fine-tuning (a random score head: the chance baseline), LoRA r=128 with the score
head trained in full beside it (peft's modules_to_save), the same LoRA merged into the weights (must score
the same), and QLoRA (4-bit NF4 base). Accuracy and support-weighted precision, recall and F1.
"""

import argparse
import logging
import os
import time

from gpt2lite import Tokenizer
from gpt2lite.experiment import classification_task, load_base_model, run_method
from gpt2lite.peft import merge_lora
from gpt2lite.report import method_row, write_report
from gpt2lite.tasks import load_table
from gpt2lite.train import TrainConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--fallback-preset", default="tiny")
    p.add_argument("--dataset", default="zeroshot/twitter-financial-news-topic")
    p.add_argument("--data-files", nargs="+", metavar="SPLIT=PATH",
                   help="local files: train=topic_train.jsonl validation=topic_valid.jsonl")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--num-labels", type=int, default=20)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--alpha", type=float, default=128.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-train-samples", type=int, default=4000)
    p.add_argument("--max-eval-samples", type=int, default=500)
    p.add_argument("--no-qlora", action="store_true", help="skip the QLoRA row")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--output-dir", default="runs/classify_news")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gpt2lite.experiment").setLevel(logging.ERROR)
    started = time.perf_counter()
    if args.data_files:
        files = dict(pair.split("=", 1) for pair in args.data_files)
        train_table, validation_table = (load_table(data_files=files, split=s) for s in ("train", "validation"))
        data = f"local files {files}"
    else:
        train_table, validation_table = (load_table(args.dataset, split=s) for s in ("train", "validation"))
        data = f"{args.dataset} from the Hugging Face Hub"
    base = load_base_model(args.model, num_labels=args.num_labels, fallback_preset=args.fallback_preset,
                           seed=args.seed)
    notes = [f"model: {base.description}", f"data: {data}"]
    print("\n".join(notes), flush=True)
    task = classification_task(train_table, validation_table, Tokenizer(), args.num_labels, args.max_length,
                               args.text_column, args.label_column, max_train_samples=args.max_train_samples,
                               max_eval_samples=args.max_eval_samples, seed=args.seed)
    lora = {"name": "lora", "rank": args.rank, "alpha": args.alpha}  # the architecture's targets
    runs = [("no fine-tuning", None), ("lora r=%d" % args.rank, lora)]
    if not args.no_qlora:
        runs.append(("qlora r=%d" % args.rank, {**lora, "name": "qlora"}))
    rows = []
    for label, method in runs:
        config = TrainConfig(output_dir=os.path.join(args.output_dir, label.split()[0]), lr=args.lr,
                             max_steps=args.max_steps, epochs=None, batch_size=args.batch_size, warmup_steps=10,
                             eval_every=max(1, args.max_steps // 4), precision=args.precision, seed=args.seed)
        row, model, summary = run_method(label, method, base, task, config, sampler_seed=args.seed)
        rows.append(row)
        print(f"=== {label}: accuracy {row['accuracy']:.4f}, F1 {row['f1']:.4f}", flush=True)
        if label.startswith("lora"):  # the merged model must classify exactly as the adapter did
            merge_lora(model)
            merged = method_row(f"{label} merged", summary, model, task.evaluate(model), random_init=base.random_init)
            rows.append(merged)
            print(f"=== {label} merged: accuracy {merged['accuracy']:.4f}", flush=True)
    paths = write_report(rows, args.output_dir, "classification", title="Financial news topics",
                         random_init=base.random_init, notes=notes)
    print("\n" + open(paths["md"]).read())
    print(f"total wall time: {time.perf_counter() - started:.0f}s")
    return rows, paths


if __name__ == "__main__":
    main()

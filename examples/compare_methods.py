"""Compare fine-tuning methods on one summarization task: full, LoRA, QLoRA, prompt tuning, last-N layers.

    python examples/compare_methods.py --output-dir runs/compare

Writes report.md / report.csv / report.json (one row per method: size, trainable parameters, time,
memory, losses, BLEU, SacreBLEU, ROUGE, TER, chrF, METEOR) and train/val loss plots into --output-dir.
Offline it falls back, and says so, as examples/lora_summarize.py does.
"""

import argparse
import logging
import os
import time

from gpt2lite import Tokenizer
from gpt2lite.experiment import load_base_model, run_method, summarization_splits, summarization_task
from gpt2lite.report import write_report
from gpt2lite.train import TrainConfig

METHODS = {  # label -> (MethodConfig fields, learning rate)
    "full": ({"name": "full"}, 1e-4),
    "lora": ({"name": "lora", "rank": 8, "alpha": 16}, 1e-3),  # targets: the architecture's (GPT-2: c_attn)
    "qlora": ({"name": "qlora", "rank": 8, "alpha": 16}, 1e-3),
    "prompt": ({"name": "prompt", "n_tokens": 10}, 3e-2),
    "last_n": ({"name": "last_n", "n_layers": 1}, 1e-4),
    "prefix": ({"name": "prefix", "n_tokens": 10}, 1e-2),
    "ia3": ({"name": "ia3"}, 3e-3),
    "bitfit": ({"name": "bitfit"}, 1e-3),
    "none": (None, 0.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["full", "lora", "qlora", "prompt", "last_n"],
                   choices=sorted(METHODS))
    p.add_argument("--model", default="gpt2")
    p.add_argument("--fallback-preset", default="tiny")
    p.add_argument("--dataset", default="cnn_dailymail")
    p.add_argument("--dataset-config", default="3.0.0")
    p.add_argument("--data-files", nargs="+")
    p.add_argument("--source-column", default="article")
    p.add_argument("--target-column", default="highlights")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--time-budget", type=float, default=120.0, help="seconds of training per method at most")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="default 512 (128 with the offline fallback model)")
    p.add_argument("--max-train-samples", type=int, default=1000)
    p.add_argument("--max-eval-samples", type=int, default=40)
    p.add_argument("--generate-samples", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--output-dir", default="runs/compare")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gpt2lite.experiment").setLevel(logging.ERROR)  # its fallback notes are printed below
    started = time.perf_counter()
    base = load_base_model(args.model, fallback_preset=args.fallback_preset, seed=args.seed)
    splits = summarization_splits(None if args.data_files else args.dataset, args.dataset_config, args.data_files,
                                  args.source_column, args.target_column,
                                  fallback_examples=max(500, int(args.max_train_samples / 0.8)), seed=args.seed)
    notes = [f"model: {base.description}", f"data: {splits.description}"]
    print("\n".join(notes), flush=True)
    reserved = max([METHODS[m][0]["n_tokens"] for m in args.methods if m in ("prompt", "prefix")] or [0])
    max_length = args.max_length or (128 if base.random_init else 512)
    task = summarization_task(splits, Tokenizer(), max_length=min(max_length, base.model.config.n_positions - reserved),
                              max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
                              eval_generate_samples=args.generate_samples, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)
    rows = []
    for label in args.methods:
        method, lr = METHODS[label]
        config = TrainConfig(output_dir=os.path.join(args.output_dir, label), lr=lr, max_steps=args.max_steps,
                             epochs=None, batch_size=args.batch_size, warmup_steps=5,
                             eval_every=max(1, args.max_steps // 4), time_budget_s=args.time_budget or None,
                             precision=args.precision, seed=args.seed)
        print(f"=== {label} (lr {lr})", flush=True)
        row, _, _ = run_method(label, method, base, task, config, sampler_seed=args.seed)
        rows.append(row)
        print(f"    val loss {row['best_val_loss']:.4f}, ROUGE-L {row['rougeL']:.2f}, "
              f"{row['trainable_params']:,} trainable", flush=True)
    paths = write_report(rows, args.output_dir, "summarization", title="Fine-tuning methods compared",
                         random_init=base.random_init, notes=notes)
    print("\n" + open(paths["md"]).read())
    print("wrote " + ", ".join(sorted(paths.values())))
    print(f"total wall time: {time.perf_counter() - started:.0f}s")
    return rows, paths


if __name__ == "__main__":
    main()

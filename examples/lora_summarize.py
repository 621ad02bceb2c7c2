"""LoRA fine-tuning of GPT-2 for summarization (CNN/DailyMail by default), with a comparison report.

    python examples/lora_summarize.py --output-dir runs/demo

Online: GPT-2 (124M) and CNN/DailyMail 3.0.0 from the Hugging Face Hub. Offline, where neither can be
reached, it says so and falls back to a randomly initialised small model and a summarization corpus built
from the Python standard library's docstrings: the run, the efficiency numbers, the report and the plots
are real; the quality numbers are then marked as not meaningful.

It trains LoRA, plus the methods in --compare (default: no fine-tuning, full fine-tuning, prompt tuning),
and writes report.md / report.csv / report.json and loss plots into --output-dir.
With --search N it instead runs N Optuna trials (lr, rank, alpha, dropout, epochs), each in
output_dir/trial_<n>/, and with --retrain-best-model retrains the best configuration on the full training set.
"""

import argparse
import logging
import os
import sys
import time

from gpt2lite import Tokenizer
from gpt2lite.experiment import load_base_model, run_method, summarization_splits, summarization_task
from gpt2lite.report import write_report
from gpt2lite.train import TrainConfig

COMPARABLE = {  # --compare choices: method label -> MethodConfig fields (None: no fine-tuning)
    "none": None,
    "full": {"name": "full"},
    "prompt": {"name": "prompt", "n_tokens": 10},
    "last_n": {"name": "last_n", "n_layers": 1},
    "qlora": {"name": "qlora", "rank": 8, "alpha": 16},
    "bitfit": {"name": "bitfit"},
    "ia3": {"name": "ia3"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2", help="hub id or local directory of a GPT-2 checkpoint")
    p.add_argument("--fallback-preset", default="tiny",
                   help="preset built from random initialisation when --model cannot be loaded")
    p.add_argument("--no-fallback", action="store_true", help="fail instead of falling back offline")
    p.add_argument("--dataset", default="cnn_dailymail", help="hub dataset name")
    p.add_argument("--dataset-config", default="3.0.0")
    p.add_argument("--data-files", nargs="+", help="local .jsonl/.json/.csv files instead of --dataset "
                   "(10%% held out for validation and test)")
    p.add_argument("--source-column", default="article")
    p.add_argument("--target-column", default="highlights")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", nargs="+", help="LoRA target module patterns (default: the architecture's, "
                   "c_attn for GPT-2, q_proj v_proj for GPT-Neo)")
    p.add_argument("--compare", nargs="*", default=["none", "full", "prompt"], choices=sorted(COMPARABLE),
                   help="methods trained beside LoRA for the report ('none' = no fine-tuning)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=60, help="optimizer steps per method (0: no limit)")
    p.add_argument("--time-budget", type=float, default=120.0,
                   help="seconds of training per method at most (0: no limit); keeps the demo short")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, help="LoRA (and adapter) learning rate "
                   "(default 1e-3; 5e-3 for the offline random-init model, which trains from scratch)")
    p.add_argument("--full-lr", type=float, help="learning rate of full fine-tuning and last_n "
                   "(default 1e-4; 1e-3 for the offline random-init model)")
    p.add_argument("--prompt-lr", type=float, default=3e-2, help="learning rate of prompt tuning")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--data-fraction", type=float, default=1.0, help="fraction of the training set used")
    p.add_argument("--max-train-samples", type=int, default=2000)
    p.add_argument("--max-eval-samples", type=int, default=50, help="validation examples for the val loss")
    p.add_argument("--generate-samples", type=int, default=20, help="test examples summarized for ROUGE/BLEU")
    p.add_argument("--max-new-tokens", type=int, help="summary length limit (default 64; 24 offline)")
    p.add_argument("--max-length", type=int, help="tokens per training example, capped by the model's context "
                   "(default 512; 128 with the offline fallback model)")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--resume-from", help="checkpoint.pt (or its directory) of an interrupted LoRA run")
    p.add_argument("--output-dir", default="runs/lora_summarize")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--search", type=int, default=0, metavar="N", help="run N Optuna trials instead")
    p.add_argument("--retrain-best-model", action="store_true",
                   help="after --search, retrain the best configuration on the full training set")
    return p.parse_args(argv)


def lora_method(args, rank=None, alpha=None, dropout=None):
    return {"name": "lora", "rank": rank or args.rank, "alpha": alpha or args.alpha,
            "dropout": args.dropout if dropout is None else dropout, "targets": args.targets}


def build_task(args, splits, tokenizer, base, full_training_set=False):
    context = base.model.config.n_positions
    reserved = max([COMPARABLE[m]["n_tokens"] for m in args.compare if m == "prompt"] or [0])
    return summarization_task(
        splits, tokenizer, max_length=min(args.max_length, context - reserved),
        data_fraction=1.0 if full_training_set else args.data_fraction,
        max_train_samples=None if full_training_set else args.max_train_samples,
        max_eval_samples=args.max_eval_samples, eval_generate_samples=args.generate_samples,
        max_new_tokens=args.max_new_tokens, seed=args.seed)


def train_config(args, output_dir, lr, epochs=None, resume_from=None):
    return TrainConfig(output_dir=output_dir, lr=lr, epochs=epochs or args.epochs, max_steps=args.max_steps or None,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, warmup_steps=args.warmup_steps,
                       eval_every=args.eval_every, precision=args.precision, seed=args.seed,
                       time_budget_s=args.time_budget or None,
                       resume_from=resume_from, progress_bar=True)


def compare(args, base, task, notes):
    rows = []
    runs = [("lora", lora_method(args), args.lr, args.resume_from)]
    learning_rates = {"full": args.full_lr, "last_n": args.full_lr, "prompt": args.prompt_lr}
    runs += [(m, COMPARABLE[m], learning_rates.get(m, args.lr), None) for m in args.compare]
    for label, method, lr, resume in runs:
        started = time.perf_counter()
        print(f"\n=== {label}: {method or 'no fine-tuning (evaluation only)'}", flush=True)
        config = train_config(args, os.path.join(args.output_dir, label), lr, resume_from=resume)
        row, _, _ = run_method(label, method, base, task, config, sampler_seed=args.seed)
        rows.append(row)
        print(f"    {label}: best val loss {row.get('best_val_loss')}, ROUGE-L {row.get('rougeL'):.2f}, "
              f"trainable {row.get('trainable_params'):,} ({time.perf_counter() - started:.0f}s)", flush=True)
    paths = write_report(rows, args.output_dir, "summarization", title="Summarization: LoRA vs other methods",
                         random_init=base.random_init, notes=notes)
    return rows, paths


def search(args, base, splits, tokenizer, notes):
    from gpt2lite.search import run_search

    task = build_task(args, splits, tokenizer, base)

    def objective(params, trial_dir):
        config = train_config(args, trial_dir, params["lr"], epochs=params["epochs"])
        method = lora_method(args, params["rank"], params["alpha"], params["dropout"])
        row, _, _ = run_method("lora", method, base, task, config, sampler_seed=args.seed)
        print(f"    trial {os.path.basename(trial_dir)}: {params} -> val loss {row['best_val_loss']:.4f}", flush=True)
        return row["best_val_loss"]

    result = run_search(objective, args.search, args.output_dir, seed=args.seed)
    print(f"best trial {result['best_trial']}: {result['best_params']} (val loss {result['best_value']:.4f})")
    if not args.retrain_best_model:
        return
    best = result["best_params"]
    full_task = build_task(args, splits, tokenizer, base, full_training_set=True)
    config = train_config(args, os.path.join(args.output_dir, "best_model"), best["lr"], epochs=best["epochs"])
    row, _, _ = run_method("lora (best trial, full training set)",
                           lora_method(args, best["rank"], best["alpha"], best["dropout"]), base, full_task, config)
    paths = write_report([row], os.path.join(args.output_dir, "best_model"), "summarization",
                         title="Best search configuration", random_init=base.random_init, notes=notes)
    print(open(paths["md"]).read())


def fallback_size(args):
    """Docstring examples enough for the requested sizes (about 80 / 10 / 10 % train / validation / test)."""
    wanted = max((args.max_train_samples or 10**6) / 0.8, 12 * max(args.max_eval_samples, args.generate_samples))
    return None if wanted >= 2000 else int(wanted)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gpt2lite.experiment").setLevel(logging.ERROR)  # its fallback notes are printed below
    started = time.perf_counter()
    base = load_base_model(args.model, fallback_preset=args.fallback_preset, allow_random_init=not args.no_fallback,
                           seed=args.seed)
    splits = summarization_splits(None if args.data_files else args.dataset, args.dataset_config, args.data_files,
                                  args.source_column, args.target_column, allow_fallback=not args.no_fallback,
                                  fallback_examples=fallback_size(args), seed=args.seed)
    notes = [f"model: {base.description}", f"data: {splits.description}"]
    print("\n".join(notes), flush=True)
    if base.random_init:
        print("!!! No pretrained GPT-2 could be loaded: the quality columns of this run are NOT GPT-2 results "
              "and are marked 'not meaningful' in the report.", flush=True)
    if args.max_length is None:
        args.max_length = 128 if base.random_init else 512
    if args.max_new_tokens is None:
        args.max_new_tokens = 24 if base.random_init else 64
    if args.lr is None:
        args.lr = 5e-3 if base.random_init else 1e-3
    if args.full_lr is None:
        args.full_lr = 1e-3 if base.random_init else 1e-4
    print(f"learning rates: LoRA {args.lr:g}, full fine-tuning {args.full_lr:g}"
          f"{' (from-scratch rates for the random-init model)' if base.random_init else ''}", flush=True)
    tokenizer = Tokenizer()
    if args.search:
        search(args, base, splits, tokenizer, notes)
        return None
    task = build_task(args, splits, tokenizer, base)
    notes.append(f"examples: {len(task.train)} train, {len(task.validation)} validation; skipped "
                 f"{sum(task.train.skipped.values())} train examples that did not fit ({task.train.skipped})")
    rows, paths = compare(args, base, task, notes)
    print("\n" + open(paths["md"]).read())
    print("wrote " + ", ".join(sorted(paths.values())))
    print(f"total wall time: {time.perf_counter() - started:.0f}s")
    return rows, paths


if __name__ == "__main__":
    sys.exit(0 if main() is not False else 1)

"""Language modelling on WikiText-2 (raw): full fine-tuning vs LoRA, compared by sliding-window perplexity.

    python examples/lm_wikitext.py --output-dir runs/wikitext
    python examples/lm_wikitext.py --data-files train=wiki.train.raw validation=wiki.valid.raw

Perplexity = exp(mean token loss) over the validation stream, scored with windows of --block-size tokens
that advance by --stride (reported in the table; perplexities with different strides are not comparable).
"""

import argparse
import logging
import os
import time

from gpt2lite import Tokenizer
from gpt2lite.experiment import language_modeling_task, lm_texts, load_base_model, run_method
from gpt2lite.report import write_report
from gpt2lite.train import TrainConfig

METHODS = {
    "none": (None, 0.0),
    "full": ({"name": "full"}, 1e-4),
    "lora": ({"name": "lora", "rank": 8, "alpha": 16}, 1e-3),  # targets: the architecture's (GPT-2: c_attn)
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--fallback-preset", default="tiny")
    p.add_argument("--dataset", default="wikitext")
    p.add_argument("--dataset-config", default="wikitext-2-raw-v1")
    p.add_argument("--data-files", nargs="+", metavar="SPLIT=PATH",
                   help="local text files, e.g. train=wiki.train.raw validation=wiki.valid.raw")
    p.add_argument("--methods", nargs="+", default=["none", "full", "lora"], choices=sorted(METHODS))
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--stride", type=int, help="perplexity window stride (default block_size // 2)")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-train-blocks", type=int, default=2000)
    p.add_argument("--max-eval-blocks", type=int, default=40)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--output-dir", default="runs/lm_wikitext")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def data_files(pairs):
    if not pairs:
        return None
    if all("=" not in pair for pair in pairs):
        return pairs
    return dict(pair.split("=", 1) for pair in pairs)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gpt2lite.experiment").setLevel(logging.ERROR)
    started = time.perf_counter()
    base = load_base_model(args.model, fallback_preset=args.fallback_preset, seed=args.seed)
    files = data_files(args.data_files)
    splits = lm_texts(None if files else args.dataset, args.dataset_config, files, fallback_examples=600)
    notes = [f"model: {base.description}", f"data: {splits.description}"]
    print("\n".join(notes), flush=True)
    block_size = min(args.block_size, base.model.config.n_positions)
    task = language_modeling_task(splits, Tokenizer(), block_size, args.stride, args.max_train_blocks,
                                  args.max_eval_blocks, seed=args.seed)
    rows = []
    for label in args.methods:
        method, lr = METHODS[label]
        config = TrainConfig(output_dir=os.path.join(args.output_dir, label), lr=lr, max_steps=args.max_steps,
                             epochs=None, batch_size=args.batch_size, warmup_steps=5,
                             eval_every=max(1, args.max_steps // 4), precision=args.precision, seed=args.seed)
        row, _, _ = run_method(label, method, base, task, config, sampler_seed=args.seed)
        rows.append(row)
        print(f"=== {label}: perplexity {row['perplexity']:.2f} (window {row['perplexity_window']}, "
              f"stride {row['perplexity_stride']}, {row['perplexity_tokens']} tokens)", flush=True)
    paths = write_report(rows, args.output_dir, "language_modeling", title="Language modelling: full vs LoRA",
                         random_init=base.random_init, notes=notes)
    print("\n" + open(paths["md"]).read())
    print(f"total wall time: {time.perf_counter() - started:.0f}s")
    return rows, paths


if __name__ == "__main__":
    main()

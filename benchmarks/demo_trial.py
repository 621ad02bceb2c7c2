"""The offline demo's whole flow, timed: offline-pretrained base, no fine-tuning, full, LoRA, prompt, last-N.

    OMP_NUM_THREADS=2 python benchmarks/demo_trial.py --seed 0 --output-dir runs/demo_trial_s0

Runs what `make demo` runs offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set here) through
gpt2lite.experiment.runs, with the settings of NOTES / the demo recipe, and prints per phase the wall time and
the process's CPU time (the machine may be shared: CPU time / threads is what a quiet machine would take).
It chose those settings; rerun it to check them after a change.
"""

import argparse
import json
import logging
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from gpt2lite import Tokenizer  # noqa: E402
from gpt2lite.experiment.base_model import load_base_model  # noqa: E402
from gpt2lite.experiment.runs import run_method
from gpt2lite.tasks.builders import summarization_task
from gpt2lite.experiment.pretrain import PretrainConfig  # noqa: E402
from gpt2lite.experiment.report import write_report  # noqa: E402
from gpt2lite.tasks.splits import DataConfig, load_splits  # noqa: E402
from gpt2lite.training.config import TrainConfig  # noqa: E402

METHODS = {  # label -> (MethodConfig fields, learning rate, optimizer steps)
    "none": (None, None, None),
    "full": ({"name": "full"}, 1e-3, 100),
    "lora": ({"name": "lora", "rank": 8, "alpha": 16, "targets": ["c_attn", "c_proj", "c_fc"]}, 3e-3, 100),
    "prompt": ({"name": "prompt", "n_tokens": 10, "init_text": "Summarize the docstring in one line:"}, 3e-2, 100),
    "last_n": ({"name": "last_n", "n_layers": 2}, 2e-3, 100),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/demo_trial")
    p.add_argument("--pretrain-steps", type=int, default=PretrainConfig().steps)
    p.add_argument("--preset", default=PretrainConfig().preset)
    p.add_argument("--prompt-steps", type=int, help="prompt tuning's steps (default: METHODS)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-eval-samples", type=int, default=100)
    p.add_argument("--generate-samples", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    return p.parse_args(argv)


class Clock:
    """Wall and process CPU seconds per phase."""

    def __init__(self):
        self.phases = {}

    def __call__(self, name, fn, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        self.phases[name] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
        print(f"[{name}] wall {self.phases[name]['wall_s']}s, cpu {self.phases[name]['cpu_s']}s, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        return result


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    clock = Clock()
    settings = PretrainConfig(preset=args.preset, steps=args.pretrain_steps)
    base = clock("base", load_base_model, "gpt2", fallback_pretrain=settings)
    splits = clock("data", load_splits, DataConfig(dataset="cnn_dailymail", dataset_config="3.0.0", seed=args.seed),
                   allow_fallback=True)
    tokenizer = Tokenizer()
    context = base.model.config.n_positions
    reserved = max([METHODS[m][0]["n_tokens"] for m in args.methods if m == "prompt"] or [0])
    task = clock("task", summarization_task, splits, tokenizer, max_length=min(args.max_length, context - reserved),
                 max_eval_samples=args.max_eval_samples, eval_generate_samples=args.generate_samples,
                 max_new_tokens=args.max_new_tokens, seed=args.seed)
    rows = []
    for label in args.methods:
        method, lr, steps = METHODS[label]
        steps = args.prompt_steps if label == "prompt" and args.prompt_steps else steps
        config = TrainConfig(output_dir=os.path.join(args.output_dir, label), lr=lr or 1e-3, max_steps=steps or 1,
                             epochs=None, batch_size=args.batch_size, warmup_steps=10, schedule="cosine",
                             eval_every=args.eval_every, seed=args.seed, progress_bar=False)
        row, _, _ = clock(label, run_method, label, method, base, task, config, sampler_seed=args.seed)
        rows.append(row)
        print(f"    {label}: val loss {row['best_val_loss']:.4f}, ROUGE-L {row['rougeL']:.2f}, "
              f"trainable {row['trainable_params']:,}", flush=True)
    paths = write_report(rows, args.output_dir, "summarization", title="Offline demo trial",
                         random_init=base.random_init, notes=[f"model: {base.description}", f"data: {splits.description}"])
    print(open(paths["md"]).read())
    total = {k: round(sum(p[k] for p in clock.phases.values()), 1) for k in ("wall_s", "cpu_s")}
    summary = {"seed": args.seed, "phases": clock.phases, "total": total,
               "rows": {r["method"]: {"val_loss": r["best_val_loss"], "rougeL": r["rougeL"]} for r in rows}}
    print(json.dumps(summary, indent=1))
    with open(os.path.join(args.output_dir, "trial.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

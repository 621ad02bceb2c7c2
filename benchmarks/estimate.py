"""Predicted vs measured peak memory of `gpt2lite estimate` on the issue's grid (issue 22).

    python benchmarks/estimate.py --models gpt2 gpt2-medium        # measure what is missing, then report
    python benchmarks/estimate.py --report-only                    # predictions again, against the runs kept

Grid: models x {full, lora, qlora, prompt} x {fp32, bf16} x {activation checkpointing off, on} x SHAPES.
Each measured run is its own process (estimate_child.py: load a random-init checkpoint saved here, apply the
method, train() a few steps on random tokens), its peak resident set read from VmHWM. Measurements are kept
in benchmarks/results/estimate_runs.json as they finish (a run already there is not repeated); the
predictions are made again at every report, so the table always shows the estimator as it is now. Runs
predicted above BIGMEM_MB wait for /work/notes/bigmem.lock (one big process on the machine at a time).
Writes benchmarks/results/estimate.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS_FILE = RESULTS / "estimate_runs.json"
METHODS = ("full", "lora", "qlora", "prompt")
PRECISIONS = ("fp32", "bf16")
SHAPES = ((1, 256), (4, 256))  # (batch_size, seq_len)
STEPS = 2  # the second step holds AdamW's state from its start: the steady state
BIGMEM_MB = 4000
LOCK = "/work/notes/bigmem.lock"


def checkpoint(name: str) -> str:
    """A random-init checkpoint of the preset `name`, saved once under the cache."""
    from gpt2lite import GPT2, GPT2Config
    from gpt2lite.experiment.pretrain import cache_root

    directory = os.path.join(cache_root(), "estimate-benchmark", name)
    if not os.path.isfile(os.path.join(directory, "model.safetensors")):
        import torch

        torch.manual_seed(0)
        GPT2(GPT2Config.from_name(name)).save_pretrained(directory)
    return directory


def grid(models):
    for model, method, precision, checkpointing, (batch, seq_len) in itertools.product(
            models, METHODS, PRECISIONS, (False, True), SHAPES):
        yield {"model": model, "method": method, "precision": precision, "activation_checkpointing": checkpointing,
               "batch_size": batch, "seq_len": seq_len}


def key(run: dict) -> str:
    return "{model} {method} {precision} ckpt={activation_checkpointing} {batch_size}x{seq_len}".format(**run)


def predict(run: dict):
    from gpt2lite.tasks.splits import DataConfig
    from gpt2lite.estimation import estimate
    from gpt2lite.training.config import TrainConfig

    started = time.perf_counter()
    result = estimate(checkpoint(run["model"]), run["method"],
                      TrainConfig(batch_size=run["batch_size"], precision=run["precision"], device="cpu",
                                  activation_checkpointing=run["activation_checkpointing"]),
                      DataConfig(max_length=run["seq_len"]))
    return result, time.perf_counter() - started


def measure(run: dict, predicted_mb: float) -> dict:
    spec = {**{k: run[k] for k in ("batch_size", "seq_len", "precision", "activation_checkpointing")},
            "method": {"name": run["method"]}, "checkpoint": checkpoint(run["model"]), "steps": STEPS,
            "device": "cpu"}
    command = [sys.executable, str(HERE / "estimate_child.py"), json.dumps(spec)]
    if predicted_mb > BIGMEM_MB:
        command = ["flock", LOCK] + command
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    line = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not line:
        raise RuntimeError(f"{key(run)} failed: {done.stderr[-1500:]}")
    return json.loads(line[-1][len("RESULT "):])


def load_runs() -> dict:
    return json.loads(RUNS_FILE.read_text()) if RUNS_FILE.is_file() else {}


def report(models, runs: dict) -> list:
    rows = []
    for run in grid(models):
        if key(run) not in runs:
            continue
        result, seconds = predict(run)
        measured = runs[key(run)]["peak_rss_mb"]
        rows.append({**run, "predicted_mb": round(result.peak_memory_mb, 1), "measured_mb": round(measured, 1),
                     "error_pct": round(100 * (result.peak_memory_mb - measured) / measured, 1),
                     "estimate_s": round(seconds, 2)})
    return rows


def write(rows: list, skipped: list):
    errors = [abs(row["error_pct"]) for row in rows]
    summary = {"runs": len(rows), "within_10pct": sum(e <= 10 for e in errors),
               "mean_abs_error_pct": round(sum(errors) / max(len(errors), 1), 1),
               "max_abs_error_pct": max(errors, default=None), "not_measured": skipped}
    (RESULTS / "estimate.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    lines = ["# gpt2lite estimate: predicted vs measured peak RSS (CPU)", "",
             f"{summary['runs']} runs, {summary['within_10pct']} within ±10 %; mean |error| "
             f"{summary['mean_abs_error_pct']} %, max {summary['max_abs_error_pct']} %. Random-init checkpoints; "
             f"{STEPS} optimizer steps of random tokens per run, each in its own process (VmHWM).", "",
             "| model | method | precision | checkpointing | batch | predicted MB | measured MB | error |",
             "|---|---|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['method']} | {r['precision']} | {'on' if r['activation_checkpointing'] else 'off'} "
              f"| {r['batch_size']}x{r['seq_len']} | {r['predicted_mb']:.0f} | {r['measured_mb']:.0f} "
              f"| {r['error_pct']:+.1f} % |" for r in rows]
    if skipped:
        lines += ["", f"Not measured ({len(skipped)}): " + "; ".join(skipped)]
    (RESULTS / "estimate.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "gpt2-medium"])
    parser.add_argument("--only", nargs="*", default=None, help="measure only runs whose key contains all of these")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    runs = load_runs()
    for run in grid(args.models):
        if args.report_only or key(run) in runs or (args.only and not all(word in key(run) for word in args.only)):
            continue
        result, _ = predict(run)
        print(f"{key(run)}: predicted {result.peak_memory_mb:.0f} MB ...", flush=True)
        runs[key(run)] = measure(run, result.peak_memory_mb)
        print(f"    measured {runs[key(run)]['peak_rss_mb']:.0f} MB", flush=True)
        RUNS_FILE.write_text(json.dumps(runs, indent=1))
    all_models = sorted({k.split()[0] for k in runs} | set(args.models), key=lambda m: (len(m), m))
    skipped = [key(run) for run in grid(all_models) if key(run) not in runs]
    write(report(all_models, runs), skipped)
    print((RESULTS / "estimate.md").read_text())


if __name__ == "__main__":
    main()

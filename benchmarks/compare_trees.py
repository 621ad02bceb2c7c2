"""Did a change make gpt2lite slower against the reference? Two gpt2lite checkouts and transformers + peft on
the same work, interleaved: `python benchmarks/compare_trees.py --baseline /path/to/other/checkout`.

Each configuration (workload x mode, greedy generation) runs as three child processes per round: the
reference, this checkout's gpt2lite and the baseline checkout's gpt2lite, each through its own tree's
benchmarks/child.py with that tree first on PYTHONPATH. The order rotates every round, so slow spells of a
shared machine hit both trees alike. Each figure is the median over rounds of each round's median step (the
JSON keeps every round). The speed ratios (reference time / gpt2lite time, as in run.py) of both trees
come from the same run.

    git worktree add /tmp/before <commit>
    python benchmarks/compare_trees.py --baseline /tmp/before --rounds 2 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workloads  # noqa: E402
from run import log, machine_info, run_child  # noqa: E402

MODES = ("full", "lora", "prompt", "last2", "qlora")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="another gpt2lite checkout (a git worktree)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workloads", default="lm,summarization")
    parser.add_argument("--summarization-modes", default="full,lora,qlora",
                        help="modes for the summarization workload (the longer steps)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lm-seq-len", type=int, default=256)
    parser.add_argument("--summarization-seq-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--name", default="compare_trees", help="results/<name>.{json,md}")
    parser.add_argument("--no-reference", action="store_true",
                        help="time the two trees only (a busy machine: the ratio this / baseline is the result)")
    args = parser.parse_args(argv)
    for name in ("modes", "workloads", "summarization_modes"):
        setattr(args, name, [x for x in getattr(args, name).split(",") if x])
    return args


def measure(runners: dict, spec: dict, rounds: int, workdir: Path, key: str) -> dict:
    """{runner: {"step_s": median over rounds of `key`, "rounds": every round's `key`, "peak_rss_gb": the
    highest}}, the runners' order rotated every round."""
    names = list(runners)
    seen = {}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            tree, stack = runners[name]
            if stack == "reference" and spec.get("mode") == "qlora":
                continue  # no CPU QLoRA in the reference stack (bitsandbytes)
            result = run_child(dict(spec, stack=stack), workdir, tree=tree)
            log(f"{spec.get('workload', 'generation'):13s} {spec.get('mode', ''):6s} {name:9s} round {r}: "
                f"{result[key]:.3f} s")
            seen.setdefault(name, []).append(result)
    return {name: dict(step_s=statistics.median(r[key] for r in results), rounds=[r[key] for r in results],
                       peak_rss_gb=max(r["peak_rss_bytes"] for r in results) / 1e9)
            for name, results in seen.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    this, baseline = HERE.parent, Path(args.baseline).resolve()
    runners = {"reference": (this, "reference"), "this": (this, "gpt2lite"), "baseline": (baseline, "gpt2lite")}
    if args.no_reference:
        del runners["reference"]
    common = dict(preset="gpt2", threads=args.threads, device="cpu", precision="fp32", seed=0)
    results = dict(machine=machine_info("cpu"), settings=vars(args), baseline=str(baseline), rows=[])
    with tempfile.TemporaryDirectory(prefix="gpt2lite-trees-") as tmp:
        workdir = Path(tmp)
        for workload in args.workloads:
            seq_len = args.lm_seq_len if workload == "lm" else args.summarization_seq_len
            input_ids, labels = workloads.build_inputs(workload, args.warmup + args.steps, args.batch_size,
                                                       seq_len, 50257)
            inputs = workdir / f"{workload}.pt"
            torch.save({"input_ids": input_ids, "labels": labels}, inputs)
            modes = args.modes if workload == "lm" else [m for m in args.modes if m in args.summarization_modes]
            for mode in modes:
                spec = dict(common, task="train", mode=mode, workload=workload, inputs=str(inputs),
                            steps=args.steps, warmup=args.warmup, dropout=True)
                results["rows"].append(dict(workload=workload, mode=mode,
                                            **measure(runners, spec, args.rounds, workdir, "median_step_s")))
        prompts = workdir / "prompts.pt"
        torch.save({"prompts": workloads.generation_prompts(args.batch_size, 128, 50257)}, prompts)
        spec = dict(common, task="generate", inputs=str(prompts), new_tokens=args.new_tokens, repeats=3)
        results["rows"].append(dict(workload="generation", mode="greedy",
                                    **measure(runners, spec, args.rounds, workdir, "median_s")))
    markdown = render(results)
    print(markdown)
    out = HERE / "results"
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    (out / f"{args.name}.md").write_text(markdown + "\n")
    return results


def render(results: dict) -> str:
    m = results["machine"]
    lines = [f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), torch {m['torch']}, float32, "
             f"median of {results['settings']['rounds']} interleaved rounds, each the median of "
             f"{results['settings']['steps']} steps (generation: of 3 runs); peak RSS the highest. baseline = {results['baseline']}.", "",
             "| workload | mode | ref s | this s | baseline s | speed x this | speed x baseline | this / baseline time "
             "| ref RSS GB | this RSS GB | baseline RSS GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        ref, new, old = row.get("reference"), row["this"], row["baseline"]

        def cell(x, fmt="{:.2f}"):
            return "–" if x is None else fmt.format(x)

        lines.append(" | ".join([
            f"| {row['workload']}", row["mode"], cell(ref and ref["step_s"]), cell(new["step_s"]),
            cell(old["step_s"]), cell(ref and ref["step_s"] / new["step_s"]),
            cell(ref and ref["step_s"] / old["step_s"]), cell(new["step_s"] / old["step_s"], "{:.3f}"),
            cell(ref and ref["peak_rss_gb"]), cell(new["peak_rss_gb"]), cell(old["peak_rss_gb"])]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

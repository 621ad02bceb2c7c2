"""gpt2lite against transformers + peft on the same work, side by side: `python benchmarks/run.py`.

Every configuration (stack x mode x workload, generation, the matmul peak) runs in its own child process
so its peak RSS is its own; both stacks get the same input tensors, dropout, optimizer (fused AdamW) and
thread count. Prints the table and the target checks; writes RESULTS/latest.json and latest.md.

    python benchmarks/run.py                       # everything (about 25 minutes on 2 cores)
    python benchmarks/run.py --quick               # a smoke run: LoRA on LM, short generation (< 2 minutes)
    python benchmarks/run.py --modes full,lora --workloads lm --steps 5
    python benchmarks/run.py --modes full,lora --workloads lm --precision bf16   # both stacks under bf16 autocast
    python benchmarks/run.py --modes full,lora --workloads lm --compile   # both stacks through torch.compile
    python benchmarks/run.py --render results/latest.json   # the markdown again from a results JSON

The compiled reference and gpt2lite side by side with eager, the matmul floor of each step and decoding
against the memory-bandwidth bound are in benchmarks/speed.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
import workloads  # noqa: E402
from stacks import MODES  # noqa: E402

STACKS = ("reference", "gpt2lite")
WORKLOADS = ("lm", "summarization")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", help="gpt2lite config preset (default gpt2, 124M)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {MODES}")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="lm,summarization")
    parser.add_argument("--stacks", default=",".join(STACKS), help="reference,gpt2lite")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lm-seq-len", type=int, default=256)
    parser.add_argument("--summarization-seq-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=128, help="generation prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens per prompt")
    parser.add_argument("--generation-repeats", type=int, default=3)
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--matmul-size", type=int, default=None, help="default 2048 on the CPU, 8192 on CUDA")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "auto"),
                        help="both stacks train under this autocast (default: fp32 on the CPU, bf16 on CUDA; "
                             "auto: bf16 where the device has native bf16 arithmetic)")
    parser.add_argument("--no-dropout", action="store_true", help="dropout off (default: GPT-2's 0.1)")
    parser.add_argument("--compile", action="store_true",
                        help="both stacks train through torch.compile (stacks.compiled; first step = compile)")
    parser.add_argument("--same-weights", action="store_true",
                        help="both stacks start from one transformers checkpoint (written first)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every measurement in this process (smoke tests; peak RSS is then shared)")
    parser.add_argument("--quick", action="store_true", help="LoRA on LM, 2 steps, short generation")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for latest.json / latest.md")
    parser.add_argument("--name", default="latest", help="file name stem of the results")
    args = parser.parse_args(argv)
    if args.quick:
        args.modes, args.workloads, args.steps, args.warmup = "lora", "lm", 2, 1
        args.new_tokens, args.generation_repeats = 16, 1
    args.modes = [m for m in args.modes.split(",") if m]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.stacks = [s for s in args.stacks.split(",") if s]
    for name, values, allowed in (("mode", args.modes, MODES), ("workload", args.workloads, WORKLOADS),
                                  ("stack", args.stacks, STACKS)):
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {allowed}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.matmul_size is None:
        args.matmul_size = 8192 if args.device == "cuda" else 2048
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    from gpt2lite.training.precision import resolve_precision

    args.precision = resolve_precision(args.precision, args.device)
    return args


def run_child(spec: dict, workdir: Path, in_process: bool = False, tree: Path = None) -> dict:
    """Run one measurement in a fresh Python process (or here, for smoke tests) and return its result.

    tree: another gpt2lite checkout whose own benchmarks/child.py runs it, with that tree first on the
    import path (compare_trees.py); default this one."""
    if in_process:
        import child

        return child.run_spec(spec)
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    child_py = (tree / "benchmarks" if tree is not None else HERE) / "child.py"
    done = subprocess.run([sys.executable, str(child_py), str(spec_path)], env=env, capture_output=True, text=True,
                          cwd=None if tree is None else str(tree))
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark child failed in {child_py} for {spec}:\n{done.stdout[-2000:]}\n"
                       f"{done.stderr[-4000:]}")


def write_same_weights(directory: Path, preset: str, dropout: bool):
    """One randomly initialised transformers checkpoint both stacks load."""
    import transformers

    from gpt2lite import GPT2Config
    from stacks import dropout_overrides

    lite = GPT2Config.from_name(preset)
    config = transformers.GPT2Config(n_layer=lite.n_layer, n_head=lite.n_head, n_embd=lite.n_embd,
                                     n_positions=lite.n_positions, vocab_size=lite.vocab_size,
                                     **dropout_overrides(dropout))
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(directory))


def machine_info(device: str) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), device=device)
    try:
        import importlib.metadata as metadata

        info["transformers"], info["peft"] = metadata.version("transformers"), metadata.version("peft")
    except Exception:  # not installed: the reference rows are then absent anyway
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# Dense bf16 peak FLOP/s of GPUs the CUDA path may meet (vendor datasheets, no sparsity).
GPU_PEAK_BF16 = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                 "L4": 121e12, "A10": 125e12}


def gpu_peak(name: str):
    for key, value in GPU_PEAK_BF16.items():
        if key in name:
            return value
    return None


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--render":  # results JSON -> markdown again
        results = json.loads(Path(sys.argv[2]).read_text())
        results["targets"] = [dict(target=label, measured=measured, bound=bound, held=held) for label, measured, bound, held
                              in report.check_targets(results["training"], results["generation"])]
        markdown = render(results)
        Path(sys.argv[2]).with_suffix(".md").write_text(markdown + "\n")
        print(markdown)
        return results
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dropout = not args.no_dropout
    from gpt2lite import GPT2Config

    config = GPT2Config.from_name(args.preset)
    shape = report.Shape(config.n_layer, config.n_embd, config.mlp_dim, config.vocab_size)
    common = dict(preset=args.preset, threads=args.threads, device=args.device, precision=args.precision, seed=0,
                  compile=args.compile)
    results = dict(machine=machine_info(args.device), settings=vars(args).copy(), training=[], generation=None)
    with tempfile.TemporaryDirectory(prefix="gpt2lite-bench-") as tmp:
        workdir = Path(tmp)
        weights_dir = None
        if args.same_weights:
            weights_dir = workdir / "weights"
            write_same_weights(weights_dir, args.preset, dropout)
            common["weights_dir"] = str(weights_dir)
        matmul_spec = dict(common, task="matmul", size=args.matmul_size, repeats=10)
        matmul_runs = [run_child(matmul_spec, workdir, args.in_process)]
        log(f"matmul {args.matmul_size}: " + ", ".join(f"{name} {flops / 1e9:.1f}" for name, flops
                                                     in matmul_runs[0]["by_kernel"].items()) + " GFLOP/s")
        for workload in args.workloads:
            seq_len = args.lm_seq_len if workload == "lm" else args.summarization_seq_len
            seq_len = min(seq_len, config.n_positions - 20)  # room for the soft prompt
            n_batches = args.warmup + args.steps
            input_ids, labels = workloads.build_inputs(workload, n_batches, args.batch_size, seq_len, config.vocab_size)
            inputs_path = workdir / f"{workload}.pt"
            torch.save({"input_ids": input_ids, "labels": labels}, inputs_path)
            for mode in args.modes:
                row = dict(workload=workload, mode=mode, precision=args.precision, batch_size=args.batch_size,
                           seq_len=seq_len)
                for stack in args.stacks:
                    if stack == "reference" and mode == "qlora":
                        continue  # no CPU QLoRA in the reference stack (bitsandbytes)
                    spec = dict(common, task="train", stack=stack, mode=mode, workload=workload,
                                inputs=str(inputs_path), steps=args.steps, warmup=args.warmup, dropout=dropout)
                    result = run_child(spec, workdir, args.in_process)
                    result["tokens_per_s"] = result["tokens_per_step"] / result["median_step_s"]
                    result["peak_rss_gb"] = result["peak_rss_bytes"] / 1e9
                    result["model_flops_per_step"] = report.training_flops(
                        shape, mode, args.batch_size, seq_len, result["labelled_tokens_per_step"])
                    result["achieved_flops"] = result["model_flops_per_step"] / result["median_step_s"]
                    row[stack] = result
                    log(f"{workload:13s} {mode:6s} {stack:9s} {result['median_step_s']:.2f} s/step "
                        f"peak RSS {result['peak_rss_gb']:.2f} GB loss {result['losses'][0]:.4f}")
                ref, lite = row.get("reference"), row.get("gpt2lite")
                if ref and lite:
                    row["speed_ratio"] = lite["tokens_per_s"] / ref["tokens_per_s"]
                    row["memory_ratio"] = lite["peak_rss_bytes"] / ref["peak_rss_bytes"]
                    if args.device == "cuda":
                        row["gpu_memory_ratio"] = lite["peak_gpu_bytes"] / ref["peak_gpu_bytes"]
                results["training"].append(row)
        if not args.no_generation:
            prompt_len = min(args.prompt_len, config.n_positions - args.new_tokens)
            prompts = workloads.generation_prompts(args.batch_size, prompt_len, config.vocab_size)
            prompts_path = workdir / "prompts.pt"
            torch.save({"prompts": prompts}, prompts_path)
            generation = dict(description=f"greedy, batch {args.batch_size}, {prompt_len}-token prompts, "
                                          f"{args.new_tokens} new tokens, KV cache")
            for stack in args.stacks:
                spec = dict(common, task="generate", stack=stack, inputs=str(prompts_path), compile=False,
                            new_tokens=args.new_tokens, repeats=args.generation_repeats)  # compiled: speed.py
                result = run_child(spec, workdir, args.in_process)
                result["new_tokens_per_s"] = result["new_tokens"] / result["median_s"]
                result["peak_rss_gb"] = result["peak_rss_bytes"] / 1e9
                generation[stack] = result
                log(f"generation {stack:9s} {result['new_tokens_per_s']:.1f} new tokens/s")
            if "reference" in generation and "gpt2lite" in generation:
                generation["speed_ratio"] = (generation["gpt2lite"]["new_tokens_per_s"]
                                             / generation["reference"]["new_tokens_per_s"])
                if args.same_weights:  # otherwise each stack has its own random weights
                    generation["same_tokens"] = generation["gpt2lite"]["tokens"] == generation["reference"]["tokens"]
            results["generation"] = generation
        matmul_runs.append(run_child(matmul_spec, workdir, args.in_process))
    # The peak is the better of the two matmul measurements (start and end of the run): the stricter bound.
    peak = max(run["median_flops"] for run in matmul_runs)
    results["matmul"] = dict(runs=matmul_runs, peak_flops=peak)
    if args.device == "cuda":
        results["matmul"]["gpu_datasheet_peak_flops"] = gpu_peak(results["machine"].get("gpu", ""))
    for row in results["training"]:
        for stack in STACKS:
            if stack in row:
                row[stack]["peak_fraction"] = row[stack]["achieved_flops"] / peak
                datasheet = results["matmul"].get("gpu_datasheet_peak_flops")
                if datasheet:
                    row[stack]["mfu"] = row[stack]["achieved_flops"] / datasheet
    results["targets"] = [dict(target=label, measured=measured, bound=bound, held=held)
                          for label, measured, bound, held in report.check_targets(results["training"], results["generation"])]
    markdown = render(results)
    print(markdown)
    (out_dir / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    (out_dir / f"{args.name}.md").write_text(markdown + "\n")
    return results


def render(results: dict) -> str:
    machine = results["machine"]
    matmul = results["matmul"]
    lines = [f"Measured {machine['date']} on {machine['cpu']} ({machine['cores']} cores, "
             f"{results['settings']['threads']} threads), torch {machine['torch']}, "
             f"transformers {machine.get('transformers', '?')}, peft {machine.get('peft', '?')}, device {machine['device']}.",
             f"Matmul peak ({matmul['runs'][0]['size']}^2, {matmul['runs'][0]['dtype']}) at the start and end of the run: "
             + "; ".join(", ".join(f"{name} {flops / 1e9:.1f}" for name, flops in run.get("by_kernel", {}).items())
                         for run in matmul["runs"])
             + f" GFLOP/s; peak = the best, {matmul['peak_flops'] / 1e9:.1f} GFLOP/s.", ""]
    if results["training"]:
        lines += [report.table(results["training"]), ""]
        if matmul.get("gpu_datasheet_peak_flops"):
            lines += ["MFU against the GPU's datasheet bf16 peak "
                      f"({matmul['gpu_datasheet_peak_flops'] / 1e12:.0f} TFLOP/s): " + ", ".join(
                          f"{row['workload']}/{row['mode']}/{stack} {100 * row[stack]['mfu']:.1f}%"
                          for row in results["training"] for stack in STACKS if stack in row), ""]
    if results["generation"]:
        lines += [report.generation_table(results["generation"]), ""]
    if results["targets"]:
        if machine["device"] == "cuda":
            lines += ["The targets were set for the 2-core CPU; on CUDA they are shown for comparison only.", ""]
        lines += [report.targets_table([(t["target"], t["measured"], t["bound"], t["held"])
                                        for t in results["targets"]])]
    return "\n".join(lines)


def log(message: str):
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

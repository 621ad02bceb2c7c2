"""Memory and speed against model size: `python benchmarks/scaling.py`.

gpt2 ... gpt2-xl x {LoRA, QLoRA, QLoRA + activation checkpointing, full fine-tuning}, gpt2lite against
transformers + peft (LoRA on the float model; QLoRA through bitsandbytes' CPU 4-bit path where it loads).
Every row trains on the same tokens (batch 2 x 256, LM loss on wikitext-2) from one random-init checkpoint
per size, in its own process (benchmarks/child.py), so its peak RSS is its own. A row whose estimated peak
would not fit the machine (--memory-limit-gb) is skipped and marked so. Also measured per size: the peak
RSS of GPT2.from_pretrained(..., quantize="nf4"). Writes RESULTS/scaling.{json,md,png}.

    python benchmarks/scaling.py                                   # everything (hours on 2 cores)
    python benchmarks/scaling.py --presets gpt2 --steps 1 --warmup 0   # a smoke run (minutes)
    python benchmarks/scaling.py --render results/scaling.json          # the markdown and plot again
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import child  # noqa: E402
import run  # noqa: E402
import workloads  # noqa: E402

PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# row name -> (stacks.py mode, activation checkpointing)
MODES = {"lora": ("lora", False), "qlora": ("qlora", False), "qlora+ckpt": ("qlora", True), "full": ("full", False)}
STACKS = ("gpt2lite", "reference")
# Activation bytes per (token x channel x layer) kept for backward at 2 x 256, fitted to gpt2-large and
# gpt2-xl LoRA runs on the benchmark machine (issue 12): gpt2lite 12.4 GB and transformers 22.2 GB on xl.
ACTIVATION_BYTES = {"gpt2lite": 160, "reference": 400}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {tuple(MODES)}")
    parser.add_argument("--stacks", default=",".join(STACKS))
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="both stacks train under this autocast")
    parser.add_argument("--memory-limit-gb", type=float, default=24.0, help="skip rows estimated above this")
    parser.add_argument("--no-load", action="store_true", help="skip the quantize-on-load measurement")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default="scaling")
    args = parser.parse_args(argv)
    args.presets, args.modes, args.stacks = (args.presets.split(","), args.modes.split(","), args.stacks.split(","))
    for name, values, allowed in (("preset", args.presets, PRESETS + ("tiny",)), ("mode", args.modes, tuple(MODES)),
                                  ("stack", args.stacks, STACKS)):
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {allowed}")
    return args


def estimated_peak_gb(preset: str, stack: str, mode: str, batch_size: int, seq_len: int) -> float:
    """A rough peak RSS: weights (float32, or 4-bit blocks), gradients and AdamW states where they train,
    activations (all blocks, or with checkpointing each block's input plus one block's), the logits."""
    from gpt2lite import GPT2Config

    config = GPT2Config.from_name(preset)
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    embeddings = (V + config.n_positions) * C
    blocks = L * (12 * C * C + 13 * C)
    total = embeddings + blocks
    stack_mode, checkpointing = MODES[mode]
    weights = 4 * total if stack_mode != "qlora" else 4 * embeddings + 0.53 * blocks
    training = 12 * total if stack_mode == "full" else 0  # gradient + two AdamW moments
    tokens = batch_size * seq_len
    per_layer = ACTIVATION_BYTES[stack] * tokens * C
    activations = (4 * tokens * C * L + per_layer) if checkpointing else per_layer * L
    logits = 3 * 4 * tokens * V if stack == "reference" else 0  # gpt2lite's loss is chunked
    return (weights + training + activations + logits) / 1e9 + 0.5  # + the runtime


def run_hidden(code: str, *arguments: str) -> str:
    """Run Python code in a fresh process (so that its memory is not this process's: a child inherits the
    parent's peak RSS in ru_maxrss) and return its stdout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-c", code, *arguments], env=env, capture_output=True, text=True,
                          cwd=str(HERE))
    if done.returncode:
        raise RuntimeError(f"a benchmark helper process failed:\n{done.stderr[-4000:]}")
    return done.stdout


def write_checkpoint(directory: Path, preset: str):
    """One random-init transformers checkpoint (GPT-2's dropout) that every row of this size loads."""
    run_hidden("import sys, run; run.write_same_weights(sys.argv[1], sys.argv[2], True)", str(directory), preset)


LOAD_CODE = """
import sys, torch, child, gpt2lite
torch.set_num_threads(int(sys.argv[2]))
before = child.peak_rss_bytes()
model = gpt2lite.GPT2.from_pretrained(sys.argv[1], quantize="nf4")
model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(child.RESULT_PREFIX + f'{{"peak_rss_bytes": {child.peak_rss_bytes()}, "imports_rss_bytes": {before}, '
      f'"model_bytes": {model_bytes}}}')
"""


def measure_load(directory: Path, threads: int) -> dict:
    """Peak RSS of loading the checkpoint with quantize="nf4", in a fresh process."""
    out = run_hidden(LOAD_CODE, str(directory), str(threads))
    return json.loads(next(line for line in out.splitlines() if line.startswith(child.RESULT_PREFIX))[7:])


def measure_preset(preset: str, args, workdir: Path) -> list:
    from gpt2lite import GPT2Config

    config = GPT2Config.from_name(preset)
    weights_dir = workdir / preset
    write_checkpoint(weights_dir, preset)
    input_ids, labels = workloads.build_inputs("lm", args.warmup + args.steps, args.batch_size, args.seq_len,
                                               config.vocab_size)
    inputs_path = workdir / f"{preset}.pt"
    torch.save({"input_ids": input_ids, "labels": labels}, inputs_path)
    rows = []
    if not args.no_load:
        load = measure_load(weights_dir, args.threads)
        rows.append(dict(preset=preset, mode="load nf4", gpt2lite=load))
        run.log(f"{preset:12s} load nf4   peak RSS {load['peak_rss_bytes'] / 1e9:.2f} GB")
    for mode in args.modes:
        row = dict(preset=preset, mode=mode)
        stack_mode, checkpointing = MODES[mode]
        for stack in args.stacks:
            estimate = estimated_peak_gb(preset, stack, mode, args.batch_size, args.seq_len)
            if estimate > args.memory_limit_gb:
                row[stack] = dict(skipped=f"estimated {estimate:.0f} GB > {args.memory_limit_gb:.0f} GB")
                continue
            spec = dict(task="train", stack=stack, mode=stack_mode, preset=preset, workload="lm",
                        inputs=str(inputs_path), steps=args.steps, warmup=args.warmup, dropout=True,
                        threads=args.threads, device="cpu", seed=0, weights_dir=str(weights_dir),
                        activation_checkpointing=checkpointing, precision=args.precision)
            try:
                result = run.run_child(spec, workdir, in_process=False)
            except RuntimeError as error:  # e.g. bitsandbytes without a CPU backend: the row is absent
                row[stack] = dict(absent=str(error).strip().splitlines()[-1][:200])
                continue
            result["estimated_peak_gb"] = estimate
            row[stack] = result
            run.log(f"{preset:12s} {mode:10s} {stack:9s} {result['median_step_s']:.2f} s/step "
                    f"peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB loss {result['losses'][0]:.4f}")
        lite, ref = row.get("gpt2lite", {}), row.get("reference", {})
        if "median_step_s" in lite and "median_step_s" in ref:
            row["speed_ratio"] = ref["median_step_s"] / lite["median_step_s"]
            row["memory_ratio"] = lite["peak_rss_bytes"] / ref["peak_rss_bytes"]
        rows.append(row)
    return rows


def goals(rows: list) -> list:
    """Issue 12's goals, on the largest size measured: (goal, measured, held) for those its rows allow."""
    if not rows:
        return []
    preset = max((row["preset"] for row in rows), key=lambda p: PRESETS.index(p) if p in PRESETS else -1)
    side = {(row["mode"], stack): row[stack] for row in rows if row["preset"] == preset
            for stack in STACKS if "peak_rss_bytes" in row.get(stack, {})}
    gb = lambda mode, stack="gpt2lite": side[(mode, stack)]["peak_rss_bytes"] / 1e9  # noqa: E731
    step = lambda mode, stack="gpt2lite": side[(mode, stack)]["median_step_s"]  # noqa: E731
    checks = [
        ((("qlora+ckpt", "gpt2lite"),), f"{preset} QLoRA + checkpointing peak RSS <= 3 GB",
         lambda: (gb("qlora+ckpt"), 3.0, "GB")),
        ((("qlora", "gpt2lite"), ("lora", "reference")), f"{preset} QLoRA peak RSS <= 0.35x reference LoRA's",
         lambda: (gb("qlora") / gb("lora", "reference"), 0.35, "x")),
        ((("qlora", "gpt2lite"), ("lora", "gpt2lite")), f"{preset} QLoRA s/step <= 1.5x gpt2lite LoRA's",
         lambda: (step("qlora") / step("lora"), 1.5, "x")),
        ((("lora", "gpt2lite"), ("lora", "reference")), f"{preset} LoRA peak RSS <= 0.5x reference's",
         lambda: (gb("lora") / gb("lora", "reference"), 0.5, "x")),
        ((("lora", "gpt2lite"), ("lora", "reference")), f"{preset} LoRA speed >= 1.3x reference's",
         lambda: (step("lora", "reference") / step("lora"), -1.3, "x")),
        ((("load nf4", "gpt2lite"),), f"{preset} loading with quantize='nf4' peak RSS <= 2 GB",
         lambda: (gb("load nf4"), 2.0, "GB")),
    ]
    out = []
    for needed, label, measure in checks:
        if all(key in side for key in needed):
            value, bound, unit = measure()
            out.append(dict(goal=label, measured=f"{value:.2f} {unit}",
                            held=value >= -bound if bound < 0 else value <= bound))
    return out


def render(results: dict) -> str:
    machine = results["machine"]
    settings = results["settings"]
    lines = [f"Measured {machine['date']} on {machine['cpu']} ({machine['cores']} cores, {settings['threads']} "
             f"threads), torch {machine['torch']}, transformers {machine.get('transformers', '?')}, peft "
             f"{machine.get('peft', '?')}. Batch {settings['batch_size']} x {settings['seq_len']}, LM loss, "
             f"{settings.get('precision', 'fp32')}, dropout 0.1, random init; median of {settings['steps']} steps after {settings['warmup']}.",
             "", "| model | method | gpt2lite s/step | reference s/step | speed ratio | gpt2lite peak RSS GB "
             "| reference peak RSS GB | memory ratio |", "|---|---|---|---|---|---|---|---|"]

    def cell(side, key, scale=1.0):
        if not side or ("skipped" not in side and "absent" not in side and key not in side):
            return "–"
        if "skipped" in side or "absent" in side:
            return "skipped: " + side["skipped"] if "skipped" in side else "absent"
        return f"{side[key] / scale:.2f}"

    for row in results["rows"]:
        lite, ref = row.get("gpt2lite"), row.get("reference")
        ratio = lambda key: f"{row[key]:.2f}x" if key in row else "–"  # noqa: E731
        lines.append(f"| {row['preset']} | {row['mode']} | {cell(lite, 'median_step_s')} | {cell(ref, 'median_step_s')} "
                     f"| {ratio('speed_ratio')} | {cell(lite, 'peak_rss_bytes', 1e9)} | "
                     f"{cell(ref, 'peak_rss_bytes', 1e9)} | {ratio('memory_ratio')} |")
    lines += ["", "speed ratio = reference s/step / gpt2lite s/step; memory ratio = gpt2lite / reference peak RSS. "
              "'load nf4' is GPT2.from_pretrained(..., quantize=\"nf4\") alone. A skipped row was estimated not to "
              "fit the memory limit; an absent one failed to run (the reason is in the JSON)."]
    if results.get("goals"):
        lines += ["", "| goal | measured | held |", "|---|---|---|"]
        lines += [f"| {g['goal']} | {g['measured']} | {'yes' if g['held'] else 'NO'} |" for g in results["goals"]]
    return "\n".join(lines)


def plot(results: dict, path: Path):
    """Peak RSS against parameter count: a colour per method, solid for gpt2lite, dashed for the reference."""
    from matplotlib.figure import Figure

    from gpt2lite import GPT2, GPT2Config, count_parameters

    sizes = {}
    for preset in {row["preset"] for row in results["rows"]}:
        with torch.device("meta"):
            sizes[preset] = count_parameters(GPT2(GPT2Config.from_name(preset)))[1] / 1e6
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for stack in STACKS:
        for color, mode in enumerate(("load nf4", *MODES)):
            points = sorted((sizes[row["preset"]], row[stack]["peak_rss_bytes"] / 1e9) for row in results["rows"]
                            if row["mode"] == mode and "peak_rss_bytes" in row.get(stack, {}))
            if points:
                axes.plot(*zip(*points), marker="o", color=f"C{color}", linestyle="-" if stack == "gpt2lite" else "--",
                          label=f"{'gpt2lite' if stack == 'gpt2lite' else 'transformers + peft'} {mode}")
    axes.set_xscale("log")
    axes.set_xlabel("parameters (millions)")
    axes.set_ylabel("peak RSS (GB)")
    axes.set_title("Peak memory of a training step (batch 2 x 256) against model size")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--render":  # the markdown and plot again from a results JSON
        path = Path(argv[1])
        results = json.loads(path.read_text())
        results["goals"] = goals(results["rows"])
        path.with_suffix(".md").write_text(render(results) + "\n")
        plot(results, path.with_suffix(".png"))
        return results
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(machine=run.machine_info("cpu"), settings=vars(args).copy(), rows=[])
    with tempfile.TemporaryDirectory(prefix="gpt2lite-scaling-") as tmp:
        for preset in args.presets:
            results["rows"] += measure_preset(preset, args, Path(tmp))
            (out / f"{args.name}.json").write_text(json.dumps(results, indent=1))  # kept if a later size fails
    results["goals"] = goals(results["rows"])
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    markdown = render(results)
    print(markdown)
    (out / f"{args.name}.md").write_text(markdown + "\n")
    plot(results, out / f"{args.name}.png")
    return results


if __name__ == "__main__":
    main()

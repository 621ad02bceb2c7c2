"""Speed against the strongest reference (issue 20): `python benchmarks/speed.py`.

For each row (workload, mode, precision) it times, each in its own child process (child.py) and in
interleaved rounds with the order rotated, so that a noisy stretch of a shared machine falls on every stack:

    reference            transformers + peft, eager
    reference+compile    the same through torch.compile (what the Trainer's torch_compile=True does)
    gpt2lite             gpt2lite as built (its kernels on)
    gpt2lite+compile     torch.compile(model, dynamic=True), what TrainConfig(compile=True) does
    gpt2lite+frozen      frozen weights stored in the compute dtype (precision.cast_frozen; bf16 adapter rows)

and the row's matmul floor (floor.py: the step's GEMMs timed alone at that precision), so every stack's
step / floor is reported, with its first-step (compile) time. Then greedy decoding: transformers' generate
(eager, and with its static cache + torch.compile) and gpt2lite's generate, against the memory-bandwidth
bound (floor.decode_bound, bandwidth measured here). /proc/loadavg is recorded around every child: the
machine may be shared. Writes RESULTS/speed.json and speed.md.

    python benchmarks/speed.py                                  # the issue's rows, 2 rounds
    python benchmarks/speed.py --rows lm:lora:bf16 --stacks gpt2lite,gpt2lite+compile --rounds 1
    python benchmarks/speed.py --render results/speed.json       # the markdown again
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

import floor  # noqa: E402
import workloads  # noqa: E402
from run import log, machine_info, run_child  # noqa: E402

ROWS = ("lm:lora:bf16", "lm:full:bf16", "lm:lora:fp32", "lm:full:fp32", "summarization:lora:bf16")
STACKS = ("reference", "reference+compile", "gpt2lite", "gpt2lite+compile", "gpt2lite+frozen",
          "gpt2lite+frozen+compile")
GENERATION_STACKS = ("reference", "reference+compile", "gpt2lite")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--rows", default=",".join(ROWS), help="workload:mode:precision, comma-separated")
    parser.add_argument("--stacks", default=",".join(STACKS))
    parser.add_argument("--generation-stacks", default=",".join(GENERATION_STACKS), help="empty: no generation")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every measurement")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lm-seq-len", type=int, default=256)
    parser.add_argument("--summarization-seq-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--generation-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default="speed")
    args = parser.parse_args(argv)
    args.rows = [tuple(r.split(":")) for r in args.rows.split(",") if r]
    args.stacks = [s for s in args.stacks.split(",") if s]
    args.generation_stacks = [s for s in args.generation_stacks.split(",") if s]
    for stack in args.stacks + args.generation_stacks:
        if stack not in STACKS:
            parser.error(f"unknown stack {stack!r}; choose from {STACKS}")
    return args


def load() -> list:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def measured(spec: dict, workdir: Path) -> dict:
    """run_child with the 1-minute load average before and after."""
    before = load()
    result = run_child(spec, workdir)
    result["loadavg_before"], result["loadavg_after"] = before, load()
    return result


def train_spec(common, stack, workload, mode, precision, inputs, args) -> dict:
    base, _, options = stack.partition("+")
    frozen = "frozen" in options.split("+") and precision == "bf16"
    return dict(common, task="train", stack=base, mode=mode, workload=workload, precision=precision,
                inputs=str(inputs), steps=args.steps, warmup=args.warmup, dropout=True,
                compile="compile" in options.split("+"), frozen_dtype="bfloat16" if frozen else None)


def applies(stack: str, mode: str, precision: str) -> bool:
    """gpt2lite+frozen only where it differs from gpt2lite: frozen weights under bf16 (adapter modes)."""
    return "frozen" not in stack or (precision == "bf16" and mode != "full")


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--render":
        results = json.loads(Path(sys.argv[2]).read_text())
        markdown = render(results)
        Path(sys.argv[2]).with_suffix(".md").write_text(markdown + "\n")
        print(markdown)
        return results
    args = parse_args(argv)
    from gpt2lite import GPT2Config

    config = GPT2Config.from_name(args.preset)
    common = dict(preset=args.preset, threads=args.threads, device="cpu", seed=0)
    results = dict(machine=machine_info("cpu"), settings=vars(args).copy(), rows=[], generation=None)
    with tempfile.TemporaryDirectory(prefix="gpt2lite-speed-") as tmp:
        workdir = Path(tmp)
        rows, inputs = [], {}
        for workload, mode, precision in args.rows:
            seq_len = args.lm_seq_len if workload == "lm" else args.summarization_seq_len
            if workload not in inputs:
                ids, labels = workloads.build_inputs(workload, args.warmup + args.steps, args.batch_size, seq_len,
                                                     config.vocab_size)
                inputs[workload] = workdir / f"{workload}.pt"
                torch.save({"input_ids": ids, "labels": labels}, inputs[workload])
                labelled = int((labels[:, :, 1:] != -100).sum()) // labels.size(0)
            rows.append(dict(workload=workload, mode=mode, precision=precision, seq_len=seq_len,
                             batch_size=args.batch_size, labelled=labelled, runs={}, floor_runs=[]))
        for round_index in range(args.rounds):
            for row_index, row in enumerate(rows):
                order = [s for s in args.stacks if applies(s, row["mode"], row["precision"])]
                shift = (round_index + row_index) % len(order)
                for stack in order[shift:] + order[:shift] + ["floor"]:
                    if stack == "floor":
                        spec = dict(common, task="floor", mode=row["mode"], precision=row["precision"],
                                    batch_size=row["batch_size"], seq_len=row["seq_len"], labelled=row["labelled"])
                        result = measured(spec, workdir)
                        row["floor_runs"].append(result)
                        log(f"{row['workload']} {row['mode']} {row['precision']} floor {result['floor_s']:.3f} s")
                        continue
                    spec = train_spec(common, stack, row["workload"], row["mode"], row["precision"],
                                      inputs[row["workload"]], args)
                    result = measured(spec, workdir)
                    row["runs"].setdefault(stack, []).append(result)
                    save_partial(args, results, rows)
                    log(f"{row['workload']} {row['mode']} {row['precision']} {stack}: {result['median_step_s']:.3f} s/step, "
                        f"first step {result['first_step_s']:.1f} s, load {result['loadavg_before'][0]:.2f}"
                        f"->{result['loadavg_after'][0]:.2f}")
        results["rows"] = [summarize(row) for row in rows]
        if args.generation_stacks:
            results["generation"] = generation(common, config, args, workdir)
    markdown = render(results)
    print(markdown)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    (out / f"{args.name}.md").write_text(markdown + "\n")
    return results


def save_partial(args, results: dict, rows: list):
    """Every measurement so far, in RESULTS/NAME.partial.json (a long run on a shared machine may be cut)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.partial.json").write_text(json.dumps(dict(results, rows=rows), indent=1))


def summarize(row: dict) -> dict:
    """Medians over rounds: each stack's step and first-step seconds; the floor is the best round (the
    GEMMs' time when the machine was quietest)."""
    row["floor_s"] = min(r["floor_s"] for r in row["floor_runs"]) if row["floor_runs"] else None
    row["stacks"] = {}
    for stack, runs in row["runs"].items():
        steps = [r["median_step_s"] for r in runs]
        row["stacks"][stack] = dict(step_s=statistics.median(steps), step_range=[min(steps), max(steps)],
                                    first_step_s=statistics.median(r["first_step_s"] for r in runs),
                                    peak_rss_gb=max(r["peak_rss_bytes"] for r in runs) / 1e9,
                                    loss=runs[0]["losses"][0], rounds=len(runs),
                                    load=[r["loadavg_before"][0] for r in runs] + [runs[-1]["loadavg_after"][0]])
    return row


def generation(common, config, args, workdir) -> dict:
    prompts = workloads.generation_prompts(args.batch_size, args.prompt_len, config.vocab_size)
    path = workdir / "prompts.pt"
    torch.save({"prompts": prompts}, path)
    out = dict(description=f"greedy, batch {args.batch_size}, {args.prompt_len}-token prompts, "
                           f"{args.new_tokens} new tokens", runs={})
    bandwidths, peaks = [], []
    for round_index in range(args.rounds):
        order = args.generation_stacks[round_index % len(args.generation_stacks):] + \
            args.generation_stacks[:round_index % len(args.generation_stacks)]
        bandwidths.append(measured(dict(common, task="bandwidth"), workdir))
        peaks.append(measured(dict(common, task="matmul", size=2048, repeats=10, precision="fp32"), workdir))
        for stack in order:
            base, _, options = stack.partition("+")
            spec = dict(common, task="generate", stack=base, inputs=str(path), new_tokens=args.new_tokens,
                        repeats=args.generation_repeats, precision="fp32", compile=options == "compile")
            result = measured(spec, workdir)
            result["new_tokens_per_s"] = result["new_tokens"] / result["median_s"]
            out["runs"].setdefault(stack, []).append(result)
            log(f"generation {stack}: {result['new_tokens_per_s']:.1f} new tokens/s, first {result['first_s']:.1f} s")
    out["bytes_per_s"] = max(b["bytes_per_s"] for b in bandwidths)
    out["read_bytes_per_s"] = max(b["read_bytes_per_s"] for b in bandwidths)
    out["peak_flops"] = max(p["median_flops"] for p in peaks)
    out["bound"] = floor.decode_bound(config.n_layer, config.n_embd, config.vocab_size, config.n_positions,
                                      args.batch_size, args.prompt_len, args.new_tokens, 4, out["bytes_per_s"],
                                      out["peak_flops"])
    out["stacks"] = {stack: dict(new_tokens_per_s=statistics.median(r["new_tokens_per_s"] for r in runs),
                                 first_s=statistics.median(r["first_s"] for r in runs), rounds=len(runs))
                     for stack, runs in out["runs"].items()}
    tokens = {stack: runs[0]["tokens"] for stack, runs in out["runs"].items()}
    out["reference_compile_same_tokens"] = tokens.get("reference+compile") == tokens.get("reference")
    return out


def fmt(value, spec="{:.2f}"):
    return "–" if value is None else spec.format(value)


def render(results: dict) -> str:
    machine = results["machine"]
    lines = [f"Measured {machine['date']} on {machine['cpu']} ({machine['cores']} cores, "
             f"{results['settings']['threads']} threads), torch {machine['torch']}, transformers "
             f"{machine.get('transformers', '?')}, peft {machine.get('peft', '?')}. Random-init {results['settings']['preset']}, "
             f"batch {results['settings']['batch_size']}, dropout 0.1, fused AdamW; median of "
             f"{results['settings']['steps']} steps after {results['settings']['warmup']}, median over "
             f"{results['settings']['rounds']} interleaved rounds (range in brackets). 1-min load average "
             "before each child in the last column (2 cores; above ~2.5 the figures are contended).", ""]
    stacks = [s for s in STACKS if any(s in row["stacks"] for row in results["rows"])]
    lines += ["| workload | mode | precision | matmul floor s | " + " | ".join(f"{s} s/step (x floor)" for s in stacks)
              + " | first step s (" + ", ".join(stacks) + ") | best gpt2lite vs ref / ref+compile | load |",
              "|" + "---|" * (7 + len(stacks))]
    for row in results["rows"]:
        cells = []
        for stack in stacks:
            side = row["stacks"].get(stack)
            cells.append("–" if side is None else
                         f"{side['step_s']:.2f} [{side['step_range'][0]:.2f}-{side['step_range'][1]:.2f}] "
                         f"({fmt(side['step_s'] / row['floor_s'] if row['floor_s'] else None)})")
        firsts = ", ".join(fmt(row["stacks"][s]["first_step_s"], "{:.0f}") if s in row["stacks"] else "–" for s in stacks)
        ratios = speedups(row)
        lines.append(f"| {row['workload']} | {row['mode']} | {row['precision']} | {fmt(row['floor_s'], '{:.3f}')} | "
                     + " | ".join(cells) + f" | {firsts} | {fmt(ratios[0])}x / {fmt(ratios[1])}x ({ratios[2]}) | "
                     + "/".join(f"{x:.1f}" for s in stacks if s in row["stacks"] for x in row["stacks"][s]["load"][:1])
                     + " |")
    generation = results.get("generation")
    if generation and generation.get("stacks"):
        bound = generation["bound"]
        lines += ["", f"Decoding, {generation['description']} (fp32). Memory bandwidth measured "
                  f"{generation['bytes_per_s'] / 1e9:.1f} GB/s (read {generation['read_bytes_per_s'] / 1e9:.1f}); "
                  f"matmul peak {generation['peak_flops'] / 1e9:.0f} GFLOP/s. Bound: prefill {bound['prefill_s']:.2f} s "
                  f"at the peak + {bound['decode_s']:.2f} s reading weights and cache "
                  f"({bound['last_step_bytes'] / 1e6:.0f} MB at the last step) = {bound['new_tokens_per_s']:.1f} new tokens/s.",
                  "", "| stack | new tokens/s | x reference | % of bandwidth bound | first run s |", "|---|---|---|---|---|"]
        ref = generation["stacks"].get("reference", {}).get("new_tokens_per_s")
        for stack, side in generation["stacks"].items():
            rate = side["new_tokens_per_s"]
            lines.append(f"| {stack} | {rate:.1f} | {fmt(rate / ref if ref else None)} | "
                         f"{100 * rate / bound['new_tokens_per_s']:.0f}% | {side['first_s']:.1f} |")
    lines += ["", goals_table(results)]
    return "\n".join(lines)


def goals(results: dict) -> list:
    """[(goal, measured or None)]: issue 20's goals, as this run measured them (None: not measured)."""
    rows = {(r["workload"], r["mode"], r["precision"]): r for r in results["rows"]}
    checks = []
    for mode in ("lora", "full"):
        row = rows.get(("lm", mode, "bf16"))
        eager, compiled, best = speedups(row) if row else (None, None, "–")
        checks += [(f"LM {mode} bf16: best gpt2lite >= 1.5x reference+compile", compiled, 1.5),
                   (f"LM {mode} bf16: best gpt2lite >= 2.5x reference eager", eager, 2.5)]
        floor_ratio = (row["stacks"][best]["step_s"] / row["floor_s"]) if row and row.get("floor_s") and best in row["stacks"] else None
        checks.append((f"LM {mode} bf16: best gpt2lite step <= 1.5x matmul floor", floor_ratio, -1.5))
    row = rows.get(("lm", "lora", "fp32"))
    checks.append(("LM LoRA fp32: best gpt2lite >= 1.3x reference+compile", speedups(row)[1] if row else None, 1.3))
    row = rows.get(("summarization", "lora", "bf16"))
    checks.append(("summarization LoRA bf16: >= 1.5x reference+compile", speedups(row)[1] if row else None, 1.5))
    generation = results.get("generation") or {}
    side = generation.get("stacks", {})
    lite, ref, ref_c = (side.get(k, {}).get("new_tokens_per_s") for k in ("gpt2lite", "reference", "reference+compile"))
    checks += [("greedy decode >= 2x transformers generate", lite / ref if lite and ref else None, 2.0),
               ("greedy decode >= 1.3x transformers static cache + compile", lite / ref_c if lite and ref_c else None, 1.3),
               ("greedy decode >= 50% of the bandwidth bound",
                lite / generation["bound"]["new_tokens_per_s"] if lite and generation.get("bound") else None, 0.5)]
    return checks


def goals_table(results: dict) -> str:
    lines = ["| goal (issue 20) | measured | met |", "|---|---|---|"]
    for goal, value, bound in goals(results):
        met = "not measured" if value is None else ("yes" if (value <= -bound if bound < 0 else value >= bound) else "**no**")
        lines.append(f"| {goal} | {fmt(value)} | {met} |")
    return "\n".join(lines)


def speedups(row: dict):
    """(best gpt2lite speed x reference eager, x reference compiled, which gpt2lite stack)."""
    lite = {s: v["step_s"] for s, v in row["stacks"].items() if s.startswith("gpt2lite")}
    if not lite:
        return None, None, "–"
    best = min(lite, key=lite.get)
    ref, ref_c = row["stacks"].get("reference"), row["stacks"].get("reference+compile")
    return (ref["step_s"] / lite[best] if ref else None, ref_c["step_s"] / lite[best] if ref_c else None, best)


if __name__ == "__main__":
    main()

"""Memory per rank and step time of FSDP against DDP and one process: `python benchmarks/fsdp.py`.

Rows: gpt2-medium full fine-tuning and LoRA, gpt2-xl QLoRA (random-init weights of the preset's shape: these
are memory and speed figures, not GPT-2 results). Each row is trained by gpt2lite.training.loop.train() in 1 process,
2 processes with strategy="ddp" and 2 with strategy="fsdp" (torchrun, gloo on CPU; nccl on CUDA with
--device cuda), batch 2 x --seq tokens per rank, AdamW, --warmup + --steps steps. Per rank, measured at each
optimizer step (a global step hook): the rank's own tensor storage (parameters, gradients and optimizer
state, each storage counted once; a DTensor's local shard), the peak RSS (VmHWM), and the step time (the
median over the timed steps). Every setup loads a random-init checkpoint of the preset: FSDP shard by shard
(fsdp_load.load_sharded), the others whole (QLoRA: from_pretrained(quantize="nf4")).

    python benchmarks/fsdp.py                             # every row (tens of minutes on 2 loaded cores)
    python benchmarks/fsdp.py --rows medium-lora --steps 2   # one row
    python benchmarks/fsdp.py --render results/fsdp.json     # the markdown table again

Writes RESULTS/fsdp.{json,md}. Run big rows under `flock /work/notes/bigmem.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# row -> (preset, method)
ROWS = {"medium-full": ("gpt2-medium", {"name": "full"}), "medium-lora": ("gpt2-medium", {"name": "lora"}),
        "xl-qlora": ("gpt2-xl", {"name": "qlora"})}
SMOKE_ROWS = {"small-lora": ("gpt2", {"name": "lora"}), "small-full": ("gpt2", {"name": "full"})}  # --rows smoke checks
ROWS.update(SMOKE_ROWS)
# label -> (processes, strategy, reshard_after_forward)
SETUPS = {"1 process": (1, "ddp", True), "2 x DDP": (2, "ddp", True), "2 x FSDP": (2, "fsdp", True),
          "2 x FSDP no-reshard": (2, "fsdp", False)}
DEFAULT_SETUPS = ("1 process", "2 x DDP", "2 x FSDP")


def status_bytes(field: str) -> int:
    """A size from /proc/self/status: VmHWM (peak RSS, file-backed pages of a memory-mapped checkpoint
    included) or RssAnon (the process's own memory now)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def own_storage_bytes(model, optimizer) -> dict:
    """Bytes this rank holds of the weights (parameters and buffers: trained, frozen, 4-bit codes), the
    gradients and the optimizer state; each storage counted once, a DTensor's local shard."""
    from torch.distributed.tensor import DTensor

    seen, sizes = set(), {"weights": 0, "grads": 0, "optimizer": 0}

    def add(kind, tensor):
        storage = (tensor.to_local() if isinstance(tensor, DTensor) else tensor).untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes():
            seen.add(storage.data_ptr())
            sizes[kind] += storage.nbytes()

    for tensor in [*model.parameters(), *model.buffers()]:
        add("weights", tensor)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                add("grads", p.grad)
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.dim() > 0:
                    add("optimizer", value)
    return sizes


def build(spec: dict):
    """The row's model from a random-init checkpoint of the preset: sharded as it loads under FSDP
    (fsdp_load.load_sharded), else loaded whole (QLoRA: quantized as it loads)."""
    from gpt2lite import GPT2
    from gpt2lite.experiment.fsdp_load import load_sharded
    from gpt2lite.peft.methods import apply

    if spec["strategy"] == "fsdp" and spec["processes"] > 1:
        return load_sharded(spec["checkpoint"], spec["method"], reshard_after_forward=spec["reshard"])
    quantize = {"quantize": "nf4"} if spec["method"]["name"] == "qlora" else {}
    return apply(GPT2.from_pretrained(spec["checkpoint"], **quantize), spec["method"])


def child(spec: dict):
    """One setup of one row, on every rank: train, measure at each optimizer step, print a RESULT line."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from gpt2lite.training.config import TrainConfig
    from gpt2lite.training.loop import train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank = int(os.environ.get("RANK", "0"))
    if spec["processes"] > 1:
        torch.distributed.init_process_group("nccl" if spec["device"] == "cuda" else "gloo")
    model = build(spec)
    steps, marks = [], [time.perf_counter()]

    def after_step(optimizer, args, kwargs):
        marks.append(time.perf_counter())
        steps.append({**own_storage_bytes(model, optimizer), "peak_rss": status_bytes("VmHWM"),
                      "rss_anon": status_bytes("RssAnon")})

    handle = register_optimizer_step_post_hook(after_step)
    generator = torch.Generator().manual_seed(rank)
    n = 2 * spec["processes"] * (spec["warmup"] + spec["steps"])
    rows = [{"input_ids": ids, "labels": ids} for ids in
            torch.randint(0, 50257, (n, spec["seq"]), generator=generator).tolist()]
    with tempfile.TemporaryDirectory(dir=spec["scratch"]) as output_dir:
        config = TrainConfig(output_dir=output_dir, batch_size=2, lr=1e-5, epochs=None, shuffle=False,
                             max_steps=spec["warmup"] + spec["steps"], strategy=spec["strategy"],
                             save_best=False, progress_bar=False, device=spec["device"],
                             fsdp_reshard_after_forward=spec["reshard"])
        train(model, rows, config)
    handle.remove()
    times = [b - a for a, b in zip(marks[1:], marks[2:])][spec["warmup"] - 1:] if spec["warmup"] else []
    result = {"rank": rank, **steps[-1], "step_s": statistics.median(times) if times else None,
              "rss_anon": max(step["rss_anon"] for step in steps)}
    print("RESULT " + json.dumps(result), flush=True)


def run_setup(row: str, label: str, args, checkpoint) -> dict:
    preset, method = ROWS[row]
    processes, strategy, reshard = SETUPS[label]
    spec = {"preset": preset, "method": method, "processes": processes, "strategy": strategy, "reshard": reshard,
            "seq": args.seq,
            "steps": args.steps, "warmup": args.warmup, "device": args.device, "checkpoint": checkpoint,
            "scratch": args.scratch}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(HERE.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    ranks = sorted((json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines()
                    if line.startswith("RESULT ")), key=lambda r: r["rank"])
    if done.returncode != 0 or len(ranks) != processes:
        print(done.stderr[-3000:], file=sys.stderr)
        return {"row": row, "setup": label, "error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    print(f"{row} {label}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return {"row": row, "setup": label, "processes": processes, "strategy": strategy, "steps": args.steps,
            "warmup": args.warmup, "ranks": ranks}


def random_checkpoint(scratch: str, preset: str) -> str:
    """A random-init checkpoint of the preset (written once: gpt2-medium 1.4 GB, gpt2-xl 6.2 GB)."""
    from gpt2lite import GPT2, GPT2Config

    directory = os.path.join(scratch, f"{preset}-random")
    if not os.path.exists(os.path.join(directory, "model.safetensors")):
        torch.manual_seed(0)
        GPT2(GPT2Config.from_name(preset)).save_pretrained(directory)
    return directory


def summarise(result: dict) -> dict:
    """Per-rank figures of one setup: the largest over its ranks (and the RSS of all ranks together)."""
    ranks = result["ranks"]
    held = [r["weights"] + r["grads"] + r["optimizer"] for r in ranks]
    return {"held_gb": max(held) / 2**30, "weights_gb": max(r["weights"] for r in ranks) / 2**30,
            "rss_gb": max(r["peak_rss"] for r in ranks) / 2**30,
            "rss_all_gb": sum(r["peak_rss"] for r in ranks) / 2**30,
            "anon_gb": max(r["rss_anon"] for r in ranks) / 2**30,
            "step_s": max(r["step_s"] for r in ranks if r["step_s"] is not None)}


def render(report: dict) -> str:
    lines = [f"# FSDP vs DDP: memory per rank and step time ({report['machine']})", "",
             f"batch 2 x {report['seq']} tokens per rank, timed steps after 1 of warm-up; "
             f"random-init weights (memory and speed only). Load average before/after: {report['load_before']} / "
             f"{report['load_after']} (a shared machine: step times are noisy).", "",
             "Own memory: the process's anonymous RSS at its optimizer steps (the largest); peak RSS (VmHWM) also "
             "counts the pages of the memory-mapped checkpoint it read (shared page cache).", "",
             "| row | setup | weights+grads+AdamW per rank (GB) | of which weights (GB) | own memory per rank (GB) "
             "| peak RSS per rank (GB) | peak RSS, all ranks (GB) | step (s) | steps timed |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_row = {}
    for result in report["results"]:
        if "error" in result:
            lines.append(f"| {result['row']} | {result['setup']} | failed: {result['error'][0][:80]} | | | | | | |")
            continue
        s = by_row.setdefault(result["row"], {})[result["setup"]] = summarise(result)
        lines.append(f"| {result['row']} | {result['setup']} | {s['held_gb']:.2f} | {s['weights_gb']:.2f} | "
                     f"{s['anon_gb']:.2f} | {s['rss_gb']:.2f} | {s['rss_all_gb']:.2f} | {s['step_s']:.2f} | {result['steps']} |")
    lines += ["", "| row | FSDP / DDP: weights+grads+AdamW per rank | own memory per rank | peak RSS per rank "
              "| step time | step time, FSDP no-reshard / DDP |", "|---|---|---|---|---|---|"]
    for row, setups in by_row.items():
        if {"2 x DDP", "2 x FSDP"} <= setups.keys():
            ddp, fsdp = setups["2 x DDP"], setups["2 x FSDP"]
            other = setups.get("2 x FSDP no-reshard")
            lines.append(f"| {row} | {fsdp['held_gb'] / ddp['held_gb']:.2f}x | {fsdp['anon_gb'] / ddp['anon_gb']:.2f}x "
                         f"| {fsdp['rss_gb'] / ddp['rss_gb']:.2f}x | {fsdp['step_s'] / ddp['step_s']:.2f}x | "
                         + (f"{other['step_s'] / ddp['step_s']:.2f}x |" if other else "|"))
    return "\n".join(lines + [""])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(row for row in ROWS if row not in SMOKE_ROWS))
    parser.add_argument("--setups", default=",".join(DEFAULT_SETUPS), help=f"of {list(SETUPS)}")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scratch", default=tempfile.gettempdir())
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--output", default=str(RESULTS / "fsdp"))
    parser.add_argument("--render")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.render:
        report = json.loads(Path(args.render).read_text())
        return Path(args.render).with_suffix(".md").write_text(render(report))
    report = {"machine": f"{os.cpu_count()} CPU cores" if args.device == "cpu" else args.device, "seq": args.seq,
              "steps": args.steps, "warmup": args.warmup, "load_before": os.getloadavg(), "results": []}
    output = Path(args.output)
    if output.with_suffix(".json").exists():  # add to (or redo rows of) an earlier run
        earlier = json.loads(output.with_suffix(".json").read_text())
        report["results"] = [r for r in earlier["results"] if r["row"] not in args.rows.split(",")]
        report["load_before"] = earlier["load_before"]
    for row in args.rows.split(","):
        checkpoint = random_checkpoint(args.scratch, ROWS[row][0])
        for label in args.setups.split(","):
            report["results"].append(run_setup(row, label, args, checkpoint))
            report["load_after"] = os.getloadavg()
            output.parent.mkdir(parents=True, exist_ok=True)
            output.with_suffix(".json").write_text(json.dumps(report, indent=1))
            output.with_suffix(".md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()

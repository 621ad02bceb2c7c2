"""One measurement in its own process, so that its peak memory is its own: `python child.py SPEC.json`.

SPEC["task"] is "train" (timed training steps), "generate" (timed greedy generation), "matmul" (the
machine's matmul FLOP/s in SPEC["precision"]), "floor" (a training step's GEMMs timed alone: floor.py) or
"bandwidth" (the machine's memory read bandwidth: floor.py). Training and generation run under that precision
("bf16": autocast; "fp32": none); SPEC["compile"] runs the model through torch.compile (stacks.compiled).
The result is printed as one JSON line prefixed RESULT.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stacks  # noqa: E402

RESULT_PREFIX = "RESULT "


def peak_rss_bytes() -> int:
    """The process's peak resident set size: VmHWM on Linux; ru_maxrss (KiB on Linux) elsewhere, which
    counts the parent's peak too when that was higher (it is kept across fork and exec)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(spec: dict):
    """bf16 autocast for precision "bf16", none for "fp32"."""
    return torch.autocast(spec["device"], dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")


def make_optimizer(parameters):
    """The optimizer both stacks get: PyTorch's fused AdamW (one pass over the parameters, CPU and CUDA)."""
    return torch.optim.AdamW(parameters, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01, fused=True)


def train(spec: dict) -> dict:
    """Time `warmup + steps` training steps: forward with labels, backward, AdamW step, zero_grad."""
    device = spec["device"]
    data = torch.load(spec["inputs"])
    input_ids, labels = data["input_ids"].to(device), data["labels"].to(device)  # (S, B, T) each
    torch.manual_seed(spec["seed"])
    model, loss_fn = stacks.build(spec["stack"], spec["mode"], spec["preset"], spec["dropout"], spec.get("weights_dir"))
    model.to(device).train()
    if spec.get("activation_checkpointing"):
        stacks.enable_activation_checkpointing(spec["stack"], model)
    if spec.get("frozen_dtype"):  # frozen weights stored in the compute dtype (gpt2lite.training.precision)
        from gpt2lite.training.precision import cast_frozen

        cast_frozen(model, getattr(torch, spec["frozen_dtype"]))
    if spec.get("compile"):
        loss_fn = stacks.compiled(spec["stack"], model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_seconds, losses = [], []
    for step in range(spec["warmup"] + spec["steps"]):
        batch = step % input_ids.size(0)
        synchronize(device)
        start = time.perf_counter()
        with autocast(spec):
            loss = loss_fn(input_ids[batch], labels[batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        synchronize(device)
        step_seconds.append(time.perf_counter() - start)
    timed = step_seconds[spec["warmup"]:]
    B, T = input_ids.shape[1:]
    result = dict(
        step_seconds=timed, median_step_s=statistics.median(timed), warmup_seconds=step_seconds[:spec["warmup"]],
        first_step_s=step_seconds[0],
        losses=losses, tokens_per_step=B * T, labelled_tokens_per_step=int((labels[:, :, 1:] != -100).sum()) // labels.size(0),
        trainable_parameters=sum(p.numel() for p in trainable),
        peak_rss_bytes=peak_rss_bytes(),
    )
    if device == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return result


def generate(spec: dict) -> dict:
    """Time greedy generation of `new_tokens` tokens after every prompt (no early stop), `repeats` times."""
    device = spec["device"]
    prompts = torch.load(spec["inputs"])["prompts"].to(device)  # (B, T)
    torch.manual_seed(spec["seed"])
    model, _ = stacks.build(spec["stack"], "full", spec["preset"], False, spec.get("weights_dir"))
    model.to(device).eval()
    if spec["stack"] == "gpt2lite":
        from gpt2lite import generate as lite_generate

        def run():
            return lite_generate(model, prompts, spec["new_tokens"], eos_id=None)
    else:
        model.generation_config.eos_token_id = None  # no early stop: both stacks generate every token
        if spec.get("compile"):  # transformers' documented fast path: a static cache and a compiled forward
            model.generation_config.cache_implementation = "static"
            model.forward = torch.compile(model.forward)

        def run():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=spec["new_tokens"],
                                 do_sample=False, pad_token_id=50256)
            return out[:, prompts.size(1):]

    seconds, tokens = [], None
    for repeat in range(1 + spec["repeats"]):  # the first run warms up
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast(spec):
            tokens = run()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    timed = seconds[1:]
    return dict(seconds=timed, median_s=statistics.median(timed), first_s=seconds[0], new_tokens=int(tokens.numel()),
                tokens=tokens.tolist(), peak_rss_bytes=peak_rss_bytes())


def matmul(spec: dict) -> dict:
    """FLOP/s of an n x n @ n x n matmul, median of `repeats` runs, in bf16 for precision "bf16", else fp32.

    On the CPU two libraries are timed: torch.mm (MKL) and oneDNN, which gpt2lite's LM head uses and which
    is faster on some CPUs (AMD EPYC: MKL takes its AVX2 path there). The faster one is the machine's peak.
    """
    device, n = spec["device"], spec["size"]
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    kernels = {"torch.mm": lambda: torch.mm(a, b, out=out)}
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if hasattr(torch.ops, "mkldnn") else None
    if device == "cpu" and onednn is not None and torch.backends.mkldnn.is_available():
        kernels["oneDNN"] = lambda: onednn(a, b, None, "none", [], "")
    flops = 2 * n ** 3
    by_kernel = {}
    for name, kernel in kernels.items():
        seconds = []
        for repeat in range(2 + spec["repeats"]):
            synchronize(device)
            start = time.perf_counter()
            kernel()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        by_kernel[name] = flops / statistics.median(seconds[2:])
    best = max(by_kernel, key=by_kernel.get)
    return dict(size=n, dtype=str(dtype), median_flops=by_kernel[best], kernel=best, by_kernel=by_kernel)


def floor(spec: dict) -> dict:
    import floor as floor_module

    return floor_module.step_floor(spec)


def bandwidth(spec: dict) -> dict:
    import floor as floor_module

    return floor_module.bandwidth(spec)


TASKS = {"train": train, "generate": generate, "matmul": matmul, "floor": floor, "bandwidth": bandwidth}


def run_spec(spec: dict) -> dict:
    """Run one measurement in this process (the parent calls it in-process only for smoke tests)."""
    torch.set_num_threads(spec["threads"])
    result = TASKS[spec["task"]](spec)
    result["transformers_loaded"] = "transformers" in sys.modules
    result["threads"] = torch.get_num_threads()
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with open(sys.argv[1]) as handle:
        spec = json.load(handle)
    print(RESULT_PREFIX + json.dumps(run_spec(spec)), flush=True)

"""Where a training step's time goes: `python benchmarks/profile_step.py --mode lora --precision bf16`.

Runs the benchmark's step (stacks.py, child.py's optimizer) for gpt2lite or the reference under
torch.profiler and prints the ops by self CPU time, split into matrix multiplications and everything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import child  # noqa: E402
import stacks  # noqa: E402
import workloads  # noqa: E402

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise", "aten::_mkldnn")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stack", default="gpt2lite")
    parser.add_argument("--mode", default="lora")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--frozen-bf16", action="store_true", help="precision.cast_frozen first")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args(argv)
    from gpt2lite import GPT2Config

    vocab = GPT2Config.from_name(args.preset).vocab_size
    ids, labels = workloads.lm_batches(3, args.batch_size, args.seq_len, vocab)
    torch.manual_seed(0)
    model, loss_fn = stacks.build(args.stack, args.mode, args.preset, True)
    model.train()
    if args.frozen_bf16:
        from gpt2lite.training.precision import cast_frozen

        cast_frozen(model)
    optimizer = child.make_optimizer([p for p in model.parameters() if p.requires_grad])
    spec = dict(device="cpu", precision=args.precision)

    def step(i):
        with child.autocast(spec):
            loss = loss_fn(ids[i], labels[i])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)
    step(1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(2)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key.startswith(GEMM_OPS))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"self CPU total {total / 1e6:.3f} s: matmuls {gemm / 1e6:.3f} s ({100 * gemm / total:.0f}%), "
          f"everything else {(total - gemm) / 1e6:.3f} s")


if __name__ == "__main__":
    main()

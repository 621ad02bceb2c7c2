"""Run by tests/training/test_ddp.py under `python -m torch.distributed.run --nproc_per_node 2`: trains the tiny model
for 2 steps with gloo DDP and saves the first step's gradients, each rank's last gradients and the summary to the directory in argv[1]."""

import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_helpers import collate_lm, ddp_config, lm_examples, tiny_model  # noqa: E402

from gpt2lite.training.loop import train  # noqa: E402


def main(output_dir):
    torch.set_num_threads(1)
    model = tiny_model(0)

    def save_first_step_gradients(record):  # called on rank 0 after step 1's update, before step 2 starts
        if record["type"] == "train" and record["step"] == 1:
            torch.save({n: p.grad.clone() for n, p in model.named_parameters()}, os.path.join(output_dir, "grads_step1.pt"))

    config = dataclasses.replace(ddp_config(output_dir, batch_size=2, grad_accum=2), report_to=("csv",))
    summary = train(model, lm_examples(8), config,
                    eval_dataset=lm_examples(3, seed=1), collate_fn=collate_lm, on_log=save_first_step_gradients)
    rank = dist.get_rank()
    torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(output_dir, f"grads_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(output_dir, "ddp_summary.json"), "w") as f:
            json.dump(summary, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

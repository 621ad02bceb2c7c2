"""Run by tests/training/test_resume.py: trains the resume tests' run and kills its own process with SIGKILL right
after step 5 is logged (the last checkpoint is from step 3)."""

import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_helpers import collate_lm, lm_examples, resume_config, tiny_model  # noqa: E402

from gpt2lite.training.loop import train  # noqa: E402


def kill_after_step_5(record):
    if record["type"] == "train" and record["step"] == 5:
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    torch.set_num_threads(1)
    train(tiny_model(0, dropout=0.1), lm_examples(10), resume_config(sys.argv[1]), eval_dataset=lm_examples(3, seed=1),
          collate_fn=collate_lm, on_log=kill_after_step_5)

"""Run by tests/experiment/test_search.py: `gpt2lite <argv>` whose process kills itself with SIGKILL (no handler, no
cleanup) once trial 2, the search's third, has trained its first step."""

import os
import signal
import sys

import torch

import gpt2lite.cli.pipeline as pipeline
from gpt2lite.cli import run

real_run_method = pipeline.run_method


def run_method_killed_in_trial_2(label, method, base, task, config, **kwargs):
    if os.path.basename(config.output_dir) == "trial_2":
        def kill_after_the_first_step(record):
            if record["type"] == "train":
                os.kill(os.getpid(), signal.SIGKILL)
        kwargs["on_log"] = kill_after_the_first_step
    return real_run_method(label, method, base, task, config, **kwargs)


if __name__ == "__main__":
    torch.set_num_threads(1)
    pipeline.run_method = run_method_killed_in_trial_2
    run(sys.argv[1:])

"""Run by tests/cli/test_repeatable_runs.py: `gpt2lite <argv[2:]>` in this process, killed outright (SIGKILL: no
handler, no cleanup) right after step argv[1] is logged."""

import os
import signal
import sys

import gpt2lite.training.run
from gpt2lite.cli import run

KILL_AFTER = int(sys.argv[1])
log = gpt2lite.training.run.Run.log


def log_then_die(self, record):
    log(self, record)
    if record["type"] == "train" and record["step"] == KILL_AFTER:
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    gpt2lite.training.run.Run.log = log_then_die
    run(sys.argv[2:])

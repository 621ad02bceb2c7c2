"""Seeding a process: `seed_everything(seed)`, called by every entry point (the command line, run_method, the
examples) before it builds or adapts a model.

A classifier's new score head, LoRA's A matrices and a soft prompt's random init are drawn from torch's
global generator when the model is built or adapted, before train() seeds it; unseeded, that generator starts
differently in every process, and two runs of one command would differ from their first step.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch.manual_seed seeds every GPU's too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

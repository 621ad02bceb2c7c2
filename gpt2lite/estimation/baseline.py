"""The resident memory a CPU training process holds besides its tensors: Python, torch and gpt2lite's code,
the thread pools and kernel libraries a first training step starts. Measured once in a child process and
cached (cache_root()/rss_baseline.json, by Python, torch and gpt2lite version and thread count).

    baseline_mb()      # e.g. 335.0: what a training step holds besides its tensors
    imports_mb()       # e.g. 180.0: before the first step (while the checkpoint loads)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys

import torch

# What the child runs: the imports of `gpt2lite finetune`, then one AdamW step of a model too small to weigh
# anything (a 256-token vocabulary, one block of 32), so that the kernels and thread pools are started.
CHILD = """
import json, resource, torch
import gpt2lite.cli.pipeline, gpt2lite.training.loop
from gpt2lite import GPT2, GPT2Config
def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
imported = peak_mb()
model = GPT2(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2))
optimizer = torch.optim.AdamW(model.parameters())
ids = torch.zeros(2, 64, dtype=torch.long)
for _ in range(2):
    model(input_ids=ids, labels=ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(json.dumps({"baseline_mb": peak_mb(), "imports_mb": imported}))
"""


def cache_key() -> str:
    from importlib import metadata

    try:
        version = metadata.version("gpt2lite")  # the installed distribution (the face is a later stage)
    except metadata.PackageNotFoundError:
        version = "not installed"
    return f"python {platform.python_version()}, torch {torch.__version__}, gpt2lite {version} " \
           f"({source_fingerprint()}), {torch.get_num_threads()} threads, {sys.prefix}"


def source_fingerprint() -> str:
    """A hash of the package's module paths and sizes: a checkout whose imports changed measures anew (and the
    environment, sys.prefix, is in the key: another virtual environment imports other packages)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted((os.path.relpath(os.path.join(folder, name), package), os.path.getsize(os.path.join(folder, name)))
                   for folder, _, names in os.walk(package) for name in names if name.endswith(".py"))
    return hashlib.sha256(repr(files).encode()).hexdigest()[:12]


def cache_path() -> str:
    from gpt2lite.experiment.pretrain import cache_root

    return os.path.join(cache_root(), "rss_baseline.json")


def baseline_mb() -> float:
    """The resident set of a training process without its tensors, in MB (measured once, then cached)."""
    return measured()["baseline_mb"]


def imports_mb() -> float:
    """The resident set of the process once gpt2lite is imported, before any step started its thread pools."""
    return measured()["imports_mb"]


def measured() -> dict:
    """{"baseline_mb", "imports_mb"}, measured once per cache_key() and cached."""
    path, key = cache_path(), cache_key()
    cached = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                cached = json.load(f)
        except ValueError:  # a damaged cache is measured again
            cached = {}
    if not isinstance(cached.get(key), dict):
        cached[key] = measure()
        from gpt2lite.files import atomic_write_text

        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps(cached, indent=1))
    return cached[key]


def measure() -> dict:
    """Run CHILD in a fresh interpreter: its peak resident set (VmHWM) in MB after the imports and at the end."""
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise RuntimeError(f"measuring the Python + torch baseline failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

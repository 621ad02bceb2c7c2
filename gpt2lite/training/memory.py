"""Peak memory of a run: CUDA's max allocated memory on a GPU, the process's peak resident set size on the CPU.

    reset_peak_memory(device)   # start counting afresh (a method run after another reports its own peak)
    ...
    peak_memory_mb(device)      # the peak since the reset, in MB

On the CPU the peak is Linux's VmHWM, which /proc/self/clear_refs resets; without /proc (macOS, Windows)
it is getrusage's ru_maxrss, the whole process's peak, which nothing resets.
"""

from __future__ import annotations

import resource
import sys
from typing import Optional

import torch


def reset_peak_memory(device: Optional[torch.device] = None) -> bool:
    """Reset the peak that peak_memory_mb(device) reports; False where that is not possible (the CPU
    without /proc/self/clear_refs)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated memory on a GPU; on the CPU the process's peak resident set size since the last
    reset_peak_memory (VmHWM), or since it started where /proc is missing (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10

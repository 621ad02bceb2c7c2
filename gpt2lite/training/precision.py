"""Training precision: "fp32", "bf16" (autocast), "fp16" (CUDA autocast with a GradScaler), or "auto".

"auto" takes bf16 where the hardware multiplies bf16 natively, else fp32:
    CUDA  torch.cuda.is_bf16_supported() (Ampere and later)
    CPU   AVX512-BF16 or AMX-BF16 (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later).
          Elsewhere PyTorch emulates bf16 on the CPU, which is slower than float32.

Under bf16 autocast the weights stay float32 (and so do the optimizer's updates); each matmul reads bf16
copies and accumulates in float32, while softmax, log-softmax, LayerNorm and the loss run in float32.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from gpt2lite.dtypes import PRECISIONS

logger = logging.getLogger(__name__)

CHOICES = (*PRECISIONS, "auto")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # the names in /proc/cpuinfo and torch.cpu.get_capabilities()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic instructions (AVX512-BF16 or AMX-BF16)."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.9
    if get_capabilities is not None:
        capabilities = get_capabilities()
        return any(capabilities.get(flag, False) for flag in CPU_BF16_FLAGS)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell, so no bf16
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively (so that bf16 autocast is faster than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(precision: str, device) -> str:
    """The precision to train in: `precision` itself, or for "auto" bf16 where `device` has native bf16
    arithmetic and fp32 elsewhere (the choice and its reason are logged)."""
    if precision not in CHOICES:
        raise ValueError(f"precision must be one of {CHOICES}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    resolved = "bf16" if native_bf16(device) else "fp32"
    reason = "has" if resolved == "bf16" else "lacks"
    logger.info("precision='auto': %s, since the %s %s native bf16 arithmetic", resolved, device.type, reason)
    return resolved


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision ("fp32": none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 training needs CUDA (it relies on a GradScaler); use precision='bf16' on the CPU")
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Store the frozen matmul weights (and their biases) of `model` in `dtype`, as peft's users do when they
    load the base in bf16: autocast then reads them as they are instead of casting a bf16 copy of each one on
    every forward. Trainable parameters (the adapters) stay as they are (float32), as peft keeps them.

    Only weights read by a matmul are cast: embeddings (and the LM head tied to wte) and LayerNorms keep
    their dtype, so the residual stream and the normalisations stay float32. The model must then run under
    autocast to `dtype` (precision "bf16"): a float32 input meets a bf16 weight otherwise. Returns the model."""
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.LayerNorm)):
            continue
        weight = vars(module).get("_parameters", {}).get("weight")
        if weight is None or weight.dim() != 2 or weight.requires_grad or id(weight) in embedding:
            continue
        for parameter in module.parameters(recurse=False):
            if not parameter.requires_grad and parameter.is_floating_point() and id(parameter) not in embedding:
                parameter.data = parameter.data.to(dtype)
    return model

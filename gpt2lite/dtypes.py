"""The floating-point dtypes gpt2lite loads, computes and trains in: one table, by name."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# TrainConfig.precision's short names (autocast's dtype; "fp32" means no autocast), for the same dtypes
PRECISIONS = {"fp32": DTYPES["float32"], "bf16": DTYPES["bfloat16"], "fp16": DTYPES["float16"]}


def torch_dtype(dtype) -> torch.dtype:
    """A floating dtype from None (float32), a torch.dtype or its name ("bfloat16", "torch.bfloat16")."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or the torch dtype), got {dtype!r}")

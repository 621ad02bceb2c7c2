"""optim.adamw: PyTorch's fused AdamW where the parameters allow it, with the for-loop AdamW's updates."""

import torch
from train_helpers import tiny_model

from gpt2lite.training.optim import adamw, parameter_groups


def test_adamw_is_fused_on_the_cpu_and_updates_as_the_default_adamw():
    """Both optimizers get the same gradients (the fused model's, copied): the parameters they produce agree
    to float32 rounding (gradients computed on each model would differ in their noise-level entries, e.g. the
    key biases', which Adam's m / sqrt(v) blows up to a full step)."""
    fused_model, default_model = tiny_model(seed=0), tiny_model(seed=0)
    fused = adamw(parameter_groups(fused_model, 0.01), lr=1e-2)
    default = torch.optim.AdamW(parameter_groups(default_model, 0.01), lr=1e-2)
    assert fused.defaults["fused"] and not default.defaults["fused"]
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    pairs = list(zip(fused_model.parameters(), default_model.parameters()))
    for _ in range(3):
        fused_model(ids, labels=ids).backward()
        for a, b in pairs:
            b.grad = a.grad.clone()
        fused.step()
        default.step()
        fused.zero_grad(set_to_none=True)
        default.zero_grad(set_to_none=True)
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

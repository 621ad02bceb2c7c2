"""The fast paths, behind one door: `use_fast_kernels(model)`.

The model is written as the textbook says (model/gpt2.py reads like nanoGPT: `self.c_attn(x)`,
F.scaled_dot_product_attention, F.cross_entropy at the labelled positions). Three kernels compute the same
results (to float rounding) faster or in less memory; each module's docstring says what it buys, and
benchmarks/run.py measures them against transformers + peft (README, "Performance"):

    linear.py     FastLinear / linear: float32 CPU forward matmuls through oneDNN instead of MKL
    attention.py  scaled_dot_product_attention: CPU training with attention dropout keeps a boolean mask
                  and recomputes the probabilities in backward (a third less activation memory)
    loss.py       lm_loss: the LM head and cross-entropy by chunks (the fast path of gpt2lite.loss.lm_loss), gradients formed in forward, so
                  the (positions x vocab) logits never exist whole

Every model built by gpt2lite has them on (GPT2.__init__ and GPT2ForSequenceClassification.__init__ end
with use_fast_kernels(self)); the switch is

    use_fast_kernels(model, False)   # the textbook paths, e.g. to compare or to debug
    use_fast_kernels(model)          # back on

It turns each plain nn.Linear (but LoRA's small lora_A and lora_B) into a FastLinear (same parameters, a
different forward) and sets the kernel
slots that modules declare as attributes holding their textbook function: `linear` (LoRA, IA3 and 4-bit
layers' base product), `sdpa` (attention), `lm_loss` (GPT2's loss). Adapter layers injected later take the
kernels of the layer they replace (model/surgery.replace_modules).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from gpt2lite import loss as textbook_loss
from gpt2lite.kernels.attention import scaled_dot_product_attention
from gpt2lite.kernels.linear import FastLinear, is_plain_linear, linear
from gpt2lite.kernels.loss import lm_loss as chunked_lm_loss

# slot name -> (textbook function, fast function); a module declares a slot by holding the textbook one
SLOTS = {
    "linear": (F.linear, linear),
    "sdpa": (F.scaled_dot_product_attention, scaled_dot_product_attention),
    "lm_loss": (textbook_loss.lm_loss, chunked_lm_loss),
}

__all__ = ["FastLinear", "is_plain_linear", "use_fast_kernels", "uses_fast_kernels"]


def use_fast_kernels(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every kernel of `model` (and its submodules) to the fast path, or back with enabled=False.
    Parameters, buffers and state-dict keys are untouched. Returns the model."""
    for name, module in model.named_modules():
        # LoRA's lora_A and lora_B stay plain: MKL runs their rank-wide products faster than oneDNN
        if is_plain_linear(module) and not name.rpartition(".")[2].startswith("lora_"):
            module.__class__ = FastLinear if enabled else nn.Linear  # no state of its own: only forward differs
        for slot, (textbook, fast) in SLOTS.items():
            if slot in vars(module):
                setattr(module, slot, fast if enabled else textbook)
    return model


def uses_fast_kernels(module: nn.Module) -> bool:
    """Whether `module` runs a fast kernel of its own (a FastLinear, or a slot set to the fast function)."""
    if type(module) is FastLinear:
        return True
    return any(vars(module).get(slot) is fast for slot, (_, fast) in SLOTS.items())

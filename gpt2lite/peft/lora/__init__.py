"""LoRA and DoRA: the layers, injection, merging (layer), and LoRA over 4-bit base layers (quantized)."""

from gpt2lite.peft.lora.layer import DoRALinear, LoRALinear
from gpt2lite.peft.lora.add import add_lora, merge_and_unload, merge_lora, unmerge_lora
from gpt2lite.peft.lora.quantized import DoRA4bitLinear, LoRA4bitLinear

__all__ = ["LoRALinear", "DoRALinear", "LoRA4bitLinear", "DoRA4bitLinear", "add_lora", "merge_lora", "unmerge_lora",
           "merge_and_unload"]

"""Fine-tuning methods written by hand: LoRA/DoRA/QLoRA, soft prompts, prefixes, IA3, freezing, BitFit.
(QLoRA's 4-bit base, NF4Linear and quantize_nf4, is gpt2lite.quantization's.)

`apply(model, MethodConfig(name=...))` switches between them by name; adapters save and load in peft's format.
"""

from gpt2lite.peft.adapter import disable_adapters, train_only
from gpt2lite.peft.adapter_io import load_adapter, save_adapter
from gpt2lite.peft.freeze import add_bitfit, freeze_layers, frozen_baseline, full_finetuning, untie_lm_head
from gpt2lite.peft.ia3 import add_ia3
from gpt2lite.peft.lora.layer import DoRALinear, LoRALinear
from gpt2lite.peft.lora.add import add_lora, merge_and_unload, merge_lora, unmerge_lora
from gpt2lite.peft.methods import METHODS, MethodConfig, apply
from gpt2lite.peft.modules_to_save import ModulesToSave, add_modules_to_save
from gpt2lite.peft.prefix import add_prefix
from gpt2lite.peft.prompt import add_soft_prompt

__all__ = ["add_lora", "merge_lora", "unmerge_lora", "merge_and_unload", "disable_adapters", "LoRALinear",
           "DoRALinear", "freeze_layers", "untie_lm_head", "add_bitfit", "full_finetuning", "frozen_baseline",
           "train_only", "ModulesToSave", "add_modules_to_save", "save_adapter", "load_adapter", "MethodConfig",
           "apply", "METHODS", "add_soft_prompt", "add_prefix", "add_ia3"]

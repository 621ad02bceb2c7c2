"""Adapters on disk in peft's format: adapter_config.json + adapter_model.safetensors.

peft names a tensor after its module in the transformers model, prefixed by "base_model.model." and
without the adapter name: `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`. gpt2lite keeps
Hugging Face's module names, so the mapping is short: a LoRA layer's bias is peft's `<name>.base_layer.bias`
and a modules_to_save copy is saved under the module's own name (`base_model.model.score.weight`). LoRA
matrices have the same orientation in both (A: (r, in), B: (out, r)) although transformers' GPT-2 stores its
linear layers transposed (Conv1D): peft records that as fan_in_fan_out=true.

Soft prompts, prefixes and IA3 save and load themselves (their modules' save_peft / load_peft); this file
dispatches to them by the model's state or the config's peft_type.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..hf import atomic_write, stores_transposed
from .freeze import is_classifier
from .lora import LoRALinear, add_lora, lora_biases, lora_layers
from .modules_to_save import modules_to_save_of

logger = logging.getLogger(__name__)

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _other_methods():
    """{peft_type: module} of the methods that save and load themselves (each has is_applied, save_peft,
    load_peft)."""
    from . import ia3, prefix, prompt

    return {"PROMPT_TUNING": prompt, "PREFIX_TUNING": prefix, "IA3": ia3}


def save_adapter(model: nn.Module, directory: str, base_model_name_or_path: Optional[str] = None) -> None:
    """Write the model's adapter (LoRA, prompt, prefix or IA3) so that peft.PeftModel.from_pretrained loads it.
    base_model_name_or_path: the base model's hub id or directory, recorded in adapter_config.json."""
    if lora_layers(model):
        _save_lora(model, directory)
        return _record_base_model(directory, base_model_name_or_path)
    for module in _other_methods().values():
        if module.is_applied(model):
            module.save_peft(model, directory)
            return _record_base_model(directory, base_model_name_or_path)
    raise ValueError("the model has no adapter to save; add one first (add_lora, add_soft_prompt, add_prefix, "
                     "add_ia3), or save the whole model with model.save_pretrained(directory)")


def _record_base_model(directory: str, base_model_name_or_path: Optional[str]) -> None:
    if base_model_name_or_path is not None:
        path = os.path.join(directory, CONFIG_FILE)
        config = {**json.load(open(path)), "base_model_name_or_path": base_model_name_or_path}
        atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(config, indent=2)))


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load an adapter saved by save_adapter or by peft into `model` (a gpt2lite GPT-2 with base weights).

    A LoRA adapter is injected first if the model has none; if it has one, its rank must match.
    Raises ValueError for an adapter made for another base size, rank or method.
    """
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory!r} has no {CONFIG_FILE}; is it an adapter directory?")
    with open(path) as f:
        config = json.load(f)
    peft_type = config.get("peft_type")
    if peft_type == "LORA":
        return _load_lora(model, directory, config)
    others = _other_methods()
    if peft_type in others:
        others[peft_type].load_peft(model, directory, config)
        return model
    raise ValueError(f"adapter type {peft_type!r} is not supported; gpt2lite loads LORA and {sorted(others)}")


# --------------------------------------------------------------------------------------------- LoRA


def lora_peft_config(model: nn.Module) -> dict:
    settings = model.lora_settings
    layers = settings["layers_to_transform"]
    return {
        "peft_type": "LORA",
        "task_type": None if is_classifier(model) else "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": settings["rank"],
        "lora_alpha": settings["alpha"],
        "target_modules": list(settings["targets"]),
        "lora_dropout": settings["dropout"],
        "bias": settings["bias"],
        "use_rslora": settings["rslora"],
        "use_dora": settings["dora"],
        "layers_to_transform": [layers] if isinstance(layers, int) else (None if layers is None else list(layers)),
        "modules_to_save": settings["modules_to_save"],
        "fan_in_fan_out": stores_transposed(model),  # GPT-2's Conv1D: (in, out) weights; GPT-Neo: Linear
        "init_lora_weights": True,
        "inference_mode": True,
    }


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter's tensors under peft's key names."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        state[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
        if layer.lora_magnitude_vector is not None:
            state[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    for name, bias in lora_biases(model, model.lora_settings["bias"]):
        inside_lora = isinstance(model.get_submodule(name), LoRALinear)
        state[f"{PREFIX}{name}{'.base_layer' if inside_lora else ''}.bias"] = bias
    for name, wrapper in modules_to_save_of(model).items():
        for key, tensor in wrapper.adapter_state_dict().items():
            state[f"{PREFIX}{name}.{key}"] = tensor
    return state


def _save_lora(model: nn.Module, directory: str) -> None:
    from safetensors.torch import save_file

    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("the LoRA layers are merged; unmerge_lora(model) before saving the adapter")
    config = lora_peft_config(model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, WEIGHTS_FILE), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)

    atomic_write(os.path.join(directory, CONFIG_FILE), write_config)


def _load_lora(model: nn.Module, directory: str, config: dict) -> nn.Module:
    from safetensors.torch import load_file

    for unsupported in ("rank_pattern", "alpha_pattern"):
        if config.get(unsupported):
            raise ValueError(f"the adapter sets {unsupported}={config[unsupported]}; gpt2lite uses one rank and alpha")
    if config.get("lora_bias"):
        raise ValueError("the adapter sets lora_bias=true (a bias on lora_B), which gpt2lite does not implement")
    targets = config["target_modules"]
    if isinstance(targets, str):  # peft: a string is a regular expression over full module names
        targets = [n for n, m in model.named_modules() if re.fullmatch(targets, n) and isinstance(m, nn.Linear)]
    layers = lora_layers(model)
    if not layers:
        add_lora(model, rank=config["r"], alpha=config["lora_alpha"], targets=targets,
                 dropout=config.get("lora_dropout", 0.0), bias=config.get("bias", "none"),
                 rslora=config.get("use_rslora", False), dora=config.get("use_dora", False),
                 layers_to_transform=config.get("layers_to_transform"), modules_to_save=config.get("modules_to_save"))
    else:
        ranks = {layer.rank for layer in layers.values()}
        if ranks != {config["r"]}:
            raise ValueError(f"the adapter in {directory!r} has rank {config['r']}, the model's LoRA layers have "
                             f"rank {sorted(ranks)}; load it into a model without LoRA or with the same rank")
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.exists(weights_path):
        raise FileNotFoundError(f"{directory!r} has no {WEIGHTS_FILE} (adapter_model.bin is not supported)")
    saved = load_file(weights_path)
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the adapter in {directory!r} does not fit this model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]} (made for another model or another target set?)")
    for key, tensor in expected.items():
        if saved[key].shape != tensor.shape:
            raise ValueError(
                f"{key}: the adapter has shape {tuple(saved[key].shape)}, this model expects {tuple(tensor.shape)}; "
                f"the adapter was made for another base size (n_embd={model.config.n_embd} here) or rank"
            )
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(saved[key])
    logger.info("loaded a LoRA adapter of rank %d into %d layers from %s", config["r"], len(lora_layers(model)),
                directory)
    return model

"""Adapters on disk in peft's format: adapter_config.json + adapter_model.safetensors.

peft names a tensor after its module in the transformers model, prefixed by "base_model.model." and
without the adapter name: `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`. gpt2lite keeps
Hugging Face's module names, so the mapping is short: a LoRA layer's bias is peft's `<name>.base_layer.bias`
and a modules_to_save copy is saved under the module's own name (`base_model.model.score.weight`). LoRA
matrices have the same orientation in both (A: (r, in), B: (out, r)) although transformers' GPT-2 stores its
linear layers transposed (Conv1D): peft records that as fan_in_fan_out=true.

Soft prompts, prefixes and IA3 save and load themselves (their modules' save_peft / load_peft); this file
dispatches to them by the model's state or the config's peft_type, and reads and writes the files for all.

Loading is all or nothing. The files are read and their settings checked first; then the adapter is
injected, its tensors' names and shapes are compared with what the model now expects, and only then are
values copied in. On any error the model is left exactly as it was (inject.unchanged_on_error) and a
CheckpointError names the file and what is wrong in it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn

from ..hf import CheckpointError, atomic_write, atomic_write_text, resolve, stores_transposed
from .freeze import is_classifier
from .inject import unchanged_on_error
from .lora import LoRALinear, add_lora, lora_biases, lora_layers
from .modules_to_save import modules_to_save_of

logger = logging.getLogger(__name__)

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BIN_WEIGHTS_FILE = "adapter_model.bin"  # peft's older format, read with weights_only=True


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
        with open(path) as f:
            config = {**json.load(f), "base_model_name_or_path": base_model_name_or_path}
        atomic_write_text(path, json.dumps(config, indent=2))


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load an adapter saved by save_adapter or by peft into `model` (a gpt2lite GPT-2 with base weights).

    directory: a local directory, or a hub id ("user/adapter"), downloaded into the Hugging Face cache.
    The weights are read from adapter_model.safetensors, or else from peft's older adapter_model.bin
    (with torch.load(weights_only=True): no code runs). A LoRA adapter is injected first if the model has
    none; if it has one, its rank must match. The new
    modules take the model's mode (eval or train). Raises CheckpointError (a ValueError) naming the file
    for a missing, malformed or truncated file and for an adapter made for another base size, rank or
    method; the model is then unchanged.
    """
    directory = resolve_adapter(directory)
    config = read_adapter_config(directory)
    peft_type = config["peft_type"]
    if peft_type == "LORA":
        return _load_lora(model, directory, config)
    others = _other_methods()
    if peft_type in others:
        others[peft_type].load_peft(model, directory, config)
        return model
    raise CheckpointError(f"{os.path.join(directory, CONFIG_FILE)}: adapter type {peft_type!r} is not supported; "
                          f"gpt2lite loads LORA and {sorted(others)}")


# -------------------------------------------------------------------------------------------- files


def resolve_adapter(name_or_path: str) -> str:
    """An adapter directory as it is; a hub id ("user/adapter") downloaded into the Hugging Face cache."""
    return resolve(name_or_path, allow_patterns=(CONFIG_FILE, WEIGHTS_FILE, BIN_WEIGHTS_FILE),
                   local_hint="load_adapter(model, '/path/to/dir'), a directory written by save_adapter()",
                   what="adapter directory")


def read_adapter_config(directory: str) -> dict:
    """adapter_config.json as a dict with a peft_type; CheckpointError naming the file if it is missing or
    malformed."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no adapter directory {directory!r}")
    if not os.path.exists(path):
        raise CheckpointError(f"{directory!r} has no {CONFIG_FILE}; is it an adapter directory (written by "
                              "save_adapter or peft's save_pretrained)?")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); save the adapter again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object of adapter settings "
                              '(e.g. {"peft_type": "LORA", "r": 8, ...})')
    if not isinstance(config.get("peft_type"), str):
        raise CheckpointError(f"{path} has no peft_type (LORA, PROMPT_TUNING, PREFIX_TUNING or IA3)")
    return config


def adapter_weights_path(directory: str) -> str:
    """The adapter's weights file: adapter_model.safetensors, else peft's older adapter_model.bin."""
    for name in (WEIGHTS_FILE, BIN_WEIGHTS_FILE):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise CheckpointError(f"{directory!r} has no {WEIGHTS_FILE} (nor {BIN_WEIGHTS_FILE}): the adapter's weights "
                          f"are missing beside its {CONFIG_FILE}; copy them there or save the adapter again")


def read_adapter_tensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of an adapter weights file; CheckpointError naming the file if it cannot be read."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"could not read {path}: {type(error).__name__}: {error}. The file is probably "
                              "truncated or corrupted; save or copy the adapter again.") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors; it is not an adapter weights file")
    return tensors


def check_adapter_tensors(path: str, saved: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size],
                          hint: str):
    """Raise a CheckpointError naming `path` unless `saved` has exactly the names and shapes of `expected`.
    hint: the likely cause, appended to the message."""
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        found = [f"{what} {names[:4]}{f' and {len(names) - 4} more' if len(names) > 4 else ''}"
                 for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise CheckpointError(f"{path} does not fit this model: {', '.join(found)} ({hint})")
    for key, shape in expected.items():
        if saved[key].shape != shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(saved[key].shape)}, this model expects "
                                  f"{tuple(shape)}; {hint}")


def write_adapter_files(directory: str, config: dict, tensors: Mapping[str, torch.Tensor]):
    """Write adapter_config.json and adapter_model.safetensors into `directory`, each atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, WEIGHTS_FILE), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    atomic_write(os.path.join(directory, CONFIG_FILE), write_config)


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
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("the LoRA layers are merged; unmerge_lora(model) before saving the adapter")
    write_adapter_files(directory, lora_peft_config(model), lora_state_dict(model))


def _load_lora(model: nn.Module, directory: str, config: dict) -> nn.Module:
    config_path = os.path.join(directory, CONFIG_FILE)
    settings = _lora_settings(model, config_path, config)
    weights_path = adapter_weights_path(directory)
    saved = read_adapter_tensors(weights_path)
    with unchanged_on_error(model):
        layers = lora_layers(model)
        if not layers:
            try:
                add_lora(model, **settings)
            except (ValueError, TypeError) as error:
                raise CheckpointError(f"{config_path}: {error}") from None
        else:
            ranks = {layer.rank for layer in layers.values()}
            if ranks != {settings["rank"]}:
                raise CheckpointError(f"the adapter in {directory!r} has rank {settings['rank']}, the model's LoRA "
                                      f"layers have rank {sorted(ranks)}; load it into a model without LoRA or "
                                      "with the same rank")
        expected = lora_state_dict(model)
        check_adapter_tensors(weights_path, saved, {k: v.shape for k, v in expected.items()},
                              f"the adapter was made for another base size (n_embd={model.config.n_embd} here), "
                              "rank or set of target modules")
        with torch.no_grad():
            for key, tensor in expected.items():
                tensor.copy_(saved[key])
    logger.info("loaded a LoRA adapter of rank %d into %d layers from %s", settings["rank"], len(lora_layers(model)),
                directory)
    return model


def _lora_settings(model: nn.Module, config_path: str, config: dict) -> dict:
    """add_lora's arguments from a peft LoraConfig (peft's defaults where a field is absent); a CheckpointError
    naming the file for what gpt2lite does not implement or a config without target_modules."""
    for unsupported in ("rank_pattern", "alpha_pattern"):
        if config.get(unsupported):
            raise CheckpointError(f"{config_path} sets {unsupported}={config[unsupported]}; gpt2lite uses one rank "
                                  "and alpha")
    if config.get("lora_bias"):
        raise CheckpointError(f"{config_path} sets lora_bias=true (a bias on lora_B), which gpt2lite does not "
                              "implement")
    targets = config.get("target_modules")
    if not targets:
        raise CheckpointError(f"{config_path} has no target_modules: a LoRA adapter names the layers it adapts "
                              '(e.g. "target_modules": ["c_attn"])')
    if isinstance(targets, str):  # peft: a string is a regular expression over full module names
        pattern = targets
        targets = [n for n, m in model.named_modules() if re.fullmatch(pattern, n) and isinstance(m, nn.Linear)]
        if not targets:
            raise CheckpointError(f"{config_path}: target_modules {pattern!r} (a regular expression over module "
                                  "names) matches no linear layer of this model")
    return dict(rank=config.get("r", 8), alpha=config.get("lora_alpha", 8), targets=targets,
                dropout=config.get("lora_dropout", 0.0), bias=config.get("bias", "none"),
                rslora=config.get("use_rslora", False), dora=config.get("use_dora", False),
                layers_to_transform=config.get("layers_to_transform"), modules_to_save=config.get("modules_to_save"))

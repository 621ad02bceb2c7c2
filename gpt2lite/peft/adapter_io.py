"""Adapters on disk in peft's format: adapter_config.json + adapter_model.safetensors, for every method.

save_adapter is the one writer and load_adapter the one reader; what each method's config and tensors are
called is in peft_format.py (prompt_learning_format.py for soft prompts and prefixes), which they consult for
the model's method (or the file's peft_type).

Loading is all or nothing. The files are read and their settings checked first; then the adapter is
injected, its tensors' names and shapes are compared with what the model now expects, and only then are
values copied in. On any error the model is left exactly as it was (inject.unchanged_on_error) and a
CheckpointError names the file and what is wrong in it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn

from gpt2lite.errors import CheckpointError
from gpt2lite.files import atomic_write, atomic_write_text, read_json_object
from gpt2lite.hub.pretrained import resolve
from gpt2lite.model.surgery import unchanged_on_error
from gpt2lite.peft.peft_format import IA3Format, LoRAFormat, PeftFormat, peft_tensors
from gpt2lite.peft.prompt_learning_format import PrefixFormat, PromptFormat

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BIN_WEIGHTS_FILE = "adapter_model.bin"  # peft's older format, read with weights_only=True
FORMATS = (LoRAFormat(), PromptFormat(), PrefixFormat(), IA3Format())  # a model's adapter: the first applied


def format_of(model: nn.Module) -> Optional[PeftFormat]:
    """The format of the model's adapter, or None when it has none."""
    return next((method for method in FORMATS if method.is_applied(model)), None)


def format_named(peft_type: str) -> Optional[PeftFormat]:
    return next((method for method in FORMATS if method.peft_type == peft_type), None)


def save_adapter(model: nn.Module, directory: str, base_model_name_or_path: Optional[str] = None) -> None:
    """Write the model's adapter (LoRA, prompt, prefix or IA3) so that peft.PeftModel.from_pretrained loads it.
    base_model_name_or_path: the base model's hub id or directory, recorded in adapter_config.json."""
    method = format_of(model)
    if method is None:
        raise ValueError("the model has no adapter to save; add one first (add_lora, add_soft_prompt, add_prefix, "
                         "add_ia3), or save the whole model with model.save_pretrained(directory)")
    if any(getattr(m, "merged", False) is True for m in model.modules()):
        raise ValueError("the LoRA layers are merged; unmerge_lora(model) before saving the adapter")
    config = method.config(model)
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path
    with torch.no_grad():
        tensors = peft_tensors(model, method)
    if method.float32:
        tensors = {k: v.float() for k, v in tensors.items()}
    write_adapter_files(directory, config, tensors)


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load an adapter saved by save_adapter or by peft into `model` (a gpt2lite GPT-2 with base weights).

    directory: a local directory, or a hub id ("user/adapter"), downloaded into the Hugging Face cache.
    The weights are read from adapter_model.safetensors, or else from peft's older adapter_model.bin
    (with torch.load(weights_only=True): no code runs). The adapter is injected first if the model has
    none; if it has one, it must fit (a LoRA's rank must match). The new modules take the model's mode
    (eval or train). Raises CheckpointError (a ValueError) naming the file for a missing, malformed or
    truncated file and for an adapter made for another base size, rank or method; the model is then
    unchanged.
    """
    directory = resolve_adapter(directory)
    config = read_adapter_config(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    method = format_named(config["peft_type"])
    if method is None:
        raise CheckpointError(f"{config_path}: adapter type {config['peft_type']!r} is not supported; gpt2lite "
                              f"loads {[m.peft_type for m in FORMATS]}")
    method.check_config(model, config_path, config)
    weights_path = adapter_weights_path(directory)
    saved = read_adapter_tensors(weights_path)
    method.check_file(model, weights_path, config, saved)
    with unchanged_on_error(model):
        method.add(model, config_path, config, saved)
        expected = peft_tensors(model, method)
        check_adapter_tensors(weights_path, saved, {k: v.shape for k, v in expected.items()}, method.hint(model))
        with torch.no_grad():
            for key, tensor in expected.items():
                tensor.copy_(saved[key])
    logger.info("loaded a %s adapter (%d tensors) from %s", method.peft_type, len(expected), directory)
    return model


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
    config = read_json_object(path, 'not an object of adapter settings (e.g. {"peft_type": "LORA", "r": 8, ...})',
                              "save the adapter again")
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
    atomic_write_text(os.path.join(directory, CONFIG_FILE), json.dumps(config, indent=2, sort_keys=True))

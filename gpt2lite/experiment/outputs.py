"""What a run leaves, and reading it back: save_outputs, save_model, load_for_inference.

A fine-tuning run writes, in its output directory, beside train()'s files (log.jsonl, checkpoint.pt, ...):
    adapter/            adapter methods (lora, qlora, prompt, prefix, ia3): peft's format, with
                        base_model_name_or_path set (peft.PeftModel.from_pretrained and load_adapter read it)
    model/              methods that change the base weights (full, last_n, bitfit, frozen): a Hugging Face
                        checkpoint with GPT-2's tokenizer files (transformers.AutoTokenizer loads it offline)
    predictions.jsonl   one {"source", "reference", "prediction"} per test example
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import torch

from gpt2lite.files import atomic_write_text
from gpt2lite.hub.tokenizer_files import save_tokenizer_files

__all__ = ["ADAPTER_METHODS", "save_outputs", "save_model", "write_jsonl", "load_for_inference", "adapter_num_labels"]

ADAPTER_METHODS = ("lora", "qlora", "prompt", "prefix", "ia3")


def save_outputs(model, method: Optional["MethodConfig"], predictions: List[dict], output_dir: str,
                 base_reference: Optional[str]) -> None:
    """adapter/ or model/ (see the module docstring) and predictions.jsonl."""
    from gpt2lite.peft import save_adapter

    os.makedirs(output_dir, exist_ok=True)
    if method is not None and method.name in ADAPTER_METHODS:
        save_adapter(model, os.path.join(output_dir, "adapter"), base_model_name_or_path=base_reference)
    elif method is not None:
        save_model(model, os.path.join(output_dir, "model"))
    if predictions:
        write_jsonl(os.path.join(output_dir, "predictions.jsonl"), predictions)


def save_model(model, directory: str) -> None:
    """A Hugging Face checkpoint (config.json, model.safetensors) and GPT-2's tokenizer files."""
    model.save_pretrained(directory)
    save_tokenizer_files(directory, model.config.n_positions)


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_text(path, text)


def load_for_inference(model: Optional[str], adapter: Optional[str], device: Optional[str] = None,
                       num_labels: Optional[int] = None):
    """(model, description): a full checkpoint (`model`), or a base model with `adapter` loaded into it;
    the base is `model` when given, else the adapter's base_model_name_or_path."""
    from gpt2lite.model.gpt2 import GPT2, GPT2ForSequenceClassification
    from gpt2lite.peft import load_adapter
    from gpt2lite.peft.adapter_io import read_adapter_config, resolve_adapter

    if model is None and adapter is None:
        raise ValueError("give --model (a checkpoint directory or hub id) or --adapter (an adapter directory)")
    description = f"model {model}"
    if adapter is not None:
        adapter = resolve_adapter(adapter)
        config = read_adapter_config(adapter)
        model = model or config.get("base_model_name_or_path")
        if not model:
            raise ValueError(f"{adapter}/adapter_config.json names no base_model_name_or_path; pass the base with "
                             "--model DIR_OR_HUB_ID")
        num_labels = num_labels or adapter_num_labels(adapter)
        description = f"adapter {adapter} on base {model}"
    cls = GPT2ForSequenceClassification if num_labels or _is_classifier(model) else GPT2
    loaded = cls.from_pretrained(model, **({"num_labels": num_labels} if num_labels else {}))
    if adapter is not None:
        load_adapter(loaded, adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return loaded.to(device).eval(), description


def _is_classifier(model: str) -> bool:
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return False
    return any(a.endswith("ForSequenceClassification") for a in json.load(open(path)).get("architectures") or [])


def adapter_num_labels(adapter: str) -> Optional[int]:
    """A classifier adapter's number of labels (rows of its saved score head), or None."""
    from safetensors import safe_open

    path = os.path.join(adapter, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return None
    with safe_open(path, "pt") as f:
        for key in f.keys():
            if key.endswith("score.weight"):
                return f.get_slice(key).get_shape()[0]
    return None


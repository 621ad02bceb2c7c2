"""`gpt2lite generate`: prompts in, predictions out, from a fine-tuned model or adapter.

A prompt is wrapped as the run that trained the model wrapped its inputs: finetune writes its options to
config.yaml beside adapter/ and model/, and generate reads data.template and data.input_column from there
unless --template / --column are given.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch

from ..experiment import generate_texts
from ..tasks import DEFAULT_TEMPLATE, load_table
from ..tasks.loading import as_list, require_columns
from ..tasks.summarization import PromptTemplate
from ..tokenizer import Tokenizer
from .pipeline import load_for_inference, write_jsonl

RUN_CONFIG = "config.yaml"


def run_config(directory: Optional[str]) -> dict:
    """The options of the run that wrote `directory` (its config.yaml, one or two levels up), or {}."""
    if directory is None or not os.path.isdir(directory):
        return {}
    here = os.path.abspath(directory)
    for parent in (os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        path = os.path.join(parent, RUN_CONFIG)
        if os.path.isfile(path):
            import yaml

            with open(path) as f:
                return yaml.safe_load(f) or {}
    return {}


def wrap(text: str, template: Optional[str]) -> str:
    """The prompt for `text`: a summarization template's part before its target, or "{text}" filled in."""
    if template is None:
        return text
    if "{summary}" in template:
        parsed = PromptTemplate.parse(template)
        return parsed.head + text.strip() + parsed.middle
    if template.count("{text}") != 1:
        raise ValueError(f"--template must hold '{{article}}' and '{{summary}}', or '{{text}}' once; got {template!r}")
    return template.replace("{text}", text)


def read_prompts(prompt: Optional[str], prompts: Optional[str], column: str) -> List[str]:
    """The prompt, or the prompts of a .txt file (one per non-empty line) or a table's `column`."""
    if (prompt is None) == (prompts is None):
        raise ValueError("give either --prompt TEXT or --prompts FILE")
    if prompt is not None:
        return [prompt]
    if prompts.endswith(".txt"):
        with open(prompts, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        table = load_table(data_files=prompts)
        require_columns(table, [column], prompts)
        texts = [t for t in as_list(table, column) if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"{prompts} holds no prompt")
    return texts


def generate_from_prompts(model, adapter, prompt, prompts, column, template, generation, output, batch_size,
                          device) -> List[dict]:
    options = run_config(adapter or model).get("data") or {}
    if template is None and options:
        template = options.get("template") or (DEFAULT_TEMPLATE if options.get("task") == "summarization" else None)
    column = column or options.get("input_column") or "prompt"
    texts = read_prompts(prompt, prompts, column)
    loaded, description = load_for_inference(model, adapter, device)
    tokenizer = Tokenizer()
    room = loaded.config.n_positions - getattr(loaded, "num_virtual_tokens", 0) - generation.max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={generation.max_new_tokens} leaves no room for a prompt in the "
                         f"context of {loaded.config.n_positions}")
    ids = [tokenizer.encode(wrap(text, template))[-room:] for text in texts]  # keep each prompt's end
    if hasattr(loaded, "score"):  # a classifier: the predicted class id
        predictions = _classify(loaded, ids, tokenizer, batch_size)
    else:
        predictions = generate_texts(loaded, ids, tokenizer, generation, batch_size)
    rows = [{"prompt": text, "prediction": prediction} for text, prediction in zip(texts, predictions)]
    print(f"{description}; template {template!r}", flush=True)
    for number, row in enumerate(rows):
        print(f"\n### {number}\n{row['prediction']}", flush=True)
    if output is not None:
        write_jsonl(output, rows)
    return rows


@torch.no_grad()
def _classify(model, ids, tokenizer, batch_size: int) -> List[int]:
    from ..tokenizer import pad_batch

    device = next(model.parameters()).device
    classes = []
    for start in range(0, len(ids), batch_size):
        batch = pad_batch(ids[start:start + batch_size], tokenizer.pad_id, "right")
        logits = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        classes += logits.argmax(-1).tolist()
    return classes

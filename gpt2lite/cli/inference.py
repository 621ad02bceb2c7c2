"""`gpt2lite generate`: prompts in, predictions out, from a fine-tuned model or adapter.

A prompt is built as the run that trained the model built its inputs: finetune writes its options to
config.yaml beside adapter/ and model/, and generate reads data.template, data.input_column and
data.max_length from there unless --template / --column are given; so the test sources of a run give
exactly the run's predictions.jsonl.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch

from gpt2lite.tasks.splits import DEFAULT_COLUMNS
from gpt2lite.tasks.builders import generate_texts
from gpt2lite.tasks import DEFAULT_TEMPLATE, build_generation_prompts, load_table
from gpt2lite.tasks.loading import as_list, require_columns
from gpt2lite.tokenizer import Tokenizer
from gpt2lite.experiment.outputs import load_for_inference, write_jsonl

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


def prompt_ids(texts: List[str], template: Optional[str], tokenizer, max_length: int, max_new_tokens: int):
    """Token ids of each prompt, built as training built them: a summarization template's part before the
    target (source truncated to fit, as in tasks.summarization), or "{text}" filled in (its end kept)."""
    if template is not None and "{summary}" in template:
        rows = [{"source": text, "target": "-"} for text in texts]
        prompts = build_generation_prompts(rows, tokenizer, "source", "target", template, max_length, max_new_tokens)
        return [row["input_ids"] for row in prompts.rows]
    if template is not None and template.count("{text}") != 1:
        raise ValueError(f"--template must hold '{{article}}' and '{{summary}}', or '{{text}}' once; got {template!r}")
    room = max_length - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {max_length} positions")
    wrapped = texts if template is None else [template.replace("{text}", text) for text in texts]
    return [tokenizer.encode(text)[-room:] for text in wrapped]


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
        require_columns(table, [column], prompts, hint="Name the prompts' column with --column")
        texts = [t for t in as_list(table, column) if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"{prompts} holds no prompt")
    return texts


def generate_from_prompts(model, adapter, prompt, prompts, column, template, generation, output, batch_size,
                          device) -> List[dict]:
    options = run_config(adapter or model).get("data") or {}
    if template is None and options:
        template = options.get("template") or (DEFAULT_TEMPLATE if options.get("task") == "summarization" else None)
    column = column or options.get("input_column") or DEFAULT_COLUMNS.get(options.get("task"), ("prompt",))[0]
    texts = read_prompts(prompt, prompts, column)
    loaded, description = load_for_inference(model, adapter, device)
    tokenizer = Tokenizer()
    context = loaded.config.n_positions - getattr(loaded, "num_virtual_tokens", 0)
    max_length = min(options.get("max_length") or context, context)
    ids = prompt_ids(texts, template, tokenizer, max_length, generation.max_new_tokens)
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
    from gpt2lite.tokenizer import pad_batch

    device = next(model.parameters()).device
    classes = []
    for start in range(0, len(ids), batch_size):
        batch = pad_batch(ids[start:start + batch_size], tokenizer.pad_id, "right")
        logits = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        classes += logits.argmax(-1).tolist()
    return classes

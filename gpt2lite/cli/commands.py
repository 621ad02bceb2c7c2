"""The subcommands of `gpt2lite`: each is a typed function whose parameters become its flags (gpt2lite.cli.parser).

    gpt2lite finetune --data.train my.jsonl --method.name lora --train.output_dir runs/mine
    gpt2lite generate --adapter runs/mine/adapter --prompt "A long article ..."
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Tuple

from gpt2lite.tasks.splits import DataConfig, load_splits
from gpt2lite.generation.decoding import GenerationConfig
from gpt2lite.peft import MethodConfig
from gpt2lite.experiment.pretrain import PretrainConfig
from gpt2lite.experiment.search import SearchConfig
from gpt2lite.seed import seed_everything
from gpt2lite.training.config import TrainConfig
from gpt2lite.cli.pipeline import MethodRun

DEFAULT_RUNS = (MethodRun(), MethodRun(MethodConfig(name="full")), MethodRun(MethodConfig(name="lora")))


def finetune(model: str = "gpt2", data: DataConfig = DataConfig(), method: MethodConfig = MethodConfig(name="lora"),
             train: TrainConfig = TrainConfig(output_dir="runs/finetune"),
             generation: GenerationConfig = GenerationConfig(), search: SearchConfig = SearchConfig(),
             fallback: bool = False, fallback_model: str = "pretrained",
             pretrain: PretrainConfig = PretrainConfig()) -> dict:
    """Fine-tune one method on one task; write the adapter (or model), predictions.jsonl and a report.

    Args:
        model: the base model: a hub id (gpt2, EleutherAI/gpt-neo-125M) or a checkpoint directory.
        data: the task and its data.
        method: the fine-tuning method and its options.
        train: the training run; everything is written to train.output_dir.
        generation: how test predictions are generated (summarization, language modelling).
        search: an Optuna search of the method's hyperparameters before the final run.
        fallback: where the model or the hub dataset cannot be had (offline), use the library's offline
            fallback model and corpus instead of failing (the report says so).
        fallback_model: that fallback model: "pretrained" (a small GPT-2 pretrained offline on the Python
            standard library's docstrings, cached; see --pretrain) or "random" (random init, the tiny preset).
        pretrain: how the "pretrained" fallback is pretrained (the first run; later runs load it from the cache).
    """
    return _train_and_report([MethodRun(method)], model, data, train, generation, search,
                             _fallback(fallback, fallback_model, pretrain), nested=False,
                             title=f"{data.task}: {method.name}")


def compare(model: str = "gpt2", data: DataConfig = DataConfig(), runs: Tuple[MethodRun, ...] = DEFAULT_RUNS,
            train: TrainConfig = TrainConfig(output_dir="runs/compare"),
            generation: GenerationConfig = GenerationConfig(), search: SearchConfig = SearchConfig(),
            fallback: bool = False, fallback_model: str = "pretrained", pretrain: PretrainConfig = PretrainConfig(),
            title: Optional[str] = None) -> dict:
    """Several methods on one task, each in train.output_dir/<label>/; one report compares them.

    Args:
        model: the base model: a hub id or a checkpoint directory.
        data: the task and its data.
        runs: the methods compared, e.g. '[{method: null, label: none}, {method: {name: lora, rank: 8}, lr: 1e-3}]'.
        train: shared training settings (a run's lr overrides train.lr).
        generation: how test predictions are generated.
        search: an Optuna search of each method's hyperparameters before its final run.
        fallback: offline, use the library's fallback model and corpus instead of failing.
        fallback_model: "pretrained" (a small GPT-2 pretrained offline, cached) or "random".
        pretrain: how the "pretrained" fallback is pretrained.
        title: the report's title.
    """
    labels = [run.name for run in runs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"runs share the label(s) {duplicates}; give each run its own `label`")
    if not runs:
        raise ValueError("no runs to compare: give --runs")
    return _train_and_report(list(runs), model, data, train, generation, search,
                             _fallback(fallback, fallback_model, pretrain), nested=True,
                             title=title or f"{data.task}: {', '.join(labels)}")


def _fallback(fallback: bool, fallback_model: str, pretrain: PretrainConfig):
    """None (no fallback), "random", or the PretrainConfig of the offline-pretrained fallback model."""
    if fallback_model not in ("pretrained", "random"):
        raise ValueError(f"fallback_model must be 'pretrained' or 'random', got {fallback_model!r}")
    if not fallback:
        return None
    return pretrain if fallback_model == "pretrained" else "random"


def _train_and_report(runs, model, data, train, generation, search, fallback, nested: bool, title: str) -> dict:
    from gpt2lite.experiment.report import write_report
    from gpt2lite.cli.pipeline import prepare, run_one

    started = time.perf_counter()
    seed_everything(train.seed)  # before the base model is built: a classifier's new score head is random
    prepared = prepare(model, data, generation, [run.method for run in runs], fallback, seed=train.seed)
    print("\n".join(prepared.notes), flush=True)
    rows = []
    for index, run in enumerate(runs):
        output_dir = os.path.join(train.output_dir, run.name) if nested else train.output_dir
        print(f"\n=== {run.name}: {_describe(run.method)}", flush=True)
        new_rows = run_one(run, prepared, train, output_dir, search, reference_dir=train.output_dir,
                           last_use=index == len(runs) - 1)
        if new_rows:  # none: a search worker whose last trial was not the search's last
            print(f"    {_summary_line(new_rows[-1])}; outputs in {output_dir}", flush=True)
        rows += new_rows
    if not rows:
        return {"rows": [], "paths": {}}
    paths = write_report(rows, train.output_dir, prepared.task.kind, title=title,
                         random_init=prepared.base.random_init, notes=prepared.notes)
    print("\n" + open(paths["md"]).read())
    print(f"wrote {', '.join(sorted(paths.values()))} ({time.perf_counter() - started:.0f}s)")
    return {"rows": rows, "paths": paths}


def _describe(method: Optional[MethodConfig]) -> str:
    """The method's name and the options that differ from their defaults."""
    if method is None:
        return "no fine-tuning (evaluation only)"
    changed = [f"{f.name}={getattr(method, f.name)!r}" for f in dataclasses.fields(method)[1:]
               if getattr(method, f.name) != f.default]
    return f"{method.name} {' '.join(changed)}".strip()


def _summary_line(row: dict) -> str:
    keys = ("best_val_loss", "rougeL", "perplexity", "accuracy", "trainable_params")
    return ", ".join(f"{k} {row[k]:.4g}" if isinstance(row[k], float) else f"{k} {row[k]:,}"
                     for k in keys if isinstance(row.get(k), (int, float)))


def evaluate(model: Optional[str] = None, adapter: Optional[str] = None, data: DataConfig = DataConfig(),
             generation: GenerationConfig = GenerationConfig(), output_dir: str = "runs/evaluate",
             batch_size: int = 8, device: Optional[str] = None) -> dict:
    """Score a model (or a base model with an adapter) on a task's test split; write predictions and a report.

    Args:
        model: a checkpoint directory or hub id (with --adapter: the base, default the adapter's own).
        adapter: an adapter directory (or hub id) to load into the model.
        data: the task and its data (the test split is scored, the validation loss reported).
        generation: how test predictions are generated.
        output_dir: where report.{md,csv,json} and predictions.jsonl go.
        batch_size: examples per batch for the validation loss.
        device: cpu, cuda, cuda:1 (default: cuda when available).

    The process is seeded with data.seed, so sampled generations (temperature > 0) repeat.
    """
    from gpt2lite.tasks.builders import build_task, infer_num_labels
    from gpt2lite.experiment.report import method_row, write_report
    from gpt2lite.tasks import collate
    from gpt2lite.tokenizer import Tokenizer
    from gpt2lite.training.evaluation import evaluate_loss
    from gpt2lite.experiment.outputs import load_for_inference, write_jsonl

    seed_everything(data.seed)  # generation with temperature > 0 samples
    splits = load_splits(data)
    num_labels = (data.num_labels or infer_num_labels(splits)) if data.task == "classification" else None
    loaded, description = load_for_inference(model, adapter, device, num_labels)
    context = loaded.config.n_positions - getattr(loaded, "num_virtual_tokens", 0)
    task = build_task(dataclasses.replace(data, num_labels=num_labels), splits, Tokenizer(), context, generation)
    quality, predictions = task.evaluate(loaded)
    summary = {"best_val_loss": evaluate_loss(loaded, task.validation, collate, batch_size)}
    row = method_row(os.path.basename(os.path.normpath(adapter or model)), summary, loaded, quality)
    notes = [description, f"data: {splits.description}"]
    paths = write_report([row], output_dir, task.kind, title=f"Evaluation: {description}", notes=notes, plots=False)
    if predictions:
        write_jsonl(os.path.join(output_dir, "predictions.jsonl"), predictions)
    print("\n".join(notes) + "\n\n" + open(paths["md"]).read(), flush=True)
    return {"rows": [row], "paths": paths}


def generate(model: Optional[str] = None, adapter: Optional[str] = None, prompt: Optional[str] = None,
             prompts: Optional[str] = None, column: Optional[str] = None, template: Optional[str] = None,
             generation: GenerationConfig = GenerationConfig(), output: Optional[str] = None, batch_size: int = 8,
             device: Optional[str] = None) -> list:
    """Generate from a fine-tuned model (--model DIR) or adapter (--adapter DIR) for one prompt or a file of them.

    Args:
        model: a checkpoint directory or hub id (with --adapter: the base, default the adapter's own).
        adapter: an adapter directory written by finetune (or by peft), or a hub id.
        prompt: one prompt.
        prompts: a file of prompts: .txt (one per line) or .jsonl/.json/.csv (the `column` of each row).
        column: the column of a prompts table; default: the run's data.input_column, else "prompt".
        template: how a prompt is wrapped: a summarization template ("{article}...{summary}": the part before
            "{summary}") or a text holding "{text}"; default: the run's template (its config.yaml), else none.
        generation: how tokens are picked (greedy by default).
        output: a .jsonl file for {"prompt", "prediction"} rows (they are printed as well).
        batch_size: prompts per batch.
        device: cpu, cuda, cuda:1 (default: cuda when available).
    """
    from gpt2lite.cli.inference import generate_from_prompts

    return generate_from_prompts(model, adapter, prompt, prompts, column, template, generation, output,
                                 batch_size, device)


def merge(adapter: str, output: str, model: Optional[str] = None) -> str:
    """Fold a LoRA adapter into its base model's weights and write a plain Hugging Face checkpoint.

    Args:
        adapter: a LoRA adapter directory (or hub id).
        output: the directory of the merged checkpoint (config.json, model.safetensors, tokenizer files).
        model: the base model; default: the adapter's base_model_name_or_path.
    """
    from gpt2lite.peft import merge_and_unload
    from gpt2lite.peft.adapter_io import read_adapter_config, resolve_adapter
    from gpt2lite.peft.lora.add import lora_layers
    from gpt2lite.experiment.outputs import load_for_inference, save_model

    loaded, description = load_for_inference(model, adapter, device="cpu")
    if not lora_layers(loaded):
        kind = read_adapter_config(resolve_adapter(adapter)).get("peft_type")
        raise ValueError(f"{adapter} holds a {kind} adapter; only LoRA merges into the weights (prompt, prefix and "
                         "IA3 adapters are loaded beside the base model instead: gpt2lite generate --adapter)")
    save_model(merge_and_unload(loaded), output)
    print(f"merged {description} into {output}", flush=True)
    return output

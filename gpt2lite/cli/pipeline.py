"""The work behind the subcommands: base model and data, one run per method, the files a run leaves
(experiment.outputs says which). When the base model cannot be named (the offline random-init fallback), it
is written to base_model/ and the adapters point there, so that they can still be loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from gpt2lite.experiment.base_model import BaseModel, load_base_model
from gpt2lite.tasks.splits import DataConfig, load_splits
from gpt2lite.experiment.runs import run_method
from gpt2lite.generation.decoding import GenerationConfig
from gpt2lite.peft import MethodConfig
from gpt2lite.experiment.search import SearchConfig, run_search, space_for
from gpt2lite.tasks.builders import build_task, infer_num_labels, virtual_positions
from gpt2lite.tasks import subset
from gpt2lite.tokenizer import Tokenizer
from gpt2lite.training.config import TrainConfig
from gpt2lite.experiment.outputs import ADAPTER_METHODS, save_outputs
from gpt2lite.hub.tokenizer_files import save_tokenizer_files

@dataclass(frozen=True)
class MethodRun:
    """One row of a comparison: a method (None: no fine-tuning) and what differs from the shared settings."""

    method: Optional[MethodConfig] = None  # None: the base model, evaluated without training
    label: Optional[str] = None  # the row's name and output subdirectory; None: the method's name or "none"
    lr: Optional[float] = None  # None: train.lr
    merged_row: bool = False  # LoRA: also score the adapter merged into the weights (it must score the same)

    @property
    def name(self) -> str:
        return self.label or (self.method.name if self.method else "none")


@dataclass
class Prepared:
    """What every run of one command shares."""

    base: BaseModel
    base_reference: Optional[str]  # hub id or directory of the base weights (None: not written yet)
    task: object
    data: DataConfig
    notes: List[str]


def prepare(model: str, data: DataConfig, generation: GenerationConfig, methods: Sequence, fallback,
            seed: int = 0) -> Prepared:
    """Load the data and the base model, and build the task with room for the methods' virtual tokens.
    fallback: None (fail offline), "random" (a random-init tiny model offline) or a PretrainConfig (a small
    model pretrained offline, cached)."""
    splits = load_splits(data, allow_fallback=fallback is not None)
    num_labels = None
    if data.task == "classification":
        num_labels = data.num_labels or infer_num_labels(splits)
        data = dataclasses.replace(data, num_labels=num_labels)
    base = load_base_model(model, num_labels=num_labels, allow_random_init=fallback is not None, seed=seed,
                           fallback_pretrain=None if fallback in (None, "random") else fallback,
                           load_options=shared_load_options(methods))
    reference = None
    if not base.random_init and base.description == f"pretrained weights: {model}":
        reference = os.path.abspath(model) if os.path.isdir(model) else model
    context = base.model.config.n_positions - max([virtual_positions(m) for m in methods] or [0])
    task = build_task(data, splits, Tokenizer(), context, generation)
    notes = [f"model: {base.description}", f"data: {splits.description}",
             f"examples: {len(task.train)} train, {len(task.validation)} validation, {task.test_size} test"]
    return Prepared(base, reference, task, data, notes)


def shared_load_options(methods: Sequence) -> dict:
    """The base's from_pretrained options when every run asks for the same (all QLoRA: the base is read in
    4 bits, never in float); else {} (a float base, and each QLoRA run reads its own 4-bit copy)."""
    options = [method.load_options() if method is not None else {} for method in methods]
    return options[0] if options and all(o == options[0] for o in options) else {}


def base_reference(prepared: Prepared, output_dir: str) -> str:
    """The base model's hub id or directory; a base that cannot be named is written to output_dir/base_model."""
    if prepared.base_reference is None:
        directory = os.path.abspath(os.path.join(output_dir, "base_model"))
        prepared.base.model.save_pretrained(directory)
        save_tokenizer_files(directory, prepared.base.model.config.n_positions)
        prepared.base_reference = directory
    return prepared.base_reference


def train_config_for(run: MethodRun, train: TrainConfig, output_dir: str) -> TrainConfig:
    changes = {"output_dir": output_dir}
    if run.lr is not None:
        changes["lr"] = run.lr
    return dataclasses.replace(train, **changes)


def run_one(run: MethodRun, prepared: Prepared, train: TrainConfig, output_dir: str, search: SearchConfig,
            reference_dir: str, last_use: bool = False) -> List[dict]:
    """Train (or search, then train) one method in output_dir, save what it produced, return its report
    rows (two with merged_row). last_use: no later run needs the base, so this one trains the base itself
    rather than a copy of it (a QLoRA finetune then holds one 4-bit model, not two)."""
    config = train_config_for(run, train, output_dir)
    adapter = run.method is not None and run.method.name in ADAPTER_METHODS
    reference = base_reference(prepared, reference_dir) if adapter else None  # written before the base trains
    if search.trials and run.method is not None:
        result = search_method(run, prepared, config, search)
        if result is None:  # another worker of the search writes this method's outputs
            return []
    else:
        result = run_method(run.name, run.method, prepared.base, prepared.task, config, sampler_seed=train.seed,
                            copy_base=not last_use)
    save_outputs(result.model, run.method, result.predictions, output_dir, reference)
    rows = [result.row]
    if run.merged_row:
        rows.append(merged_row(run, result, prepared))
    return rows


def merged_row(run: MethodRun, result, prepared: Prepared) -> dict:
    """The report row of the run's LoRA merged into the weights (merge_and_unload)."""
    from gpt2lite.peft import merge_and_unload
    from gpt2lite.experiment.report import method_row

    if run.method is None or run.method.name not in ("lora", "qlora"):
        raise ValueError(f"run {run.name!r}: merged_row needs a lora or qlora method")
    merged = merge_and_unload(result.model)
    quality, _ = prepared.task.evaluate(merged)
    return method_row(f"{run.name} merged", result.summary, merged, quality, random_init=prepared.base.random_init,
                      base_kind=prepared.base.kind)


def search_method(run: MethodRun, prepared: Prepared, config: TrainConfig, search: SearchConfig):
    """Optuna trials of one method (each in config.output_dir/trial_<n>/, the study in search.storage); the
    best trial's model, or with retrain_best_model the best configuration trained again on the whole
    training split. None in a worker that did not finish the search's last trial: that one writes the result."""
    space = space_for(run.method.name)
    cap = search.train_samples or prepared.data.max_train_samples
    trial_task = copy.copy(prepared.task)
    trial_task.train = copy.copy(prepared.task.train)
    if cap is not None:
        trial_task.train.rows = subset(prepared.task.train.rows, 1.0, cap, prepared.data.seed)

    def configured(params, output_dir):
        options = {k: v for k, v in params.items() if k in ("rank", "alpha", "dropout")}
        method = dataclasses.replace(run.method, **options)
        return method, dataclasses.replace(config, output_dir=output_dir, lr=params["lr"], epochs=params["epochs"])

    def objective(params, trial_dir, report):
        method, trial_config = configured(params, trial_dir)

        def on_log(record):  # each evaluation's loss goes to the pruner, which may stop the trial here
            if record["type"] == "eval":
                report(record["val_loss"], record["step"])

        result = run_method(run.name, method, prepared.base, trial_task, trial_config, sampler_seed=config.seed,
                            evaluate=False, on_log=on_log)
        value = result.row["best_val_loss"]
        print(f"    {run.name} trial {os.path.basename(trial_dir)}: {params} -> val loss {value}", flush=True)
        return value

    model_id = prepared.base_reference if prepared.base.kind == "pretrained" else prepared.base.kind
    study_name = search.study_name or f"{run.name}:{prepared.data.task}:{model_id}"
    found = run_search(objective, search.trials, config.output_dir, space=space, seed=config.seed,
                       storage=search.storage, study_name=study_name, pruner=search.pruner,
                       heartbeat_s=search.heartbeat_s)
    print(open(os.path.join(config.output_dir, "search.md")).read(), flush=True)
    if not found["last_worker"]:
        print(f"{run.name}: the search's last trial finished in another worker, which writes the best model "
              "and the report", flush=True)
        return None
    print(f"{run.name}: best trial {found['best_trial']}: {found['best_params']} "
          f"(val loss {found['best_value']:.4f})", flush=True)
    method, best_config = configured(found["best_params"], os.path.join(config.output_dir, "best_model"))
    if search.retrain_best_model:
        return run_method(f"{run.name} (best trial, retrained)", method, prepared.base, prepared.task, best_config,
                          sampler_seed=config.seed)
    return best_trial_result(run, prepared, method, config, found)


def best_trial_result(run: MethodRun, prepared: Prepared, method: MethodConfig, config: TrainConfig, found: dict):
    """The best trial's model rebuilt from its folder (it may have run in another process), scored on the
    test split."""
    from gpt2lite.training.checkpoint import load_trainable
    from gpt2lite.experiment.runs import MethodResult
    from gpt2lite.peft import apply
    from gpt2lite.experiment.report import method_row

    trial_dir = os.path.join(config.output_dir, f"trial_{found['best_trial']}")
    if not os.path.isfile(os.path.join(trial_dir, "summary.json")):
        raise FileNotFoundError(f"{trial_dir}/summary.json is missing: the best trial ran on another machine? "
                                "Run this command where its folder is, or add --search.retrain_best_model true")
    with open(os.path.join(trial_dir, "summary.json")) as f:
        summary = {**json.load(f), "best_val_loss": found["best_value"]}
    model = copy.deepcopy(prepared.base.model)
    apply(model, method)
    load_trainable(model, os.path.join(trial_dir, os.path.basename(summary["model_file"])))
    model.to(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quality, predictions = prepared.task.evaluate(model)
    row = method_row(f"{run.name} (best trial)", summary, model, quality, random_init=prepared.base.random_init,
                     base_kind=prepared.base.kind)
    return MethodResult(row, model, summary, predictions)

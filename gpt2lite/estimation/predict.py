"""`estimate(...)`: a run's peak memory, predicted without allocating its model or reading its weights.

    from gpt2lite.estimation import estimate
    result = estimate("gpt2-xl", MethodConfig(name="lora"), TrainConfig(batch_size=4), DataConfig(max_length=512))
    result.peak_memory_mb, result.parts      # the predicted peak and what it is made of, in MB

The model's config.json (or a preset's fields) is all that is read. The run's model and method are built on
fake tensors and one optimizer step of the run's batch shape is traced (estimation/trace.py). On the CPU the
prediction is the process's peak resident set: the tensors' peak plus the baseline of a training process
without tensors (Python, torch, thread pools: estimation/baseline.py, measured once and cached); on CUDA it
is the peak of torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from gpt2lite.model.config import GPT2Config
from gpt2lite.tasks.splits import DataConfig
from gpt2lite.peft import METHODS, MethodConfig
from gpt2lite.training.config import TrainConfig
from gpt2lite.estimation.trace import StepShape, StepTrace, trace_step

logger = logging.getLogger(__name__)
MB = 2**20


@dataclass
class Run:
    """What the estimate needs of a run: the model's config and kind, the method, the step's shape."""

    model: str
    config: GPT2Config
    config_source: str  # where the config came from
    method: MethodConfig
    train: TrainConfig
    shape: StepShape
    device: torch.device
    precision: str
    num_labels: Optional[int] = None  # a classifier's labels


@dataclass
class Estimate:
    """A run's predicted memory. parts: MB (trainable_params, total_params: counts); peak_memory_mb: CPU: the
    process's peak resident set (baseline included), CUDA: max allocated."""

    model: str
    method: str
    device: str
    precision: str
    batch_size: int
    seq_len: int
    grad_accum: int
    activation_checkpointing: bool
    peak_memory_mb: float
    parts: Dict[str, float]
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_config(model: str):
    """(GPT2Config, where it came from) for a checkpoint directory, a hub id (its config.json alone: from
    huggingface_hub's cache, else downloaded when the hub is reachable) or a preset name."""
    from gpt2lite.hub.pretrained import looks_like_path, read_config, resolve

    if os.path.isdir(model) or looks_like_path(model):
        return read_config(resolve(model)), f"{model}/config.json"
    path = hub_config_file(model)
    if path is not None:
        return read_config(os.path.dirname(path)), f"{model}'s config.json ({path})"
    try:
        return GPT2Config.from_name(model), f"gpt2lite's {model.split('/')[-1]!r} preset (no config.json reachable)"
    except ValueError:
        raise ValueError(f"cannot estimate {model!r}: it is no directory, its config.json is neither cached nor "
                         "reachable on the Hugging Face Hub, and it is no preset (gpt2, gpt2-medium, gpt2-large, "
                         "gpt2-xl, ...); pass a directory holding config.json") from None


def hub_config_file(model: str) -> Optional[str]:
    """The path of a hub id's config.json: huggingface_hub's cached copy, else downloaded (the file alone)
    when the hub is reachable; None when neither."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from gpt2lite.hub.pretrained import hub_reachable

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a valid repo id
        return None
    if isinstance(cached, str):
        return cached
    if not hub_reachable():
        return None
    try:
        return hf_hub_download(model, "config.json")
    except Exception as error:  # no such repo, no config.json in it: the preset or the error instead
        logger.info("no config.json for %r on the hub: %s: %s", model, type(error).__name__, error)
        return None


def describe_run(model: str, method, train: TrainConfig, data: DataConfig) -> Run:
    """The Run of `gpt2lite finetune` with these options (the method checked, the sequence length chosen)."""
    from gpt2lite.training.precision import resolve_precision
    from gpt2lite.tasks.builders import virtual_positions

    if isinstance(method, str) and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    method = MethodConfig.from_value(method)
    if method.name not in METHODS:
        raise ValueError(f"unknown method {method.name!r}; choose one of {METHODS}")
    config, source = model_config(model)
    context = config.n_positions - virtual_positions(method)
    seq_len = min(data.max_length or context, context)
    device = torch.device(train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    num_labels = (data.num_labels or 2) if data.task == "classification" else None
    return Run(model, config, source, method, train, StepShape(train.batch_size, seq_len, train.grad_accum), device,
               resolve_precision(train.precision, device), num_labels)


def model_builder(run: Run):
    """A function building the run's model with its method applied (called on fake tensors)."""
    from gpt2lite.model.gpt2 import GPT2, GPT2ForSequenceClassification
    from gpt2lite.peft import apply

    def build():
        model = GPT2ForSequenceClassification(run.config, run.num_labels) if run.num_labels else GPT2(run.config)
        return apply(model, run.method)

    return build


def trace(run: Run, forward_only: bool = False) -> StepTrace:
    return trace_step(model_builder(run), run.shape, run.train, run.device, run.precision, forward_only)


def estimate(model: str = "gpt2", method=MethodConfig(name="lora"), train: TrainConfig = TrainConfig(),
             data: DataConfig = DataConfig()) -> Estimate:
    """The predicted peak memory of `gpt2lite finetune` with these options, and its parts (see Estimate).

    model: a checkpoint directory, a hub id or a preset name (only config.json is read); method: a
    MethodConfig, a dict of its fields or a method name; train: batch_size, grad_accum, precision, device,
    activation_checkpointing and the optimizer's settings are read; data: max_length (default: the model's
    context), task and num_labels (a classifier)."""
    return estimate_run(describe_run(model, method, train, data))


def estimate_run(run: Run, both_settings: bool = True) -> Estimate:
    """The Estimate of a described run; both_settings: also trace the forward pass with activation
    checkpointing switched the other way, for its activations (else that part repeats the run's)."""
    step = trace(run)
    checkpointing = run.train.activation_checkpointing
    other = None
    if both_settings:
        other = trace(dataclasses.replace(run, train=dataclasses.replace(
            run.train, activation_checkpointing=not checkpointing)), forward_only=True)
    parts = {
        "weights_float_mb": step.weights_float / MB, "weights_4bit_mb": step.weights_4bit / MB,
        "trainable_params": step.trainable_params, "total_params": step.total_params,
        "gradients_mb": step.gradients / MB, "optimizer_state_mb": step.optimizer_state / MB,
        "activations_mb": step.activations / MB,
        "activations_checkpointing_mb": activations_mb(step if checkpointing else other),
        "activations_no_checkpointing_mb": activations_mb(other if checkpointing else step),
        "loss_buffers_mb": step.loss_buffers / MB,
        "at_peak_mb": {name: value / MB for name, value in step.parts_at_peak.items()},
        "tensors_peak_mb": step.peak_bytes / MB,
    }
    notes = [f"model config: {run.config_source}",
             f"batch: {run.shape.batch_size} x {run.shape.seq_len} tokens, every position labelled, no padding "
             "(an upper bound for padded batches)"]
    if run.num_labels:
        notes.append(f"a classifier with {run.num_labels} labels")
    if run.device.type == "cuda":
        peak = step.peak_bytes / MB
        notes.append("CUDA: the prediction is torch.cuda.max_memory_allocated (the caching allocator reserves more)")
    else:
        from gpt2lite.estimation.baseline import baseline_mb, imports_mb
        from gpt2lite.estimation.heap import resident_peak, step_events

        parts["resident_tensors_peak_mb"] = resident_peak(step_events(step)) / MB
        parts["baseline_mb"] = baseline_mb()
        parts["loading_peak_mb"] = imports_mb() + (step.weights_float + step.weights_4bit) / MB + loading_extra_mb(run)
        peak = max(parts["baseline_mb"] + parts["resident_tensors_peak_mb"], parts["loading_peak_mb"])
        notes.append("CPU: the prediction is the process's peak resident set: the Python + torch baseline plus the "
                     "step's tensors as glibc's heap holds them, or loading the checkpoint if that is higher")
    return Estimate(run.model, run.method.name, str(run.device), run.precision, run.shape.batch_size,
                    run.shape.seq_len, run.shape.grad_accum, checkpointing, peak, parts, notes)


def activations_mb(step: Optional[StepTrace]) -> Optional[float]:
    return None if step is None else step.activations / MB


def loading_extra_mb(run: Run) -> float:
    """What loading holds beyond the weights: the float copy of a Conv1D weight being transposed (the MLP's
    is the largest); QLoRA's quantize-on-load also holds the layer's blocks and codes while quantizing it."""
    layer_mb = run.config.n_embd * run.config.mlp_dim * 4 / MB
    return 3 * layer_mb if run.method.name == "qlora" else layer_mb

"""`gpt2lite estimate`: a run's predicted peak memory (and with --time its speed), before running it.

    gpt2lite estimate --model gpt2-xl --method.name lora --train.batch_size 8 --data.max_length 512
    gpt2lite estimate --config run.yaml --memory_budget 8GB      # the largest micro-batch that fits
    gpt2lite estimate --config run.yaml --time --format json
"""

from __future__ import annotations

import json
from typing import Optional

from gpt2lite.tasks.splits import DataConfig
from gpt2lite.generation.decoding import GenerationConfig
from gpt2lite.peft import MethodConfig
from gpt2lite.experiment.pretrain import PretrainConfig
from gpt2lite.experiment.search import SearchConfig
from gpt2lite.training.config import TrainConfig

ROWS = (  # (part, label); a part of None repeats at the peak
    ("weights_float_mb", "weights (float)"), ("weights_4bit_mb", "weights (4-bit)"),
    ("gradients_mb", "gradients"), ("optimizer_state_mb", "optimizer state (AdamW)"),
    ("activations_no_checkpointing_mb", "activations, no checkpointing"),
    ("activations_checkpointing_mb", "activations, with checkpointing"), ("loss_buffers_mb", "loss buffers"),
)


def estimate(model: str = "gpt2", data: DataConfig = DataConfig(), method: MethodConfig = MethodConfig(name="lora"),
             train: TrainConfig = TrainConfig(output_dir="runs/finetune"),
             generation: GenerationConfig = GenerationConfig(), search: SearchConfig = SearchConfig(),
             fallback: bool = False, fallback_model: str = "pretrained", pretrain: PretrainConfig = PretrainConfig(),
             memory_budget: Optional[str] = None, time: bool = False, time_steps: int = 3,
             format: str = "table") -> dict:
    """Predict the peak memory of `gpt2lite finetune` with these options, without loading the model.

    Args:
        model: a hub id, a checkpoint directory or a preset name (only its config.json is read).
        data: max_length (default: the model's context), task and num_labels are read.
        method: the fine-tuning method.
        train: batch_size, grad_accum, precision, device, activation_checkpointing and AdamW's settings.
        generation: as for finetune (not read: the estimate is of training).
        search: as for finetune (not read).
        fallback: as for finetune (not read).
        fallback_model: as for finetune (not read).
        pretrain: as for finetune (not read).
        memory_budget: e.g. 8GB: the largest micro-batch that fits (with the accumulation that keeps the global
            batch), or which options would make the run fit.
        time: also time a few real steps on random tokens (allocates the model): tokens/s and the run's time.
        time_steps: the steps --time measures (after one warm-up step).
        format: "table" or "json" (one JSON object).
    """
    from gpt2lite.estimation.budget import fit_budget, parse_size
    from gpt2lite.estimation.predict import describe_run, estimate_run

    if format not in ("table", "json"):
        raise ValueError(f"format must be 'table' or 'json', got {format!r}")
    run = describe_run(model, method, train, data)
    result = {"estimate": estimate_run(run).to_dict()}
    result["peak_memory_mb"] = result["estimate"]["peak_memory_mb"]
    if memory_budget is not None:
        result["budget"] = fit_budget(run, parse_size(memory_budget)).to_dict()
    if time:
        result["time"] = timing_report(run, data, train, time_steps)
    print(json.dumps(result, indent=1) if format == "json" else table(result), flush=True)
    return result


def timing_report(run, data: DataConfig, train: TrainConfig, steps: int) -> dict:
    """tokens/s, and the run's total time where the training set's size can be read."""
    from gpt2lite.estimation.timing import time_steps

    timing = time_steps(run, steps)
    report = {"step_s": timing.step_s, "tokens_per_s": timing.tokens_per_s, "steps_timed": steps}
    try:
        from gpt2lite.tasks.splits import load_splits

        examples = len(load_splits(data).train)
    except Exception as error:  # no data given, or not reachable: the speed alone
        report["note"] = f"no total time: the training set could not be read ({type(error).__name__}: {error})"
        return report
    epochs = train.epochs or 1
    report.update(train_examples=examples, epochs=epochs, steps=timing.steps_for(examples, epochs, train.max_steps),
                  total_s=timing.total_s(examples, epochs, train.max_steps))
    return report


def table(result: dict) -> str:
    estimate = result["estimate"]
    parts = estimate["parts"]
    lines = [f"{estimate['model']} {estimate['method']}, {estimate['precision']} on {estimate['device']}, "
             f"micro-batch {estimate['batch_size']} x {estimate['seq_len']} tokens x {estimate['grad_accum']} "
             f"accumulation, activation checkpointing {'on' if estimate['activation_checkpointing'] else 'off'}",
             f"{'trainable parameters':34s} {parts['trainable_params']:>14,d} of {parts['total_params']:,d}"]
    lines += [f"{label:34s} {parts[key]:>11,.1f} MB" for key, label in ROWS if parts.get(key) is not None]
    lines.append("at the peak: " + ", ".join(f"{name.replace('_', ' ')} {mb:,.0f}" for name, mb in parts["at_peak_mb"].items())
                 + " MB")
    if "baseline_mb" in parts:
        lines.append(f"{'Python + torch baseline':34s} {parts['baseline_mb']:>11,.1f} MB")
        lines.append(f"{'loading the checkpoint (peak)':34s} {parts['loading_peak_mb']:>11,.1f} MB")
    what = "peak resident set (RSS)" if "baseline_mb" in parts else "peak CUDA memory allocated"
    lines.append(f"{'predicted ' + what:34s} {estimate['peak_memory_mb']:>11,.1f} MB")
    lines += ["note: " + note for note in estimate["notes"]]
    if "budget" in result:
        lines += ["", f"memory budget {result['budget']['budget_mb']:,.0f} MB:"] + ["  " + l for l in result["budget"]["lines"]]
    if "time" in result:
        timing = result["time"]
        lines += ["", f"speed: {timing['tokens_per_s']:,.0f} tokens/s ({timing['step_s']:.2f} s per optimizer step)"]
        if "total_s" in timing:
            lines.append(f"the run: {timing['steps']} steps ({timing['train_examples']} examples x {timing['epochs']} "
                         f"epochs): about {timing['total_s'] / 60:.1f} min")
        else:
            lines.append(timing["note"])
    return "\n".join(lines)

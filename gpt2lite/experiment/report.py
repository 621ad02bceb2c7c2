"""The comparison report of one run of several methods: a table (markdown, CSV, JSON) and loss plots.

One row per method with the columns of the seed studies: efficiency (model size, trainable parameters,
training time, peak memory, best losses) and quality (generation scores, classification scores or
perplexity). When the model was randomly initialised (no pretrained weights could be loaded), every row
says that its quality numbers are not meaningful, and the markdown table opens with that warning; the
efficiency columns stay real. When it is the small model pretrained offline (gpt2lite.experiment.pretrain), every row
and the opening say so: the quality figures show that the methods work, they are not GPT-2 results.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from typing import Dict, List, Optional, Sequence

import torch

from gpt2lite.files import atomic_write, atomic_write_text
from gpt2lite.model.gpt2 import count_parameters

logger = logging.getLogger(__name__)

RANDOM_INIT_NOTE = "not meaningful (random-init model)"
OFFLINE_PRETRAINED_NOTE = "small offline-pretrained model, not GPT-2"

# (key, header) of the columns every report has, then those of each task
EFFICIENCY_COLUMNS = [
    ("method", "Method"),
    ("model_mb", "Model size (MB)"),
    ("checkpoint_mb", "Checkpoint (MB)"),
    ("trainable_params", "Trainable params"),
    ("total_params", "Total params"),
    ("trainable_pct", "Trainable %"),
    ("train_time_s", "Training time (s)"),
    ("steps", "Steps"),
    ("tokens_per_s", "Tokens/s"),
    ("peak_memory_mb", "Peak memory (MB)"),
    ("memory_kind", "Memory"),
    ("best_train_loss", "Best train loss"),
    ("best_val_loss", "Best val loss"),
]
GENERATION_COLUMNS = [("bleu", "BLEU"), ("sacrebleu", "SacreBLEU"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"),
                      ("rougeL", "ROUGE-L"), ("rougeLsum", "ROUGE-Lsum"), ("ter", "TER"), ("chrf", "chrF"),
                      ("meteor", "METEOR")]
QUALITY_COLUMNS = {
    "summarization": GENERATION_COLUMNS,
    "classification": [("accuracy", "Accuracy"), ("precision", "Precision (w)"), ("recall", "Recall (w)"),
                       ("f1", "F1 (w)"), ("macro_f1", "F1 (macro)")],
    # perplexity on the test texts, then the scores of their generated continuations
    "language_modeling": [("perplexity", "Test perplexity"), ("perplexity_stride", "PPL stride")] + GENERATION_COLUMNS,
}
NOTE_COLUMN = ("quality_note", "Quality")


def columns_for(task: str) -> List[tuple]:
    if task not in QUALITY_COLUMNS:
        raise ValueError(f"task must be one of {sorted(QUALITY_COLUMNS)}, got {task!r}")
    return EFFICIENCY_COLUMNS + QUALITY_COLUMNS[task] + [NOTE_COLUMN]


def model_size_mb(model: torch.nn.Module) -> float:
    """Memory held by the model's weights and buffers (shared tensors once; 4-bit weights at their size)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen and tensor.numel() > 0:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total / 2**20


def method_row(method: str, summary: Optional[dict] = None, model: Optional[torch.nn.Module] = None,
               quality: Optional[dict] = None, random_init: bool = False, base_kind: Optional[str] = None) -> dict:
    """One report row from train()'s summary, the model (for its size and parameter counts) and the
    quality scores (metrics.generation_metrics / classification_metrics / {"perplexity": ...}).
    base_kind: experiment.BaseModel.kind ("offline-pretrained" marks the quality columns as such)."""
    summary = summary or {}
    row: Dict[str, object] = {"method": method}
    if model is not None:
        trainable, total = count_parameters(model)
        row.update(model_mb=model_size_mb(model), trainable_params=trainable, total_params=total)
    for key in ("trainable_params", "total_params"):
        if summary.get(key) is not None:
            row[key] = summary[key]
    if row.get("total_params"):
        row["trainable_pct"] = 100.0 * row.get("trainable_params", 0) / row["total_params"]
    row.update(checkpoint_mb=summary.get("checkpoint_mb"), train_time_s=summary.get("wall_time_s"),
               steps=summary.get("steps"),
               tokens_per_s=summary.get("tokens_per_s"), peak_memory_mb=summary.get("peak_memory_mb"),
               best_train_loss=summary.get("best_train_loss"), best_val_loss=summary.get("best_val_loss"))
    row["memory_kind"] = "GPU max allocated" if torch.cuda.is_available() else "CPU peak RSS"
    row.update({k: v for k, v in (quality or {}).items() if k != "confusion_matrix"})
    if quality and "confusion_matrix" in quality:
        row["confusion_matrix"] = quality["confusion_matrix"]
    row["quality_note"] = RANDOM_INIT_NOTE if random_init else OFFLINE_PRETRAINED_NOTE \
        if base_kind == "offline-pretrained" else ""
    if "history" in summary:
        row["history"] = summary["history"]
    return row


def _format(key: str, value) -> str:
    if value is None:
        return "unavailable" if key in ("meteor", "macro_f1") else "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if key in ("trainable_params", "total_params"):
            return f"{int(value):,}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}" if abs(value) < 1e5 else f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def to_markdown(rows: Sequence[dict], task: str, title: str = "Comparison", random_init: bool = False,
                notes: Sequence[str] = ()) -> str:
    columns = columns_for(task)
    lines = [f"# {title}", ""]
    if random_init:
        lines += [f"> **Quality columns are {RANDOM_INIT_NOTE}.** No pretrained weights were loaded, so "
                  "the scores say nothing about GPT-2; only the efficiency columns are real.", ""]
    elif any(row.get("quality_note") == OFFLINE_PRETRAINED_NOTE for row in rows):
        lines += [f"> **Base: a {OFFLINE_PRETRAINED_NOTE}.** GPT-2 could not be loaded, so a few-million-parameter "
                  "model was pretrained for minutes on the Python standard library's docstrings: the quality "
                  "figures show that the methods work, they are not GPT-2 results.", ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    lines.append("| " + " | ".join(header for _, header in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_format(key, row.get(key)).replace("|", "/") for key, _ in columns) + " |")
    if task == "classification":
        lines += [line for row in rows for line in per_class_markdown(row)]
    return "\n".join(lines) + "\n"


def per_class_markdown(row: dict) -> List[str]:
    """A row's per-class table (scikit-learn's classification_report as markdown), or why there is none."""
    title = f"## Per-class scores: {row['method']}"
    if not row.get("per_class"):
        reason = row.get("per_class_unavailable")
        return ["", title, "", f"unavailable: {reason}"] if reason else []
    lines = ["", title, "", "| Class | Precision | Recall | F1 | Support |", "|---|---|---|---|---|"]
    total = sum(scores["support"] for scores in row["per_class"])
    averages = (("macro avg", "macro_precision", "macro_recall", "macro_f1"),
                ("weighted avg", "precision", "recall", "f1"))
    table = [(c["label"], c["precision"], c["recall"], c["f1"], c["support"]) for c in row["per_class"]]
    table += [(name, row.get(p), row.get(r), row.get(f), total) for name, p, r, f in averages]
    for label, precision, recall, f1, support in table:
        lines.append(f"| {label} | {_format('', precision)} | {_format('', recall)} | {_format('', f1)} | {support:,} |")
    return lines


def to_csv(rows: Sequence[dict], task: str) -> str:
    columns = columns_for(task)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([key for key, _ in columns])
    for row in rows:
        writer.writerow(["" if row.get(key) is None else row.get(key) for key, _ in columns])
    return buffer.getvalue()


def write_report(rows: Sequence[dict], output_dir: str, task: str, title: str = "Comparison",
                 random_init: bool = False, notes: Sequence[str] = (), plots: bool = True) -> Dict[str, str]:
    """Write report.md, report.csv, report.json and the loss plots into output_dir; return their paths.

    rows: method_row() dicts (a "history" entry {"train": [[step, loss]], "val": [...]} feeds the plots).
    notes: lines printed under the title (data source, model source, fallbacks taken).
    """
    if not rows:
        raise ValueError("a report needs at least one row")
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, f"report.{name}") for name in ("md", "csv", "json")}
    markdown = to_markdown(rows, task, title, random_init, notes)
    atomic_write_text(paths["md"], markdown)
    csv_text = to_csv(rows, task)
    atomic_write_text(paths["csv"], csv_text, newline="")
    document = {"title": title, "task": task, "random_init": random_init,
                "quality_note": RANDOM_INIT_NOTE if random_init else None, "notes": list(notes),
                "columns": [key for key, _ in columns_for(task)], "rows": [_jsonable(row) for row in rows]}
    atomic_write_text(paths["json"], json.dumps(document, indent=1))
    if plots:
        histories = {row["method"]: row["history"] for row in rows if row.get("history")}
        paths.update(plot_losses(histories, output_dir, random_init))
    return paths


def _jsonable(row: dict) -> dict:
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return {key: clean(value) for key, value in row.items()}


def plot_losses(histories: Dict[str, dict], output_dir: str, random_init: bool = False) -> Dict[str, str]:
    """PNG plots: train_loss.png and val_loss.png (one line per method) and loss_<method>.png (train and
    val of one method). histories: {method: {"train": [[step, loss], ...], "val": [[step, loss], ...]}}.

    The figures are matplotlib.figure.Figure objects drawn without pyplot, so that plotting from a notebook
    never switches the session's backend (inline plots keep working) and no figure is left open."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("matplotlib is not installed: no loss plots (pip install matplotlib, or gpt2lite[plot])")
        return {}
    suffix = " (random-init model)" if random_init else ""
    paths = {}
    for kind in ("train", "val"):
        curves = {m: h[kind] for m, h in histories.items() if h.get(kind)}
        if curves:
            figure = loss_figure(curves, f"{kind} loss per method{suffix}")
            paths[f"{kind}_plot"] = _save(figure, os.path.join(output_dir, f"{kind}_loss.png"))
    for method, history in histories.items():
        curves = {kind: history[kind] for kind in ("train", "val") if history.get(kind)}
        figure = loss_figure(curves, f"{method}: train and val loss{suffix}")
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", method)
        paths[f"plot_{slug}"] = _save(figure, os.path.join(output_dir, f"loss_{slug}.png"))
    return paths


def loss_figure(curves: Dict[str, Sequence], title: str = "loss"):
    """A matplotlib Figure with one line per curve. curves: {label: [[step, loss], ...]} (e.g. a train()
    summary's history). In a notebook, display(figure) shows it inline; figure.savefig(path) writes it."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for label, points in curves.items():
        if not points:
            continue
        steps, losses = zip(*points)
        axes.plot(steps, losses, marker="o" if len(points) < 30 else None, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean per target token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def _save(figure, path: str) -> str:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    return path

"""Live logging of training records: TensorBoard, CSV, Weights & Biases, MLflow (TrainConfig.report_to).

train() writes every record to output_dir/log.jsonl and passes it to `on_log`; report_to sends the same
records, as they happen, to:

    "tensorboard"  event files in output_dir/tensorboard/ (torch.utils.tensorboard; needs the tensorboard
                   package: pip install 'gpt2lite[tensorboard]'); watch with `tensorboard --logdir <output_dir>`
    "csv"          output_dir/log.csv, one row per record (train and eval rows; built in)
    "wandb"        a Weights & Biases run (pip install 'gpt2lite[wandb]'; project from WANDB_PROJECT,
                   default "gpt2lite"; the rest from wandb's own environment variables)
    "mlflow"       an MLflow run (pip install 'gpt2lite[mlflow]'; MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME)

Scalars are named "train/loss", "train/lr", ..., "eval/val_loss", against the optimizer step. Only rank 0
logs under torchrun (train() opens the loggers there alone). A run resumed from a checkpoint at step S
drops what an interrupted run logged after S, as log.jsonl does: TensorBoard through purge_step, the CSV
by rewriting it; W&B and MLflow start a new run.
"""

from __future__ import annotations

import csv
import importlib
import os
from dataclasses import asdict
from typing import Dict, Iterable, Union

# the columns of log.csv: every key of train() records ("type" tells a train row from an eval row)
CSV_COLUMNS = ("type", "step", "epoch", "loss", "val_loss", "best_val_loss", "lr", "grad_norm", "tokens_per_s",
               "elapsed_s", "memory_mb")


def scalars(record: dict) -> Dict[str, float]:
    """A record's numbers under "<type>/<key>" names: {"train/loss": 2.31, "train/lr": 3e-4, ...}."""
    return {f"{record['type']}/{key}": float(value) for key, value in record.items()
            if key not in ("type", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _require(name: str, module: str, package: str):
    """Import an optional backend, or an ImportError that names the pip extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"report_to={name!r} needs the {package} package, which is not installed: "
                          f"pip install 'gpt2lite[{name}]' (or pip install {package}), or remove {name!r} from "
                          "TrainConfig.report_to") from None


class TensorBoardLogger:
    """Scalars into output_dir/tensorboard/ through torch.utils.tensorboard.SummaryWriter."""

    def __init__(self, config, start_step: int):
        writer_module = _require("tensorboard", "torch.utils.tensorboard", "tensorboard")
        # readers drop earlier events at steps >= purge_step: those an interrupted run logged after the
        # checkpoint, or those of an earlier run in the same output_dir
        self.writer = writer_module.SummaryWriter(os.path.join(config.output_dir, "tensorboard"),
                                                  purge_step=start_step + 1)

    def log(self, record: dict):
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])
        self.writer.flush()  # live: visible in TensorBoard now, and nothing lost if the run dies

    def close(self):
        self.writer.close()


class CSVLogger:
    """output_dir/log.csv: a header of CSV_COLUMNS, then one row per record (empty where a record has no value)."""

    def __init__(self, config, start_step: int):
        self.path = os.path.join(config.output_dir, "log.csv")
        kept = []
        if os.path.exists(self.path):
            with open(self.path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if row.get("step", "").isdigit() and int(row["step"]) <= start_step]
        self.file = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.file.flush()

    def log(self, record: dict):
        self.writer.writerow(record)
        self.file.flush()

    def close(self):
        self.file.close()


class WandbLogger:
    """A Weights & Biases run holding the TrainConfig and every record's scalars."""

    def __init__(self, config, start_step: int):
        wandb = _require("wandb", "wandb", "wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gpt2lite"), config=asdict(config),
                              dir=config.output_dir)

    def log(self, record: dict):
        self.run.log(scalars(record), step=record["step"])

    def close(self):
        self.run.finish()


class MLflowLogger:
    """An MLflow run (the active one if there is one, else a new one) with the TrainConfig as parameters."""

    def __init__(self, config, start_step: int):
        self.mlflow = _require("mlflow", "mlflow", "mlflow")
        self.own_run = self.mlflow.active_run() is None
        if self.own_run:
            self.mlflow.start_run()
        self.mlflow.log_params({key: str(value) for key, value in asdict(config).items()})

    def log(self, record: dict):
        self.mlflow.log_metrics(scalars(record), step=record["step"])

    def close(self):
        if self.own_run:
            self.mlflow.end_run()


LOGGERS = {"tensorboard": TensorBoardLogger, "csv": CSVLogger, "wandb": WandbLogger, "mlflow": MLflowLogger}


def check_names(report_to: Union[str, Iterable[str], None]) -> tuple:
    """report_to as a tuple of known logger names ("csv" alone may be given as a string); ValueError otherwise."""
    names = (report_to,) if isinstance(report_to, str) else tuple(report_to or ())
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"TrainConfig.report_to: unknown logger {name!r}; choose from {sorted(LOGGERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"TrainConfig.report_to names a logger twice: {list(names)}")
    return names


def open_loggers(names: Iterable[str], config, start_step: int = 0) -> list:
    """One logger per name, each with log(record) and close(); start_step: the step training resumes from."""
    return [LOGGERS[name](config, start_step) for name in names]

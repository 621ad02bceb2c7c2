"""Live logging (TrainConfig.report_to): what train() logs reaches TensorBoard's event files, log.csv, and the
W&B / MLflow APIs (stand-ins here: neither is a test dependency), and a missing backend names its pip extra."""

import csv
import json
import sys
import types

import pytest

from gpt2lite.training import loggers
from gpt2lite.training.config import TrainConfig
from gpt2lite.training.loop import train
from train_helpers import collate_lm, lm_examples, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def run(output_dir, report_to, lr=1e-2, steps=4):
    """Train the tiny model `steps` steps (evaluation every 2); return the records of log.jsonl."""
    config = TrainConfig(output_dir=str(output_dir), lr=lr, batch_size=2, epochs=None, max_steps=steps, eval_every=2,
                         eval_each_epoch=False, progress_bar=False, report_to=report_to)
    train(tiny_model(0), lm_examples(8), config, eval_dataset=lm_examples(3, seed=1), collate_fn=collate_lm)
    return [json.loads(line) for line in open(output_dir / "log.jsonl")]


def series(records, kind, key):
    return [(r["step"], r[key]) for r in records if r["type"] == kind]


def read_tensorboard(directory):
    """{tag: [(step, value), ...]} read back from the event files with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_event_files_hold_the_logged_losses(tmp_path):
    records = run(tmp_path, ["tensorboard"])
    scalars = read_tensorboard(tmp_path / "tensorboard")
    for tag, kind, key in [("train/loss", "train", "loss"), ("train/lr", "train", "lr"),
                           ("eval/val_loss", "eval", "val_loss")]:
        expected = series(records, kind, key)
        assert [step for step, _ in scalars[tag]] == [step for step, _ in expected], tag
        assert [value for _, value in scalars[tag]] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    assert len(scalars["train/loss"]) == 4 and len(scalars["eval/val_loss"]) == 2


def test_tensorboard_run_again_in_the_same_directory_shows_only_the_new_run(tmp_path):
    """A second run (or a resume) purges the earlier events at the steps it logs again, as log.jsonl is
    truncated; without purge_step TensorBoard would show both runs' points at every step."""
    run(tmp_path, ["tensorboard"], lr=1e-2)
    records = run(tmp_path, ["tensorboard"], lr=1e-3)
    logged = read_tensorboard(tmp_path / "tensorboard")["train/loss"]
    assert [value for _, value in logged] == pytest.approx([loss for _, loss in series(records, "train", "loss")],
                                                           rel=1e-6)


def test_csv_rows_equal_the_jsonl_records(tmp_path):
    records = run(tmp_path, "csv")
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["type"], int(row["step"])) for row in rows] == [(r["type"], r["step"]) for r in records]
    for row, record in zip(rows, records):
        assert set(record) <= set(loggers.CSV_COLUMNS)  # no key of train()'s records is dropped
        for key, value in record.items():
            if isinstance(value, str):
                assert row[key] == value
            else:
                assert float(row[key]) == pytest.approx(value, rel=1e-12), key


def test_csv_on_resume_keeps_only_the_rows_up_to_the_checkpoint(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), max_steps=9, report_to=["csv"])
    first = loggers.CSVLogger(config, start_step=0)
    for step in range(1, 6):
        first.log({"type": "train", "step": step, "loss": float(step)})
    first.close()
    resumed = loggers.CSVLogger(config, start_step=3)  # a run killed at step 5 resumes from the step-3 checkpoint
    resumed.log({"type": "train", "step": 4, "loss": 40.0})
    resumed.close()
    with open(tmp_path / "log.csv", newline="") as f:
        assert [(row["step"], row["loss"]) for row in csv.DictReader(f)] == [
            ("1", "1.0"), ("2", "2.0"), ("3", "3.0"), ("4", "40.0")]


class FakeWandb(types.ModuleType):
    """Records what WandbLogger calls: wandb.init(...) -> run; run.log(metrics, step=); run.finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.init_kwargs, self.logged, self.finished = None, [], False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return types.SimpleNamespace(log=lambda metrics, step: self.logged.append((step, metrics)),
                                     finish=lambda: setattr(self, "finished", True))


class FakeMLflow(types.ModuleType):
    def __init__(self):
        super().__init__("mlflow")
        self.params, self.logged, self.runs = None, [], []

    def active_run(self):
        return None

    def start_run(self):
        self.runs.append("started")

    def end_run(self):
        self.runs.append("ended")

    def log_params(self, params):
        self.params = params

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def test_wandb_and_mlflow_get_every_record_at_its_step(tmp_path, monkeypatch):
    wandb, mlflow = FakeWandb(), FakeMLflow()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    records = run(tmp_path, ["wandb", "mlflow"])
    expected = [(r["step"], {f"{r['type']}/{k}": v for k, v in r.items() if k not in ("type", "step")})
                for r in records]
    assert wandb.logged == expected and mlflow.logged == expected
    assert wandb.init_kwargs["project"] == "gpt2lite" and wandb.init_kwargs["config"]["lr"] == 1e-2
    assert wandb.finished and mlflow.runs == ["started", "ended"]
    assert mlflow.params["max_steps"] == "4" and mlflow.params["report_to"] == "('wandb', 'mlflow')"


@pytest.mark.parametrize("name", ["wandb", "mlflow", "tensorboard"])
def test_a_missing_backend_names_its_pip_extra(tmp_path, monkeypatch, name):
    module = "torch.utils.tensorboard" if name == "tensorboard" else name
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=rf"report_to='{name}' needs the {name} package.*"
                                          rf"pip install 'gpt2lite\[{name}\]'"):
        run(tmp_path, [name], steps=1)


def test_report_to_is_checked_on_construction():
    assert TrainConfig(max_steps=1, report_to="csv").report_to == ("csv",)
    assert TrainConfig(max_steps=1, report_to=["csv", "tensorboard"]).report_to == ("csv", "tensorboard")
    with pytest.raises(ValueError, match="unknown logger 'tensorbord'; choose from"):
        TrainConfig(max_steps=1, report_to=["tensorbord"])
    with pytest.raises(ValueError, match="names a logger twice"):
        TrainConfig(max_steps=1, report_to=["csv", "csv"])

"""Notebooks: notebooks/quickstart.ipynb runs (nbclient, a real Jupyter kernel, offline, tiny model) and does
what it says; the progress bar shows where stderr is not a terminal (a kernel's never is); plotting leaves
the session's matplotlib backend alone."""

import contextlib
import io
import json
import os
import sys

import pytest

from gpt2lite.training.config import TrainConfig
from gpt2lite.training.loop import train
from train_helpers import collate_lm, lm_examples, tiny_model
from conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"


def test_progress_bar_shows_when_stderr_is_not_a_terminal(tmp_path, one_thread):
    stderr = io.StringIO()  # like a Jupyter kernel's stderr, or a log file: isatty() is False
    assert not stderr.isatty()
    config = TrainConfig(output_dir=str(tmp_path), lr=1e-3, batch_size=4, epochs=None, max_steps=3,
                         progress_bar=True)
    with contextlib.redirect_stderr(stderr):
        train(tiny_model(0), lm_examples(8), config, collate_fn=collate_lm)
    text = stderr.getvalue()
    assert "train: 100%" in text and "3/3" in text and "loss=" in text, text


def test_plotting_never_switches_the_backend_or_uses_pyplot(tmp_path, monkeypatch):
    """matplotlib.use("Agg") would switch a notebook's inline backend for the whole session."""
    import matplotlib

    from gpt2lite.experiment.report import plot_losses

    def forbidden(*args, **kwargs):
        raise AssertionError("plotting called matplotlib.use")

    monkeypatch.setattr(matplotlib, "use", forbidden)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # importing pyplot now raises ImportError
    histories = {"lora": {"train": [[1, 3.0], [2, 2.5]], "val": [[2, 2.7]]}, "full": {"train": [[1, 3.1], [2, 2.2]]}}
    paths = plot_losses(histories, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths.values()) == [
        "loss_full.png", "loss_lora.png", "train_loss.png", "val_loss.png"]
    for path in paths.values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _outputs(cell, kind):
    """The texts of a code cell's outputs of one kind: "stdout", "stderr" or a MIME type such as "image/png"."""
    found = []
    for output in cell.outputs:
        if output.output_type == "stream" and output.name == kind:
            found.append(output.text)
        elif kind in output.get("data", {}):
            found.append(output.data[kind])
    return found


def _cell(notebook, source_part):
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and source_part in c.source]
    return cell


def test_quickstart_notebook_runs_and_does_what_it_says(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(str(NOTEBOOK), as_version=4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError, with the traceback, if a cell fails

    run = tmp_path / "runs" / "quickstart"
    summary = json.loads((run / "summary.json").read_text())
    train_losses = [loss for _, loss in summary["history"]["train"]]
    assert len(train_losses) == 40
    assert max(train_losses[-5:]) < train_losses[0] - 0.5  # LoRA learned something
    val_losses = [loss for _, loss in summary["history"]["val"]]
    assert summary["best_val_loss"] < val_losses[0]
    assert len((run / "log.csv").read_text().splitlines()) == 1 + 40 + len(val_losses)  # report_to=["csv"]

    training = _cell(notebook, "summary = train(")
    progress = "".join(_outputs(training, "stderr"))
    widgets = _outputs(training, "application/vnd.jupyter.widget-view+json")
    assert "train: 100%" in progress or widgets, "no progress bar in the training cell's outputs"
    assert _outputs(_cell(notebook, "loss_figure("), "image/png"), "the loss plot was not drawn inline"
    reload_text = "".join(_outputs(_cell(notebook, "load_adapter("), "stdout"))
    assert "adapter_model.safetensors" in reload_text
    assert "max |logits difference| after reloading: 0.0\n" in reload_text

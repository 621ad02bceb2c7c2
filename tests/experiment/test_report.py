"""The comparison report: rows from training summaries, markdown/CSV/JSON agree, plots, random-init marking."""

import csv
import json

import pytest

from gpt2lite import GPT2, GPT2Config
from gpt2lite.experiment.report import RANDOM_INIT_NOTE, columns_for, method_row, model_size_mb, write_report


def summary(train_losses, val_losses, **extra):
    return {"best_train_loss": min(train_losses), "best_val_loss": min(val_losses), "wall_time_s": 12.5,
            "tokens_per_s": 1000.0, "peak_memory_mb": 321.0, "checkpoint_mb": 0.5, "steps": len(train_losses),
            "history": {"train": [[i + 1, v] for i, v in enumerate(train_losses)],
                        "val": [[2 * (i + 1), v] for i, v in enumerate(val_losses)]}, **extra}


def test_method_row_counts_and_sizes():
    model = GPT2(GPT2Config.from_name("tiny", vocab_size=1000))
    for p in model.transformer.h[0].parameters():
        p.requires_grad_(False)
    row = method_row("last_n", summary([3.0, 2.0], [2.5]), model, {"rouge1": 10.0, "meteor": None})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())  # wte and lm_head are one tensor: counted once
    assert (row["trainable_params"], row["total_params"]) == (trainable, total)
    assert row["trainable_pct"] == pytest.approx(100 * trainable / total)
    assert row["model_mb"] == pytest.approx(total * 4 / 2**20)  # float32 weights, the tied matrix once
    assert model_size_mb(model) == row["model_mb"]
    assert row["best_train_loss"] == 2.0 and row["best_val_loss"] == 2.5 and row["train_time_s"] == 12.5
    assert row["quality_note"] == ""


def test_report_files_agree_and_mark_random_init(tmp_path):
    rows = [
        method_row("lora", summary([3.0, 2.0, 1.5], [2.2, 1.9]), quality={"rouge1": 31.25, "bleu": 4.5, "meteor": None},
                   random_init=True),
        method_row("full", summary([3.0, 1.0], [1.7]), quality={"rouge1": 35.0, "bleu": 6.0, "meteor": None},
                   random_init=True),
    ]
    paths = write_report(rows, str(tmp_path), "summarization", random_init=True, notes=["data: test rows"])
    markdown = open(paths["md"]).read()
    assert RANDOM_INIT_NOTE in markdown.splitlines()[2]  # the warning opens the report
    header = [h.strip() for h in markdown.splitlines()[6].strip("|").split("|")]
    assert header == [h for _, h in columns_for("summarization")]
    for column in ("Model size (MB)", "Trainable params", "Training time (s)", "Peak memory (MB)", "Best train loss",
                   "Best val loss", "BLEU", "SacreBLEU", "ROUGE-1", "ROUGE-2", "ROUGE-L", "TER", "chrF", "METEOR"):
        assert column in header
    lora_cells = [c.strip() for c in markdown.splitlines()[8].strip("|").split("|")]
    assert lora_cells[header.index("ROUGE-1")] == "31.25"
    assert lora_cells[header.index("METEOR")] == "unavailable"  # never 0
    assert lora_cells[header.index("Quality")] == RANDOM_INIT_NOTE
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["lora", "full"]
    assert float(table[1]["best_train_loss"]) == 1.0 and table[0]["meteor"] == ""
    document = json.load(open(paths["json"]))
    assert document["random_init"] is True and document["quality_note"] == RANDOM_INIT_NOTE
    assert document["rows"][0]["history"]["train"] == [[1, 3.0], [2, 2.0], [3, 1.5]]
    assert document["rows"][0]["rouge1"] == 31.25
    for key in ("train_plot", "val_plot", "plot_lora", "plot_full"):
        with open(paths[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_pretrained_report_has_no_warning_and_classification_columns(tmp_path):
    quality = {"accuracy": 0.75, "precision": 0.7, "recall": 0.75, "f1": 0.72, "confusion_matrix": [[3, 1], [0, 0]]}
    paths = write_report([method_row("lora", summary([1.0], [1.1]), quality=quality)], str(tmp_path),
                         "classification", plots=False)
    markdown = open(paths["md"]).read()
    assert "not meaningful" not in markdown
    assert "| Accuracy | Precision (w) | Recall (w) | F1 (w) |" in markdown
    assert json.load(open(paths["json"]))["rows"][0]["confusion_matrix"] == [[3, 1], [0, 0]]
    assert "train_plot" not in paths


def test_missing_matplotlib_is_a_clear_message(tmp_path, monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with caplog.at_level("WARNING"):
        paths = write_report([method_row("full", summary([1.0], [1.0]))], str(tmp_path), "language_modeling")
    assert "matplotlib is not installed" in caplog.text
    assert set(paths) == {"md", "csv", "json"}


def test_bad_task_and_empty_rows_are_errors(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        columns_for("translation")
    with pytest.raises(ValueError, match="at least one row"):
        write_report([], str(tmp_path), "summarization")

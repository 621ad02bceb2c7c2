"""The examples run offline end to end (tiny settings) and write the report and plots."""

import importlib.util
import json
import math
import os

import pytest

from conftest import REPO_ROOT

EXAMPLES = ["lora_summarize", "compare_methods", "lm_wikitext", "classify_news"]


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


TINY_DEMO = ["--max-steps", "4", "--max-train-samples", "24", "--max-eval-samples", "4", "--generate-samples", "3",
             "--eval-every", "2", "--batch-size", "4", "--max-new-tokens", "6", "--max-length", "64",
             "--warmup-steps", "1"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_have_help(name, capsys):
    module = load_example(name)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--output-dir" in capsys.readouterr().out


def test_demo_completes_offline_and_writes_report_and_plots(tmp_path, capsys):
    demo = load_example("lora_summarize")
    rows, paths = demo.main(["--output-dir", str(tmp_path), "--compare", "none", *TINY_DEMO])
    out = capsys.readouterr().out
    # the fallbacks are announced, never hidden
    assert "RANDOMLY INITIALISED 'tiny' model" in out and "NOT GPT-2" in out
    assert "OFFLINE FALLBACK DATA" in out and "docstrings" in out
    assert "not meaningful (random-init model)" in out  # the printed table carries the mark
    report = json.load(open(tmp_path / "report.json"))
    assert report["random_init"] is True
    assert [row["method"] for row in report["rows"]] == ["lora", "none"]
    lora, baseline = report["rows"]
    # LoRA r=8 on c_attn of the tiny preset: 2 layers x r x (n_embd + 3 n_embd)
    assert lora["trainable_params"] == 2 * 8 * (64 + 3 * 64)
    assert lora["steps"] == 4 and lora["checkpoint_mb"] < 0.1 and lora["train_time_s"] > 0
    assert lora["peak_memory_mb"] > 0 and lora["best_val_loss"] > 0
    assert len(lora["history"]["train"]) == 4 and [s for s, _ in lora["history"]["val"]] == [2, 4]
    assert baseline["trainable_params"] == 0 and baseline["steps"] is None
    for row in report["rows"]:
        assert row["quality_note"] == "not meaningful (random-init model)"
        assert 0 <= row["rouge1"] <= 100 and row["meteor"] is None and row["n_examples"] == 3
    for name in ("report.md", "report.csv", "train_loss.png", "val_loss.png", "loss_lora.png"):
        assert os.path.getsize(tmp_path / name) > 0
    assert os.path.exists(tmp_path / "lora" / "checkpoint.pt")


def test_demo_resume_from_reaches_the_training_loop(tmp_path):
    """--resume-from is handed to train() (whose exact-resume behaviour tests/test_train.py checks)."""
    from gpt2lite.hf import CheckpointError

    demo = load_example("lora_summarize")
    with pytest.raises(CheckpointError, match="no checkpoint at .*nowhere"):
        demo.main(["--output-dir", str(tmp_path), "--compare", "--resume-from", str(tmp_path / "nowhere"), *TINY_DEMO])


def test_search_runs_trials_and_retrains_the_best(tmp_path, capsys):
    pytest.importorskip("optuna")
    demo = load_example("lora_summarize")
    demo.main(["--output-dir", str(tmp_path), "--search", "2", "--retrain-best-model", *TINY_DEMO])
    result = json.load(open(tmp_path / "search.json"))
    assert [t["number"] for t in result["trials"]] == [0, 1]
    assert set(result["best_params"]) == {"lr", "rank", "alpha", "dropout", "epochs"}
    values = [t["value"] for t in result["trials"]]
    assert result["best_value"] == min(values)
    for n in (0, 1):
        assert os.path.exists(tmp_path / f"trial_{n}" / "summary.json")
    best = json.load(open(tmp_path / "best_model" / "report.json"))["rows"][0]
    assert best["trainable_params"] == 2 * result["best_params"]["rank"] * (64 + 3 * 64)
    assert "best trial" in capsys.readouterr().out


def test_search_without_optuna_is_a_clear_error(monkeypatch):
    import builtins

    from gpt2lite.search import require_optuna

    real_import = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna":
            raise ImportError("no optuna")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    with pytest.raises(ImportError, match="pip install optuna"):
        require_optuna()


@pytest.mark.slow
def test_compare_methods_runs_every_method(tmp_path):
    compare = load_example("compare_methods")
    rows, _ = compare.main(["--output-dir", str(tmp_path), "--max-steps", "2", "--max-train-samples", "16",
                            "--max-eval-samples", "4", "--generate-samples", "2", "--max-new-tokens", "4",
                            "--batch-size", "4", "--max-length", "64"])
    by_method = {row["method"]: row for row in rows}
    assert list(by_method) == ["full", "lora", "qlora", "prompt", "last_n"]
    assert by_method["full"]["trainable_pct"] == pytest.approx(100.0)
    assert by_method["lora"]["trainable_params"] == by_method["qlora"]["trainable_params"] == 4096
    assert by_method["qlora"]["model_mb"] < by_method["lora"]["model_mb"]  # 4-bit base weights
    assert by_method["prompt"]["trainable_params"] == 10 * 64
    assert os.path.exists(tmp_path / "train_loss.png")


@pytest.mark.slow
def test_lm_example_reports_perplexity_with_its_stride(tmp_path, shared_data):
    lm = load_example("lm_wikitext")
    wiki = shared_data / "wikitext-2-raw-v1"
    rows, _ = lm.main(["--output-dir", str(tmp_path), "--data-files", f"train={wiki / 'wiki.train.partial.raw'}",
                       f"validation={wiki / 'wiki.valid.raw'}", "--max-steps", "2", "--block-size", "32",
                       "--stride", "16", "--max-train-blocks", "16", "--max-eval-blocks", "4", "--batch-size", "4"])
    assert [row["method"] for row in rows] == ["none", "full", "lora"]
    for row in rows:
        assert row["perplexity_stride"] == 16 and row["perplexity_window"] == 32
        assert row["perplexity"] == pytest.approx(math.exp(row["perplexity_loss"]))


@pytest.mark.slow
def test_classification_example_merged_lora_scores_the_same(tmp_path, shared_data):
    classify = load_example("classify_news")
    data = shared_data / "twitter-financial-news-topic"
    rows, _ = classify.main(["--output-dir", str(tmp_path), "--data-files", f"train={data / 'topic_train.jsonl'}",
                             f"validation={data / 'topic_valid.jsonl'}", "--max-steps", "2", "--rank", "4",
                             "--alpha", "8", "--max-train-samples", "32", "--max-eval-samples", "32",
                             "--batch-size", "8"])
    by_method = {row["method"]: row for row in rows}
    assert list(by_method) == ["no fine-tuning", "lora r=4", "lora r=4 merged", "qlora r=4"]
    assert by_method["lora r=4 merged"]["accuracy"] == by_method["lora r=4"]["accuracy"]
    assert by_method["lora r=4 merged"]["confusion_matrix"] == by_method["lora r=4"]["confusion_matrix"]
    assert sum(map(sum, by_method["no fine-tuning"]["confusion_matrix"])) == 32


def test_demo_with_a_local_checkpoint_and_files_is_not_marked(tmp_path, tiny_hf_dir, shared_data, capsys):
    demo = load_example("lora_summarize")
    demo.main(["--output-dir", str(tmp_path), "--model", str(tiny_hf_dir), "--compare",
               "--data-files", str(shared_data / "cnn_dailymail" / "test.jsonl"), *TINY_DEMO])
    out = capsys.readouterr().out
    assert f"pretrained weights: {tiny_hf_dir}" in out and "RANDOMLY" not in out and "FALLBACK" not in out
    report = json.load(open(tmp_path / "report.json"))
    assert report["random_init"] is False and report["rows"][0]["quality_note"] == ""
    assert "not meaningful" not in open(tmp_path / "report.md").read()

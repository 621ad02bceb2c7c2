"""examples/: the one script there, the command line's steps written out in Python, runs offline end to end."""

import importlib.util
import json


from conftest import REPO_ROOT


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_flagless():
    """The examples define no flags of their own: the command line's are the only ones."""
    for path in (REPO_ROOT / "examples").glob("*.py"):
        assert "argparse" not in path.read_text() and "add_argument" not in path.read_text(), path


def test_python_example_writes_adapter_predictions_and_report(tmp_path, tiny_hf_dir, shared_data, monkeypatch,
                                                             capsys):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = [json.loads(line) for line in open(shared_data / "cnn_dailymail" / "test.jsonl")][:30]
    data = tmp_path / "news.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    example = load_example("finetune_in_python")
    result = example.main(str(data), str(tmp_path / "out"), model=str(tiny_hf_dir), max_steps=2)
    assert result.summary["steps"] == 2 and result.row["trainable_params"] == 2 * 8 * (64 + 3 * 64)
    config = json.load(open(tmp_path / "out" / "adapter" / "adapter_config.json"))
    assert config["base_model_name_or_path"] == str(tiny_hf_dir.resolve()) and config["lora_dropout"] == 0.05
    predictions = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert len(predictions) == 3 == result.row["n_examples"]  # 10% of 30 rows, the test split
    assert json.load(open(tmp_path / "out" / "report.json"))["rows"][0]["method"] == "lora"
    assert "| lora |" in capsys.readouterr().out

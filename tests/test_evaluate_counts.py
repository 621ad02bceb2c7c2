"""`gpt2lite evaluate --adapter` counts as trainable exactly the adapter's parameters (issue 18 item 8): the
tensors of adapter_model.safetensors (a classifier's saved score head included), never every parameter of the
loaded model; the total is the base's parameters plus the adapter's."""

import json

import pytest
from safetensors.torch import load_file

from gpt2lite.cli import run
from gpt2lite.model import GPT2, GPT2ForSequenceClassification, count_parameters
from gpt2lite.peft import MethodConfig, apply, save_adapter

pytestmark = pytest.mark.usefixtures("hub_offline")


def write_rows(path):
    path.write_text("".join(json.dumps({"text": f"shares rose {i} points today", "label": i % 3}) + "\n"
                            for i in range(60)))
    return path


@pytest.mark.parametrize("task,method", [("language_modeling", "lora"), ("language_modeling", "prompt"),
                                         ("language_modeling", "ia3"), ("classification", "lora"),
                                         ("classification", "prefix")])
def test_evaluate_reports_the_adapters_parameters_as_trainable(task, method, tmp_path, tiny_hf_dir):
    classifier = task == "classification"
    base = (GPT2ForSequenceClassification.from_pretrained(tiny_hf_dir, num_labels=3) if classifier
            else GPT2.from_pretrained(tiny_hf_dir))
    _, base_total = count_parameters(base)
    adapter = tmp_path / "adapter"
    save_adapter(apply(base, MethodConfig(name=method)), str(adapter), base_model_name_or_path=str(tiny_hf_dir))
    saved = sum(t.numel() for t in load_file(adapter / "adapter_model.safetensors").values())
    data = write_rows(tmp_path / "rows.jsonl")
    out = tmp_path / "evaluation"
    result = run(["evaluate", "--adapter", str(adapter), "--data.task", task, "--data.train", str(data),
                  "--data.max_length", "16", "--generation.max_new_tokens", "2", "--data.max_test_samples", "2",
                  "--output_dir", str(out)])
    row = json.load(open(out / "report.json"))["rows"][0]
    assert row["trainable_params"] == result["rows"][0]["trainable_params"] == saved
    assert row["total_params"] == base_total + saved  # a classifier's head: the frozen original and the adapter's copy
    assert row["trainable_pct"] == pytest.approx(100.0 * saved / row["total_params"]) and row["trainable_pct"] < 5

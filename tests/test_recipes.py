"""Every recipe in recipes/ runs through `gpt2lite compare --config` for 2 steps on a tiny model and local data,
and what the recipe asks for (methods, options, per-run learning rates, early stopping, clipping,
accumulation, search, merged rows) reaches the runs."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO_ROOT
from gpt2lite.cli import run

RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))
ADAPTER_METHODS = ("lora", "qlora", "prompt", "prefix", "ia3")
WORDS = "rates rose as the bank said growth would slow while shares of tech companies fell in early trade".split()

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("hub_offline")


@pytest.fixture(scope="module")
def tiny_neo_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_neo")
    torch.manual_seed(0)
    config = transformers.GPTNeoConfig(hidden_size=64, num_layers=2, num_heads=4, window_size=8,
                                       attention_types=[[["global", "local"], 1]], max_position_embeddings=128)
    transformers.GPTNeoForCausalLM(config).save_pretrained(str(directory))
    return directory


def sentence(g, n):
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


def local_data(task: str, data: dict, directory: Path) -> Path:
    """A small file in the recipe's own columns."""
    g = torch.Generator().manual_seed(0)
    if task == "language_modeling":
        path = directory / "text.txt"
        path.write_text("".join(sentence(g, 40) + ".\n" for _ in range(30)))
        return path
    source = data.get("input_column") or ("article" if task == "summarization" else "text")
    target = data.get("target_column") or ("highlights" if task == "summarization" else "label")
    rows = []
    for i in range(30):
        text = sentence(g, 30)
        rows.append({source: text, target: " ".join(text.split()[:6]) if task == "summarization" else i % 20})
    path = directory / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def expected_labels(recipe: dict) -> list:
    labels = []
    for entry in recipe["runs"]:
        method = entry.get("method")
        label = entry.get("label") or (method["name"] if method else "none")
        searched = recipe.get("search", {}).get("trials") and method is not None
        labels.append(f"{label} (best trial, retrained)" if searched and recipe["search"].get("retrain_best_model")
                      else label)
        if entry.get("merged_row"):
            labels.append(f"{label} merged")
    return labels


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_two_steps_on_a_tiny_model(path, tmp_path, tiny_hf_dir, tiny_neo_dir):
    recipe = yaml.safe_load(path.read_text())
    task = recipe["data"]["task"]
    model = tiny_neo_dir if "neo" in recipe["model"].lower() else tiny_hf_dir
    out = tmp_path / "out"
    overrides = ["--model", str(model), "--data.train", str(local_data(task, recipe["data"], tmp_path)),
                 "--data.max_length", "64", "--data.max_train_samples", "16", "--data.max_validation_samples", "2",
                 "--data.max_test_samples", "2", "--train.max_steps", "2", "--train.batch_size", "2",
                 "--train.warmup_steps", "1", "--train.eval_every", "1", "--train.output_dir", str(out),
                 "--train.progress_bar", "false", "--generation.max_new_tokens", "4", "--fallback", "false"]
    if task == "language_modeling":
        overrides += ["--data.stride", "32"]
    if recipe.get("search", {}).get("trials"):
        overrides += ["--search.trials", "2", "--search.train_samples", "4"]
    result = run(["compare", "--config", str(path), *overrides])
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == expected_labels(recipe)
    train = recipe.get("train", {})
    for entry in recipe["runs"]:
        method = entry.get("method")
        label = entry.get("label") or (method["name"] if method else "none")
        if method is None:
            assert rows[label]["trainable_params"] == 0 and rows[label]["steps"] is None
            continue
        row = next(row for name, row in rows.items() if name.startswith(label) and "merged" not in name)
        assert row["steps"] == 2
        final = out / label / ("best_model" if recipe.get("search", {}).get("trials") else "")
        trained_with = torch.load(final / "checkpoint.pt", weights_only=False)["config"]
        for key in ("patience", "clip", "grad_accum", "schedule", "epochs"):
            if key in train:
                assert trained_with[key] == train[key], key
        if "lr" in entry:
            assert trained_with["lr"] == entry["lr"]
        if method["name"] in ADAPTER_METHODS:
            config = json.load(open(out / label / "adapter" / "adapter_config.json"))
            assert config["base_model_name_or_path"] == str(Path(model).resolve())
            if "rank" in method and not recipe.get("search", {}).get("trials"):
                assert config["r"] == method["rank"]
            if method.get("targets"):
                assert sorted(config["target_modules"]) == sorted(method["targets"])
        else:
            assert (out / label / "model" / "model.safetensors").exists()
            assert (out / label / "model" / "vocab.json").exists()
        if task != "classification":
            assert len(open(out / label / "predictions.jsonl").readlines()) == row["n_examples"] > 0
    for entry in recipe["runs"]:
        if entry.get("merged_row"):  # the merged weights classify exactly as the adapter did
            label = entry.get("label") or entry["method"]["name"]
            assert rows[f"{label} merged"]["accuracy"] == rows[label]["accuracy"]
            assert rows[f"{label} merged"]["confusion_matrix"] == rows[label]["confusion_matrix"]
    if "neo" in recipe["model"].lower():
        config = json.load(open(out / "lora" / "adapter" / "adapter_config.json"))
        assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]  # GPT-Neo's default targets
    report = json.load(open(out / "report.json"))
    assert report["title"] == recipe["title"] and report["task"] == task


def test_demo_recipe_completes_offline_and_says_so(tmp_path, capsys, monkeypatch):
    """`make demo` offline: a small model pretrained offline (here for 20 steps, cached in tmp) and the
    docstring corpus, announced as such and marked in the report; every method of the recipe runs."""
    monkeypatch.setenv("GPT2LITE_CACHE", str(tmp_path / "cache"))
    result = run(["compare", "--config", str(REPO_ROOT / "recipes" / "demo.yaml"), "--train.output_dir", str(tmp_path),
                  "--train.max_steps", "4", "--train.eval_every", "2", "--train.batch_size", "4",
                  "--data.max_train_samples", "24", "--data.max_validation_samples", "4", "--data.max_test_samples",
                  "3", "--data.max_length", "64", "--generation.max_new_tokens", "6", "--train.progress_bar", "false",
                  "--pretrain.steps", "20", "--pretrain.batch_size", "4"])
    out = capsys.readouterr().out
    offline = "SMALL OFFLINE-PRETRAINED" in out
    assert offline or "pretrained weights" in out
    assert "OFFLINE FALLBACK DATA" in out or not offline
    assert not offline or os.listdir(tmp_path / "cache" / "offline-base")  # pretrained once, cached
    report = json.load(open(tmp_path / "report.json"))
    assert [row["method"] for row in report["rows"]] == ["none", "full", "lora", "prompt", "last_n"]
    lora = report["rows"][2]
    assert lora["steps"] == 4 and [s for s, _ in lora["history"]["val"]] == [2, 4]
    # the demo preset (4 blocks, n_embd 192): r=8 on c_attn (192->576), attn.c_proj, mlp.c_proj, c_fc
    assert lora["trainable_params"] == 4 * 8 * ((192 + 576) + (192 + 192) + (768 + 192) + (192 + 768)) or not offline
    for row in report["rows"]:
        assert not offline or "offline-pretrained" in row["quality_note"]
        assert 0 <= row["rouge1"] <= 100 and row["meteor"] is None and row["n_examples"] == 3
    for name in ("report.md", "report.csv", "train_loss.png", "val_loss.png", "loss_lora.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.load(open(tmp_path / "lora" / "adapter" / "adapter_config.json"))["base_model_name_or_path"]
    assert (tmp_path / "full" / "model" / "config.json").exists()
